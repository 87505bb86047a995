"""A worker that drains (SIGTERM) or dies (SIGKILL) under 32 generation streams loses none of them:
each finishes, with its full token count and — greedy — the very tokens of an uninterrupted run,
on the other worker; the drained worker exits within its grace period plus a second; `up` starts
the dead one again."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.faults.conftest import DRAIN_TIMEOUT_S, LLM, signal_pid, start_router, wait_pid_gone, wait_until
from tests.faults.generation_client import Client, generate, request

pytestmark = pytest.mark.slow

NUM_STREAMS = 32
MAX_TOKENS = 64


def streams(tag: str) -> list:
    return [request(LLM, f"{tag} story {i}: the lighthouse keeper {'opened' if i % 2 else 'closed'} the door and",
                    MAX_TOKENS) for i in range(NUM_STREAMS)]


async def _run_and_signal(fleet, messages, sig: signal.Signals) -> tuple[list, object, float]:
    """Starts the streams, signals the worker holding most of them once each has tokens flowing;
    returns (outcomes, the signalled worker, seconds it took to exit)."""
    victim = max(fleet.workers(), key=lambda w: w.stats().num_in_flight)
    flowing = asyncio.Event()
    num_flowing = 0

    def on_token(outcome) -> None:
        nonlocal num_flowing
        if len(outcome.token_ids) == 3:
            num_flowing += 1
            if num_flowing == len(messages):
                flowing.set()

    async with Client(fleet.router) as client:
        calls = asyncio.gather(*(generate(client.stub, m, timeout_s=120, on_token=on_token) for m in messages))
        await asyncio.wait_for(flowing.wait(), 60)
        victim = max(fleet.workers(), key=lambda w: w.stats().num_in_flight)
        signal_pid(victim.pid, sig)
        exit_s = await asyncio.to_thread(wait_pid_gone, victim.pid, DRAIN_TIMEOUT_S + 10)
        outcomes = await calls
    return outcomes, victim, exit_s


@pytest.fixture(scope="module")
def reference_tokens(fleet):
    """The greedy tokens of uninterrupted runs, one set per prompt set."""
    fleet.wait_for_workers(2)

    async def run(tag):
        async with Client(fleet.router) as client:
            return [o.token_ids for o in await client.many(streams(tag))]

    return {tag: asyncio.run(run(tag)) for tag in ("drain", "kill")}


def test_sigterm_drains_a_worker_under_32_streams_and_every_stream_completes(fleet, reference_tokens):
    fleet.wait_for_workers(2)
    outcomes, victim, exit_s = asyncio.run(_run_and_signal(fleet, streams("drain"), signal.SIGTERM))
    failed = [(o.code, o.details) for o in outcomes if not o.ok]
    assert not failed, failed
    assert [len(o.token_ids) for o in outcomes] == [MAX_TOKENS] * NUM_STREAMS
    assert [o.token_ids for o in outcomes] == reference_tokens["drain"]
    assert exit_s <= DRAIN_TIMEOUT_S + 1.0, f"the drained worker took {exit_s:.2f} s to exit"
    print(f"\nSIGTERM: worker exited {exit_s:.2f} s after the signal (grace {DRAIN_TIMEOUT_S} s); "
          f"{NUM_STREAMS} streams complete")
    fleet.wait_for_workers(2)  # up starts it again


def test_sigkill_of_a_worker_mid_stream_moves_every_stream_to_the_other_with_the_same_tokens(fleet, reference_tokens):
    fleet.wait_for_workers(2)
    outcomes, victim, _ = asyncio.run(_run_and_signal(fleet, streams("kill"), signal.SIGKILL))
    failed = [(o.code, o.details) for o in outcomes if not o.ok]
    assert not failed, failed
    assert [o.token_ids for o in outcomes] == reference_tokens["kill"]

    async def next_hundred():
        # From 8 callers: while its peer restarts, the survivor queues at most 1.5 steps of work
        # (services/worker/admission.py) and rightly refuses a burst of 100 past that.
        async with Client(fleet.router) as client:
            return await client.many([request(LLM, f"Next request {i}:", 4) for i in range(100)], concurrency=8)

    after = asyncio.run(next_hundred())
    assert [o.code for o in after] == ["OK"] * 100, [o.details for o in after if not o.ok][:3]
    wait_until(lambda: "exited with signal SIGKILL; restarting" in fleet.output_path.read_text(), 10,
               "up to report the restart")
    workers = fleet.wait_for_workers(2)
    assert victim.pid not in {w.pid for w in workers}


def _triton_streams(router: str, prompts: list[str], on_flowing=None, max_tokens: int = 48) -> dict[str, str]:
    """Streaming LLM requests on one tritonclient stream; the whole text of each, by request id."""
    import queue

    import numpy as np
    import tritonclient.grpc as triton

    client = triton.InferenceServerClient(router)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=120)
    try:
        for index, prompt in enumerate(prompts):
            text_input = triton.InferInput("text_input", [1], "BYTES")
            text_input.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
            stream = triton.InferInput("stream", [1], "BOOL")
            stream.set_data_from_numpy(np.array([True]))
            client.async_stream_infer(LLM, [text_input, stream], request_id=f"r{index}", parameters={
                "temperature": "0", "max_tokens": max_tokens, "ignore_eos": "true"})
        texts = {f"r{i}": "" for i in range(len(prompts))}
        finished: set[str] = set()
        num_chunks = 0
        while len(finished) < len(prompts):
            result, error = responses.get(timeout=120)
            assert error is None, error
            response = result.get_response()
            assert not response.parameters.get("tensoryard_token_ids"), "the router strips its own parameter"
            texts[response.id] += result.as_numpy("text_output")[0].decode()
            num_chunks += 1
            if on_flowing is not None and num_chunks == 2 * len(prompts):
                on_flowing()
            if response.parameters["triton_final_response"].bool_param:
                finished.add(response.id)
        return texts
    finally:
        client.stop_stream()
        client.close()


def test_triton_streams_move_to_the_other_worker_when_theirs_is_killed(fleet):
    fleet.wait_for_workers(2)
    prompts = [f"Triton story {i}: the keeper climbed the stairs and" for i in range(8)]
    reference = _triton_streams(fleet.router, prompts)
    victims = []

    def kill_busiest():
        victim = max(fleet.workers(), key=lambda w: w.stats().num_in_flight)
        victims.append(victim)
        signal_pid(victim.pid, signal.SIGKILL)

    texts = _triton_streams(fleet.router, prompts, on_flowing=kill_busiest)
    assert victims, "the streams never flowed"
    assert texts == reference
    fleet.wait_for_workers(2)


def test_a_router_drains_like_a_worker_its_streams_finish_and_it_exits_in_time(fleet):
    fleet.wait_for_workers(2)
    process, address = start_router(fleet, "--drain-timeout-s", str(DRAIN_TIMEOUT_S), log_name="router-drain.log")
    messages = [request(LLM, f"Router drain {i}: once upon a time", 24) for i in range(8)]

    async def run():
        flowing = asyncio.Event()
        started = set()

        def on_token(outcome) -> None:
            started.add(id(outcome))
            if len(started) == len(messages):
                flowing.set()

        async with Client(address) as client:
            calls = asyncio.gather(*(generate(client.stub, m, timeout_s=60, on_token=on_token) for m in messages))
            await asyncio.wait_for(flowing.wait(), 60)
            process.send_signal(signal.SIGTERM)
            exit_s = await asyncio.to_thread(wait_pid_gone, process.pid, DRAIN_TIMEOUT_S + 10)
            return await calls, exit_s

    outcomes, exit_s = asyncio.run(run())
    assert [(o.code, len(o.token_ids)) for o in outcomes] == [("OK", 24)] * len(messages)
    assert exit_s <= DRAIN_TIMEOUT_S + 1.0
    assert process.wait(5) == 0
