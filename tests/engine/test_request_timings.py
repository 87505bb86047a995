"""Where each request's time went and what each step did: the figures the worker's metrics and
traces are built from."""

from __future__ import annotations

from tests.engine.test_engine_api import PROMPT, greedy, make_engine, model_dir  # noqa: F401


def _run_recording_steps(engine):
    outputs, steps = {}, []
    while engine.has_unfinished():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
        if engine.last_step is not None:
            steps.append(engine.last_step)
    return outputs, steps


def test_a_finished_request_reports_its_queue_prefill_and_decode_times_in_order(model_dir):
    engine = make_engine(model_dir, max_num_seqs=1)  # "b" waits for "a"'s seat
    engine.add_request("a", PROMPT, greedy(6))
    engine.add_request("b", PROMPT, greedy(4))
    outputs, _ = _run_recording_steps(engine)
    for request_id in ("a", "b"):
        assert all(o.timings is None for o in outputs[request_id][:-1])
        timings = outputs[request_id][-1].timings
        assert timings.arrival_s <= timings.first_scheduled_s <= timings.first_token_s <= timings.finished_s
        assert abs(timings.queue_s + timings.prefill_s + timings.decode_s - timings.e2e_s) < 1e-9
        assert timings.ttft_s == timings.first_token_s - timings.arrival_s
    a, b = outputs["a"][-1].timings, outputs["b"][-1].timings
    assert b.first_scheduled_s >= a.finished_s - 1e-3  # one seat: b queued behind the whole of a
    assert b.queue_s > a.queue_s


def test_each_step_reports_its_batch_and_one_inter_token_gap_per_token_after_the_first(model_dir):
    engine = make_engine(model_dir)
    engine.add_request("a", PROMPT, greedy(5))
    engine.add_request("b", PROMPT[:3], greedy(3))
    _, steps = _run_recording_steps(engine)
    assert sum(step.num_sampled for step in steps) == 5 + 3
    assert sum(len(step.inter_token_latencies_s) for step in steps) == (5 - 1) + (3 - 1)
    assert sum(step.num_prefill_tokens for step in steps) == len(PROMPT) + 3
    assert all(step.num_tokens >= step.num_seqs > 0 and step.duration_s > 0 for step in steps)
    assert all(gap > 0 for step in steps for gap in step.inter_token_latencies_s)


def test_a_request_aborted_while_waiting_has_no_first_token(model_dir):
    engine = make_engine(model_dir, max_num_seqs=1)
    engine.add_request("a", PROMPT, greedy(4))
    engine.add_request("b", PROMPT, greedy(4))
    engine.step()
    engine.abort("b")
    outputs, _ = _run_recording_steps(engine)
    timings = outputs["b"][-1].timings
    assert outputs["b"][-1].finish_reason == "abort"
    assert timings.first_scheduled_s is None and timings.first_token_s is None
    assert timings.ttft_s is None and timings.prefill_s is None and timings.decode_s is None
    assert timings.queue_s == timings.e2e_s > 0
