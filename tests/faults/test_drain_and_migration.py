"""A worker that drains (SIGTERM) or dies (SIGKILL) under 32 generation streams loses none of them:
each finishes, with its full token count and — greedy — the very tokens of an uninterrupted run,
on the other worker; the drained worker exits within its grace period plus a second; `up` starts
the dead one again."""

from __future__ import annotations

import asyncio
import signal

import pytest

from tests.faults.conftest import DRAIN_TIMEOUT_S, LLM, signal_pid, wait_pid_gone, wait_until
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
        async with Client(fleet.router) as client:
            return await client.many([request(LLM, f"Next request {i}:", 4) for i in range(100)])

    after = asyncio.run(next_hundred())
    assert [o.code for o in after] == ["OK"] * 100, [o.details for o in after if not o.ok][:3]
    wait_until(lambda: "exited with signal SIGKILL; restarting" in fleet.output_path.read_text(), 10,
               "up to report the restart")
    workers = fleet.wait_for_workers(2)
    assert victim.pid not in {w.pid for w in workers}
