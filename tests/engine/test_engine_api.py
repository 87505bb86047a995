"""LLMEngine's request API and the EngineLoop thread wrapper, on a tiny random Llama."""

from __future__ import annotations

import queue
import time

import pytest

from services.common.errors import AlreadyExists, InvalidArgument, Overloaded, Unavailable
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine, RequestOutput
from services.worker.engine.loop import EngineLoop
from services.worker.engine.sampler import SamplingParams
from tests.engine.checkpoints import byte_tokenizer, save_checkpoint

PROMPT = [72, 101, 108, 108, 111, 32]  # "Hello "


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_checkpoint(directory, "llama", seed=9, eos_token_id=None)  # no EOS: lengths are predictable
    return str(directory)


def make_engine(model_dir, tokenizer=True, **scheduler) -> LLMEngine:
    config = EngineConfig(
        model_dir=model_dir, backend="torch", max_model_len=64,
        cache=CacheConfig(block_size=4, num_blocks=64),
        scheduler=SchedulerConfig(**{"max_num_batched_tokens": 32, **scheduler}),
    )
    return LLMEngine(config, tokenizer=byte_tokenizer() if tokenizer else None)


def run_all(engine: LLMEngine) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    return outputs


def greedy(max_tokens: int, **params) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **params)


def test_outputs_stream_tokens_text_and_usage(model_dir):
    engine = make_engine(model_dir)
    engine.add_request("a", PROMPT, greedy(5))
    outputs = run_all(engine)["a"]
    assert [len(o.new_token_ids) for o in outputs] == [1] * 5
    assert [o.finish_reason for o in outputs] == [None] * 4 + ["length"]
    last = outputs[-1]
    assert last.usage.num_prompt_tokens == len(PROMPT) and last.usage.num_completion_tokens == 5
    tokens = [t for o in outputs for t in o.new_token_ids]
    assert "".join(o.text_delta for o in outputs) == byte_tokenizer().decode(tokens)


def test_abort_frees_blocks_and_reports_abort(model_dir):
    engine = make_engine(model_dir)
    engine.add_request("a", PROMPT * 3, greedy(30))
    engine.step()
    assert engine.stats().num_used_blocks > 0
    engine.abort("a")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("a", "abort")]
    assert engine.stats().num_used_blocks == 0 and not engine.has_unfinished()


def test_deadline_ends_a_request(model_dir):
    engine = make_engine(model_dir)
    engine.add_request("late", PROMPT, greedy(30), deadline_s=time.monotonic() - 1)
    engine.add_request("ok", PROMPT, greedy(2))
    outputs = run_all(engine)
    assert outputs["late"][-1].finish_reason == "deadline" and outputs["late"][-1].new_token_ids == []
    assert outputs["ok"][-1].finish_reason == "length"


def test_stop_string_spanning_tokens_ends_the_request(model_dir):
    engine = make_engine(model_dir)
    engine.add_request("free", PROMPT, greedy(24))
    full = "".join(o.text_delta for o in run_all(engine)["free"])
    start = next(i for i in range(len(full) // 3, len(full) - 2) if full[i : i + 2].isprintable())
    stop = full[start : start + 2]
    engine.add_request("stopped", PROMPT, greedy(24, stop=[stop]))
    outputs = run_all(engine)["stopped"]
    assert outputs[-1].finish_reason == "stop"
    assert "".join(o.text_delta for o in outputs) == full[: full.index(stop)]
    assert engine.stats().num_used_blocks == 0


def test_seeded_request_is_reproducible_alone_or_in_a_batch(model_dir):
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=42, max_tokens=12)
    engine = make_engine(model_dir)
    engine.add_request("alone", PROMPT, params)
    alone = [t for o in run_all(engine)["alone"] for t in o.new_token_ids]
    engine.add_request("other-1", [7, 8, 9] * 5, SamplingParams(temperature=0.8, max_tokens=20))
    engine.step()
    engine.add_request("seeded", PROMPT, params)
    engine.add_request("other-2", PROMPT[::-1], SamplingParams(temperature=1.0, seed=1, max_tokens=3))
    batched = [t for o in run_all(engine)["seeded"] for t in o.new_token_ids]
    assert batched == alone


def test_logprobs_come_with_each_token(model_dir):
    engine = make_engine(model_dir)
    engine.add_request("a", PROMPT, greedy(3, logprobs=2))
    for output in run_all(engine)["a"]:
        (entry,) = output.logprobs
        assert entry.token_id == output.new_token_ids[0]
        assert entry.top[0][0] == entry.token_id and len(entry.top) == 2


def test_priority_request_is_served_first(model_dir):
    engine = make_engine(model_dir, max_num_seqs=1)
    engine.add_request("background", PROMPT, greedy(2), priority=1)
    engine.add_request("urgent", PROMPT, greedy(2), priority=0)
    first = engine.step()
    assert [o.request_id for o in first] == ["urgent"]


def test_bad_requests_are_refused_with_the_field_named(model_dir):
    engine = make_engine(model_dir, max_num_waiting=1)
    with pytest.raises(InvalidArgument, match="prompt_token_ids"):
        engine.add_request("x", [], greedy(1))
    with pytest.raises(InvalidArgument, match="prompt_token_ids"):
        engine.add_request("x", [1, 256], greedy(1))
    with pytest.raises(InvalidArgument, match="at most 63"):
        engine.add_request("x", [1] * 64, greedy(1))
    engine.add_request("x", PROMPT, greedy(1))
    with pytest.raises(AlreadyExists):
        engine.add_request("x", PROMPT, greedy(1))
    with pytest.raises(Overloaded):
        engine.add_request("y", PROMPT, greedy(1))
    without_tokenizer = make_engine(model_dir, tokenizer=False)
    with pytest.raises(InvalidArgument, match="stop"):
        without_tokenizer.add_request("z", PROMPT, greedy(1, stop=["a"]))


def test_kv_budget_in_bytes_sets_the_pool(model_dir):
    cache = CacheConfig(block_size=4, kv_cache_memory_bytes=2**20)
    config = EngineConfig(model_dir=model_dir, backend="torch", cache=cache)
    engine = LLMEngine(config)
    per_block = 2 * 2 * 4 * 2 * 16 * 4  # K and V, 2 layers, 4 tokens, 2 kv heads, head_dim 16, fp32
    assert engine.stats().num_total_blocks == 2**20 // per_block
    assert engine.max_model_len == 512  # the model's limit; the pool holds more


def test_max_model_len_must_fit_the_model_and_the_pool(model_dir):
    with pytest.raises(ValueError, match="positions"):
        LLMEngine(EngineConfig(model_dir=model_dir, backend="torch", max_model_len=513))
    with pytest.raises(ValueError, match="pool"):
        LLMEngine(EngineConfig(model_dir=model_dir, backend="torch", max_model_len=64,
                               cache=CacheConfig(block_size=4, num_blocks=15)))


def drain(stream: queue.Queue, timeout_s: float = 30.0) -> list:
    items = []
    while True:
        item = stream.get(timeout=timeout_s)
        items.append(item)
        if not isinstance(item, RequestOutput) or item.finished:
            return items


def test_engine_loop_serves_requests_through_queues(model_dir):
    loop = EngineLoop(lambda: make_engine(model_dir))
    loop.start()
    try:
        streams = {f"r{i}": loop.submit(f"r{i}", PROMPT + [i], greedy(4 + i)) for i in range(4)}
        bad = loop.submit("bad", [999], greedy(1))
        for i, (request_id, stream) in enumerate(streams.items()):
            outputs = drain(stream)
            assert sum(len(o.new_token_ids) for o in outputs) == 4 + i
            assert outputs[-1].finish_reason == "length"
        (error,) = drain(bad)
        assert isinstance(error, InvalidArgument)
        assert loop.stats() is not None
    finally:
        loop.shutdown()


def test_engine_loop_abort_and_shutdown(model_dir):
    loop = EngineLoop(lambda: make_engine(model_dir))
    loop.start()
    cancelled = loop.submit("cancelled", PROMPT, greedy(60 - len(PROMPT)))
    cancelled.get(timeout=30)  # it is running
    loop.abort("cancelled")
    assert drain(cancelled)[-1].finish_reason == "abort"
    in_flight = loop.submit("in-flight", PROMPT, greedy(60 - len(PROMPT)))
    in_flight.get(timeout=30)
    loop.shutdown()
    assert drain(in_flight)[-1].finish_reason == "abort"
    with pytest.raises(Unavailable):
        loop.submit("after", PROMPT, greedy(1))


def test_engine_loop_start_raises_what_building_raised(tmp_path):
    loop = EngineLoop(lambda: LLMEngine(EngineConfig(model_dir=str(tmp_path))))
    with pytest.raises(InvalidArgument, match="config.json"):
        loop.start()
