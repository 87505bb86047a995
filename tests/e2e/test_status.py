"""`tensoryard status --once --json` against the session's `tensoryard up`, sampled while both demo
models serve traffic: each is listed with its replicas and the live figures docs/METRICS.md promises."""

from __future__ import annotations

import json
import re
import threading

import grpc
import pytest
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from protos.tensoryard.v1 import generation_pb2 as gen
from protos.tensoryard.v1 import generation_pb2_grpc as gen_grpc
from tests.e2e.conftest import MODEL, cli, wait_until
from tests.e2e.traffic import LLM, text_request

INTERVAL_S = 5


def router_metrics_port(stack) -> int:
    """`up` prints it on its router line: "router 127.0.0.1:N (...; metrics :M)"."""
    match = re.search(r"router .*metrics :(\d+)\)", stack.output_path.read_text())
    assert match, stack.output_path.read_text()
    return int(match.group(1))


class Traffic:
    """Threads that keep embedding and generating through the router until stopped: embeddings
    paced (they are cheap, and unpaced they starve the LLM of CPU), several short generations at
    once (one engine step serves them all), so that some finish within any window of seconds."""

    EMBED_PAUSE_S = 0.02
    NUM_GENERATORS = 3

    def __init__(self, router: str):
        self.router = router
        self.done = {MODEL: 0, LLM: 0}
        self.errors: list[Exception] = []
        self._stop = threading.Event()
        senders = [self._embed] + [self._generate] * self.NUM_GENERATORS
        self._threads = [threading.Thread(target=self._run, args=(send,), daemon=True) for send in senders]

    def _embed(self, channel) -> str:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(text_request([b"status sampled me"]), timeout=30)
        self._stop.wait(self.EMBED_PAUSE_S)
        return MODEL

    def _generate(self, channel) -> str:
        request = gen.GenerateRequest(model_name=LLM, prompt="Count to ten:",
                                      sampling=gen.SamplingParameters(temperature=0, max_tokens=2, ignore_eos=True))
        list(gen_grpc.TextGenerationStub(channel).Generate(request, timeout=60))
        return LLM

    def _run(self, send) -> None:
        with grpc.insecure_channel(self.router) as channel:
            while not self._stop.is_set():
                try:
                    name = send(channel)
                    self.done[name] += 1
                except grpc.RpcError as error:
                    self.errors.append(error)

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def status_json(stack, tmp_path, *flags: str) -> dict:
    """`status --once --json`, finding the router as a user of `up` would: through `up`'s home."""
    out = tmp_path / "status.out"
    process = cli("status", "--once", "--json", "--registry", stack.registry, "--home", str(stack.home),
                  *flags, log_path=out)
    assert process.wait(60) == 0, out.read_text()
    text = out.read_text()
    (tmp_path / "status.json").write_text(text)  # for a look after a failure
    return json.JSONDecoder().raw_decode(text[text.index("{"):])[0]  # stderr may hold a warning first


@pytest.fixture(scope="module")
def sampled(stack, tmp_path_factory) -> dict:
    """One snapshot taken while both models were kept busy for the whole window."""
    with Traffic(stack.router) as traffic:
        # Both answered once (warm) before the window opens.
        wait_until(lambda: min(traffic.done.values()) > 0 or traffic.errors, 120, "an embedding and a generation")
        report = status_json(stack, tmp_path_factory.mktemp("status"), "--interval", str(INTERVAL_S))
    assert not traffic.errors, traffic.errors[:3]
    return report


def model(report: dict, name: str) -> dict:
    found = [m for m in report["models"] if m["model"] == name]
    assert found, f"{name} not in {[m['model'] for m in report['models']]}"
    return found[0]


def test_lists_both_demo_models_with_their_replicas(stack, sampled):
    assert sampled["discovery_error"] is None
    assert sampled["window_s"] == pytest.approx(INTERVAL_S, abs=1.5)
    workers = set(stack.worker_addresses())
    for name in (MODEL, LLM):
        entry = model(sampled, name)
        assert entry["version"] and entry["num_replicas"] == len(entry["replicas"]) >= 1
        for replica in entry["replicas"]:
            assert replica["reachable"], replica["error"]
            assert replica["address"] in workers and replica["worker_id"]
            assert replica["phase"] == "ready" and replica["serving"] is True
        assert entry["num_ready_replicas"] == entry["num_replicas"]


@pytest.mark.parametrize("name", [MODEL, LLM])
def test_models_busy_during_the_window_show_live_rates_and_latency(sampled, name):
    figures = model(sampled, name)["figures"]
    assert figures["requests_per_s"] > 0, figures
    assert figures["errors_per_s"] == 0, figures
    assert 0 < figures["latency_p50_s"] <= figures["latency_p99_s"], figures
    assert figures["num_requests_waiting"] is not None, figures


def test_llm_shows_ttft_tokens_and_kv_use(sampled):
    figures = model(sampled, LLM)["figures"]
    assert figures["ttft_p50_s"] is not None and 0 < figures["ttft_p50_s"] <= figures["ttft_p99_s"], figures
    assert figures["tokens_per_s"] is not None and figures["tokens_per_s"] > 0, figures
    assert figures["kv_cache_usage_perc"] is not None and 0 <= figures["kv_cache_usage_perc"] <= 1, figures
    assert figures["num_requests_running"] is not None, figures


def test_router_is_found_in_ups_home_and_counts_what_it_forwarded(stack, sampled):
    [router] = sampled["routers"]
    assert router["metrics_url"] == f"http://127.0.0.1:{router_metrics_port(stack)}/metrics"
    assert router["reachable"], router["error"]
    assert router["requests_per_s"] is not None and router["requests_per_s"] > 0, router
    assert {m["model"] for m in router["models"]} >= {MODEL, LLM}


def test_rich_view_renders_once_against_the_stack(stack, tmp_path):
    out = tmp_path / "view.out"
    process = cli("status", "--once", "--interval", "0.5", "--registry", stack.registry,
                  "--router-metrics", f"127.0.0.1:{router_metrics_port(stack)}", log_path=out,
                  env={"COLUMNS": "80"})
    assert process.wait(60) == 0, out.read_text()
    text = out.read_text()
    assert MODEL in text and LLM in text and "Traceback" not in text
    assert all(len(line) <= 80 for line in text.splitlines())
