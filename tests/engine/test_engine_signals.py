"""What the engine tells the rest of the worker: resumed generations continue exactly, KV events name
the blocks by the hash routers compute, stats carry the load admission control weighs, and limits on
a request's own size are refused up front."""

from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.kv_blocks import block_hashes
from services.worker.engine.sampler import MAX_STOP_STRINGS, SamplingParams
from tests.engine.checkpoints import byte_tokenizer
from tests.engine.test_engine_api import PROMPT, greedy, make_engine, model_dir, run_all  # noqa: F401


def _generate(engine, request_id, params, prompt=PROMPT, resume=()):
    engine.add_request(request_id, prompt, params, output_token_ids=list(resume))
    outputs = run_all(engine)[request_id]
    return [t for o in outputs for t in o.new_token_ids], "".join(o.text_delta for o in outputs), outputs[-1]


@pytest.mark.parametrize(
    "params",
    [
        greedy(12),
        SamplingParams(temperature=0.9, top_p=0.95, seed=7, max_tokens=12),
        SamplingParams(temperature=0.8, seed=3, frequency_penalty=1.5, presence_penalty=0.5, max_tokens=12),
    ],
    ids=["greedy", "seeded", "seeded-with-penalties"],
)
def test_a_resumed_generation_continues_with_the_tokens_of_an_uninterrupted_one(model_dir, params):
    tokens, text, last = _generate(make_engine(model_dir), "whole", params)
    assert len(tokens) == 12
    sent = 5  # what a replica that died had streamed
    first_text = byte_tokenizer().decode(tokens[:sent])
    rest, rest_text, rest_last = _generate(make_engine(model_dir), "resumed", params, resume=tokens[:sent])
    assert rest == tokens[sent:]
    assert first_text + rest_text == text
    assert rest_last.usage.num_completion_tokens == 12  # max_tokens counts the resumed tokens
    assert rest_last.finish_reason == last.finish_reason == "length"


def test_a_resumed_generation_stops_at_a_stop_string_that_spans_the_cut(model_dir):
    tokens, _, _ = _generate(make_engine(model_dir), "probe", greedy(16))
    stop = byte_tokenizer().decode(tokens[4:7])  # begins before the cut (after token 5), ends after it
    engine = make_engine(model_dir)
    engine.add_request("whole", PROMPT, greedy(16, stop=[stop]))
    outputs = run_all(engine)["whole"]
    assert outputs[-1].finish_reason == "stop"
    sent = 5
    sent_tokens = [t for o in outputs[:sent] for t in o.new_token_ids]
    sent_text = "".join(o.text_delta for o in outputs[:sent])  # held back: what could begin the stop
    _, rest_text, rest_last = _generate(
        make_engine(model_dir), "resumed", greedy(16, stop=[stop]), resume=sent_tokens
    )
    assert rest_last.finish_reason == "stop"
    assert sent_text + rest_text == "".join(o.text_delta for o in outputs)


def test_resuming_at_or_past_max_tokens_is_refused(model_dir):
    engine = make_engine(model_dir)
    with pytest.raises(InvalidArgument, match="max_tokens"):
        engine.add_request("r", PROMPT, greedy(3), output_token_ids=[65, 66, 67])


def test_kv_events_name_stored_blocks_by_the_shared_hash_scheme(model_dir):
    engine = make_engine(model_dir)  # block size 4
    prompt = list(range(40, 58))  # 18 tokens: 4 full blocks
    engine.take_kv_events()
    _generate(engine, "a", greedy(1), prompt=prompt)
    events = engine.take_kv_events()
    assert events.stored[:4] == block_hashes(prompt, 4)
    assert set(engine.cached_block_hashes()) >= set(block_hashes(prompt, 4))
    assert not events.removed


def test_kv_events_report_evictions(model_dir):
    engine = make_engine(model_dir)  # 64 blocks of 4 tokens
    engine.take_kv_events()
    for index in range(8):  # 8 distinct 40-token prompts: 80 blocks cached, more than the pool
        _generate(engine, f"r{index}", greedy(1), prompt=[30 + index] + list(range(60, 99)))
    events = engine.take_kv_events()
    assert events.removed, "a full pool must evict cached blocks, and say which"
    assert set(events.removed) <= set(events.stored)
    assert not set(events.removed) & set(engine.cached_block_hashes())


def test_max_tokens_beyond_the_context_left_is_refused(model_dir):
    engine = make_engine(model_dir)  # max_model_len 64
    with pytest.raises(InvalidArgument, match="maximum context length is 64"):
        engine.add_request("r", PROMPT, greedy(64 - len(PROMPT) + 1))
    engine.add_request("ok", PROMPT, greedy(64 - len(PROMPT)))
    assert engine.has_unfinished()


def test_stop_strings_beyond_the_documented_bounds_are_refused():
    with pytest.raises(InvalidArgument, match=f"at most {MAX_STOP_STRINGS}"):
        SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS + 1)])
    with pytest.raises(InvalidArgument, match="characters"):
        SamplingParams(stop=["x" * 1000])
    SamplingParams(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS)])


def test_stats_carry_queued_work_per_tenant_and_a_step_cost(model_dir):
    engine = make_engine(model_dir, max_num_seqs=1)
    engine.add_request("a", PROMPT, greedy(10), tenant="alpha")
    engine.add_request("b", PROMPT * 2, greedy(20, ignore_eos=True), tenant="beta")
    engine.add_request("c", PROMPT, greedy(30, ignore_eos=True), tenant="beta")
    engine.step()
    stats = engine.stats()
    assert stats.num_running == 1 and stats.num_waiting == 2
    assert stats.max_num_seqs == 1 and stats.block_size == 4
    beta = stats.tenant_queues["beta"]
    assert beta.num_waiting == 2
    assert beta.num_prompt_tokens == 3 * len(PROMPT)
    assert beta.num_output_tokens == 50  # ignore_eos: all of max_tokens
    assert stats.num_queued_prompt_tokens == 3 * len(PROMPT)
    assert stats.running_remaining_tokens == (9,)
    assert stats.num_generated_tokens == 1
    assert stats.tenant_queues["alpha"].num_running == 1
    assert stats.step_cost is not None and stats.step_cost.step_s(1) > 0
