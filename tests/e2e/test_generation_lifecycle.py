"""Cancellation and deadlines reach the engine: a sequence's KV blocks come back as soon as its
caller goes away, nothing leaks over many cycles, and a full queue answers RESOURCE_EXHAUSTED."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc
from protos.tensoryard.v1 import generation_pb2 as gen
from protos.tensoryard.v1 import generation_pb2_grpc as gen_grpc
from protos.tensoryard.v1 import worker_pb2, worker_pb2_grpc
from services.registry.client import register_folder
from tests.e2e.conftest import cli, stop, wait_until
from tests.e2e.test_generation import LLM, chat, collect


def worker_address(stack, model: str) -> str:
    with grpc.insecure_channel(stack.registry) as channel:
        reply = discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service="worker", model_name=model), timeout=5
        )
    assert reply.instances, f"no worker serves {model}"
    return reply.instances[0].address


@pytest.fixture(scope="module")
def worker_stats(stack):
    with grpc.insecure_channel(worker_address(stack, LLM)) as channel:
        stub = worker_pb2_grpc.WorkerControlStub(channel)
        yield lambda: stub.GetStats(worker_pb2.GetStatsRequest(), timeout=5)


@pytest.fixture(scope="module")
def generation(stack):
    with grpc.insecure_channel(stack.router) as channel:
        yield gen_grpc.TextGenerationStub(channel)


def long_request() -> gen.GenerateRequest:
    return chat("Tell me a very long story about a lighthouse keeper.", temperature=0, max_tokens=1000,
                ignore_eos=True)


def wait_idle(worker_stats, baseline_blocks: int, timeout_s: float = 5.0) -> worker_pb2.WorkerStats:
    def idle():
        stats = worker_stats()
        return stats if (stats.num_kv_blocks_used == baseline_blocks and stats.num_running == 0
                         and stats.num_waiting == 0) else None

    return wait_until(idle, timeout_s, "the worker's KV blocks to return to their baseline", interval_s=0.01)


def test_cancelling_a_stream_at_the_client_frees_its_blocks(generation, worker_stats):
    baseline = wait_idle(worker_stats, worker_stats().num_kv_blocks_used).num_kv_blocks_used
    call = generation.Generate(long_request(), timeout=120)
    for _ in range(3):
        next(call)
    assert worker_stats().num_kv_blocks_used > baseline
    cancelled_at = time.monotonic()
    call.cancel()
    wait_idle(worker_stats, baseline)
    # Generous bound for a shared CPU; the engine itself frees at its next step (tests/engine).
    assert time.monotonic() - cancelled_at < 5.0


def test_deadline_frees_blocks_and_reports_deadline_exceeded(generation, worker_stats):
    baseline = wait_idle(worker_stats, worker_stats().num_kv_blocks_used).num_kv_blocks_used
    with pytest.raises(grpc.RpcError) as error:
        collect(generation, long_request(), timeout_s=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(worker_stats, baseline)


def test_200_cancel_deadline_and_error_cycles_leak_nothing(generation, worker_stats, stack):
    baseline = wait_idle(worker_stats, worker_stats().num_kv_blocks_used)
    codes = {"cancel": 0, "deadline": 0, "error": 0}
    for cycle in range(200):
        kind = ("cancel", "deadline", "error")[cycle % 3]
        if kind == "cancel":
            call = generation.Generate(long_request(), timeout=60)
            next(call)
            call.cancel()
            codes[kind] += 1
        elif kind == "deadline":
            try:
                collect(generation, long_request(), timeout_s=0.05)
            except grpc.RpcError as error:
                # 50 ms is about one step on this CPU: the deadline passes at the engine, or admission
                # sees the first token would come too late behind what is still being cleaned up
                # (RESOURCE_EXHAUSTED, nothing computed). Either way nothing may leak.
                assert error.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
                codes[kind] += 1
        else:
            with pytest.raises(grpc.RpcError) as error:
                collect(generation, chat(top_p=5.0))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            codes[kind] += 1
    after = wait_idle(worker_stats, baseline.num_kv_blocks_used, timeout_s=10)
    assert after.num_in_flight == 0
    assert codes["cancel"] == 67 and codes["error"] == 66 and codes["deadline"] >= 60
    text, _ = collect(generation, chat(temperature=0, max_tokens=16))
    assert "Paris" in text


def test_full_queue_answers_resource_exhausted(stack, tmp_path):
    """A replica with room for one running and one waiting sequence refuses the rest at once."""
    name = "smollm2-one-seat"
    with grpc.insecure_channel(stack.registry) as channel:
        register_folder(channel, name, "generation", stack.home / "imports" / LLM,
                        {"max_num_seqs": 1, "max_queue_size": 1, "kv_cache_bytes": 64 * 2**20})
    worker = cli("worker", "--model-name", name, "--registry", stack.registry,
                 "--cache-dir", str(stack.home / "worker-cache"), "--metrics-port", "-1",
                 log_path=tmp_path / "worker.log")
    try:
        with grpc.insecure_channel(stack.router) as channel:
            stub = gen_grpc.TextGenerationStub(channel)
            wait_until(lambda: _answers(stub, name), 180, "the one-seat worker to serve")
            outcomes = []

            def run():
                request = chat(temperature=0, max_tokens=40, ignore_eos=True)
                request.model_name = name
                try:
                    collect(stub, request)
                    outcomes.append("ok")
                except grpc.RpcError as error:
                    outcomes.append(error.code())

            threads = [threading.Thread(target=run) for _ in range(5)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
            assert grpc.StatusCode.RESOURCE_EXHAUSTED in outcomes
            assert "ok" in outcomes
            assert set(outcomes) <= {"ok", grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert _answers(stub, name)  # and it serves again once the queue has room
    finally:
        assert stop(worker) == 0


def _answers(stub, name: str) -> bool:
    request = chat(temperature=0, max_tokens=2)
    request.model_name = name
    try:
        collect(stub, request, timeout_s=30)
        return True
    except grpc.RpcError:
        return False
