from __future__ import annotations

import pytest

from services.worker.engine.detokenizer import IncrementalDetokenizer
from tests.engine.checkpoints import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def stream(tokenizer, text: str, stop=(), prompt="Q: ") -> tuple[list[str], IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt).ids, tuple(stop))
    deltas = [detok.add_token(t) for t in tokenizer.encode(text).ids]
    deltas.append(detok.flush())
    return deltas, detok


def test_multibyte_characters_are_never_split(tokenizer):
    text = "héllo €uro 😀!"
    deltas, _ = stream(tokenizer, text)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert "😀" in deltas  # its 4 byte-tokens yield nothing, nothing, nothing, then the whole emoji
    assert deltas.count("") >= 3 + 2 + 1  # held back while 😀, € and é were incomplete


def test_deltas_add_up_to_the_full_decode(tokenizer):
    text = "ünïcødé ✓ mixed with ascii 日本語"
    deltas, detok = stream(tokenizer, text)
    assert "".join(deltas) == detok.text == text


def test_truncated_character_at_the_end_is_flushed_as_replacement(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ())
    assert detok.add_token(ord("a")) == "a"
    assert detok.add_token(0xE2) == ""  # first byte of a 3-byte character
    assert detok.flush() == "\ufffd"


def test_stop_string_spanning_tokens_ends_the_text_before_it(tokenizer):
    deltas, detok = stream(tokenizer, "The answer is 42.\n\nUser: more", stop=["\n\nUser:"])
    assert detok.stopped
    assert "".join(deltas) == "The answer is 42."


def test_text_past_a_stop_string_is_never_emitted(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ("END",))
    emitted = ""
    for t in tokenizer.encode("abcENDxyz").ids:
        emitted += detok.add_token(t)
        assert "E" not in emitted  # even the stop string's first letters are held back
    emitted += detok.flush()
    assert emitted == "abc"


def test_held_back_prefix_is_released_when_it_is_not_a_stop(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [], ("STOP",))
    out = [detok.add_token(t) for t in tokenizer.encode("xSTy").ids]
    assert out == ["x", "", "", "STy"]
    assert detok.flush() == ""


def test_earliest_of_several_stop_strings_wins(tokenizer):
    deltas, _ = stream(tokenizer, "one two three", stop=["three", "two"])
    assert "".join(deltas) == "one "


def test_stop_string_inside_a_multibyte_stream(tokenizer):
    deltas, _ = stream(tokenizer, "café☕ done", stop=["☕"])
    assert "".join(deltas) == "café"
