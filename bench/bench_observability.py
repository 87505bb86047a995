"""What observability costs: the same load through two `tensoryard up` stacks, one with metrics,
access log and trace export off and one with all of them on, in one run.

    .venv/bin/python -m bench.bench_observability [--workloads embeddings,llm] [--rounds 2]
        [--duration-s 10] [--warmup-s 2] [--embedding-concurrency 1,8,32] [--llm-concurrency 1,8]
        [--max-tokens 32] [--worker-threads 1] [--scrape-interval-s 1]
        [--settings off,on | off,metrics,access_log,traces,on,on_sampled]

- "off": `up --no-metrics` (no /metrics endpoint, no Prometheus observations; the ModelStatistics
  RPC still counts, as it must), access log off (TENSORYARD_ACCESS_LOG_SAMPLE_RATE=0), no trace
  export;
- "on": metrics on and scraped every --scrape-interval-s by this process (as Prometheus would:
  rendering a scrape is part of the cost), an access line per request, every request traced
  and exported over OTLP/gRPC to a sink process (bench/otlp_sink.py) that counts and drops;
- "on_sampled": "on" with one request in ten traced (TENSORYARD_TRACE_SAMPLE_RATIO=0.1).

--settings adds stacks with one part on each (metrics, access_log, traces), to say which part
costs what. The stacks run side by side for the whole run (idle while the other is measured); every point is
measured on each stack in turn, and the whole sequence repeats --rounds times, so drift on a shared
machine hits both alike and the rounds show the noise. The loads are those of
bench/bench_embeddings.py (tritonclient, one short text per request, closed loop) and
bench/bench_llm.py (streaming Generate, exactly --max-tokens output tokens, closed loop), through
each stack's router. Targets (the issue's): throughput within 2% and p50 within 0.1 ms of "off".
Writes bench/results/observability-<UTC>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.bench_embeddings import MODEL as EMBEDDING_MODEL
from bench.bench_embeddings import make_texts
from bench.bench_llm import NUM_PROMPTS, RequestSource, make_prompts
from bench.llm_load import closed_loop_point, summarize, traced_generate
from bench.loadgen import closed_loop
from bench.machine import machine_info
from bench.result_files import write_json
from bench.stack import REPO_ROOT, free_ports, running_stack

# What each stack runs with: metrics, access log, the share of requests traced and exported (0:
# no export). "off" is the baseline; the single-part settings (--settings) say which part costs
# what; "on_sampled" is "on" with one request in ten traced, as a busy deployment would run it.
SETTINGS = {"off": (False, False, 0.0), "metrics": (True, False, 0.0), "access_log": (False, True, 0.0),
            "traces": (False, False, 1.0), "on": (True, True, 1.0), "on_sampled": (True, True, 0.1)}
DEFAULT_SETTINGS = ("off", "on", "on_sampled")
THROUGHPUT_BOUND = 0.02  # "on" may lose at most this share of "off"'s throughput
P50_BOUND_MS = 0.1

log = Console(stderr=True)


# ------------------------------------------------------------------------------------------ stacks

@contextlib.contextmanager
def otlp_sink():
    """bench/otlp_sink.py on a free port; yields its endpoint."""
    (port,) = free_ports(1)
    process = subprocess.Popen([sys.executable, "-m", "bench.otlp_sink", "--port", str(port)], cwd=REPO_ROOT,
                               stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = process.stdout.readline()
        if "listening" not in line:
            raise RuntimeError(f"the OTLP sink did not start: {line!r}")
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()


def stack_settings(setting: str, otlp_endpoint: str) -> tuple[tuple[str, ...], dict]:
    """`up` flags and environment of a setting."""
    metrics, access_log, trace_ratio = SETTINGS[setting]
    return (
        () if metrics else ("--no-metrics",),
        {"TENSORYARD_ACCESS_LOG_SAMPLE_RATE": "1" if access_log else "0",
         "TENSORYARD_OTLP_ENDPOINT": otlp_endpoint if trace_ratio else "", "OTEL_EXPORTER_OTLP_ENDPOINT": "",
         "TENSORYARD_TRACE_SAMPLE_RATIO": str(trace_ratio or 1.0)},
    )


def metrics_urls(stack) -> list[str]:
    """The scrape targets `up` wrote for Prometheus (services/prometheus.py): every process's /metrics."""
    import json

    urls = []
    for path in sorted((stack.home / "prometheus" / "targets").glob("*.json")):
        for group in json.loads(path.read_text()):
            urls += [f"http://{target}/metrics" for target in group["targets"]]
    return urls


class Scraper:
    """Scrapes every URL each interval_s in a thread of its own, as Prometheus would."""

    def __init__(self, urls: list[str], interval_s: float):
        self.urls, self.interval_s = urls, interval_s
        self.num_scrapes = self.num_failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scraper", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *_):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for url in self.urls:
                try:
                    with urllib.request.urlopen(url, timeout=2) as response:
                        response.read()
                    self.num_scrapes += 1
                except OSError:
                    self.num_failures += 1


# ----------------------------------------------------------------------------------------- workloads

async def embedding_point(address: str, inputs: list, concurrency: int, args: argparse.Namespace) -> dict:
    import tritonclient.grpc as triton
    from tritonclient.grpc.aio import InferenceServerClient

    outputs = [triton.InferRequestedOutput("embedding")]
    client = InferenceServerClient(address)
    try:
        async def send(i: int) -> None:
            await client.infer(EMBEDDING_MODEL, [inputs[i % len(inputs)]], outputs=outputs)

        result = await closed_loop(send, concurrency, args.duration_s, args.warmup_s)
    finally:
        await client.close()
    summary = result.summary()
    return {"throughput_per_s": summary["requests_per_s"], "p50_ms": summary["p50_ms"], "p99_ms": summary["p99_ms"],
            "num_errors": summary["num_errors"], "first_error": summary["first_error"]}


async def llm_point(address: str, source: RequestSource, concurrency: int, args: argparse.Namespace) -> dict:
    from protos.tensoryard.v1 import generation_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        call = functools.partial(traced_generate, generation_pb2_grpc.TextGenerationStub(channel))
        traces, start_s, end_s = await closed_loop_point(call, source, concurrency, args.llm_duration_s,
                                                         args.warmup_s)
    summary = summarize(traces, start_s, end_s, args.max_tokens)
    return {"throughput_per_s": summary["output_tokens_per_s"], "p50_ms": summary["ttft_p50_ms"],
            "p99_ms": summary["ttft_p99_ms"], "itl_p50_ms": summary["itl_p50_ms"],
            "num_errors": summary["num_errors"], "first_error": summary["first_error"]}


def embedding_inputs() -> list:
    import tritonclient.grpc as triton

    texts, _ = make_texts(["short"])
    inputs = []
    for text in texts["short"]:
        tensor = triton.InferInput("text", [1, 1], "BYTES")
        tensor.set_data_from_numpy(np.array([[text.encode()]], dtype=object))
        inputs.append(tensor)
    return inputs


async def measure(stacks: dict[str, object], args: argparse.Namespace, llm_source_for) -> list[dict]:
    """Every (round, workload, concurrency) point on "off" then "on"."""
    inputs = embedding_inputs() if "embeddings" in args.workloads else []
    points = []
    for round_index in range(args.rounds):
        for workload in args.workloads:
            concurrencies = args.embedding_concurrency if workload == "embeddings" else args.llm_concurrency
            for concurrency in concurrencies:
                for setting in args.settings:
                    address = stacks[setting].router
                    if workload == "embeddings":
                        figures = await embedding_point(address, inputs, concurrency, args)
                    else:
                        figures = await llm_point(address, llm_source_for(setting), concurrency, args)
                    point = {"round": round_index, "workload": workload, "concurrency": concurrency,
                             "setting": setting, **figures, "load_avg_1m_after": os.getloadavg()[0]}
                    points.append(point)
                    log.print(f"  round {round_index} {workload:>10} c={concurrency:<3} {setting:>3}: "
                              f"{point['throughput_per_s']:8.1f}/s p50 {_ms(point['p50_ms'])} ms "
                              f"p99 {_ms(point['p99_ms'])} ms"
                              + (f" [red]{point['num_errors']} errors: {point['first_error']}[/red]"
                                 if point["num_errors"] else ""))
    return points


# -------------------------------------------------------------------------------------------- report

def compare(points: list[dict], settings: list[str]) -> list[dict]:
    """Per (setting other than "off", workload, concurrency): it over "off", per round and over
    the rounds' sums."""
    rows = []
    keys = sorted({(p["workload"], p["concurrency"]) for p in points})
    for setting in settings[1:]:
        for workload, concurrency in keys:
            def of(name: str) -> list[dict]:
                return [p for p in points if (p["workload"], p["concurrency"], p["setting"]) == (workload, concurrency, name)]

            off, on = of("off"), of(setting)
            per_round = [b["throughput_per_s"] / a["throughput_per_s"] if a["throughput_per_s"] else None
                         for a, b in zip(off, on)]
            p50_deltas = [b["p50_ms"] - a["p50_ms"] for a, b in zip(off, on)
                          if a["p50_ms"] is not None and b["p50_ms"] is not None]
            total_off = sum(p["throughput_per_s"] for p in off)
            ratio = sum(p["throughput_per_s"] for p in on) / total_off if total_off else None
            median_p50_delta = float(np.median(p50_deltas)) if p50_deltas else None
            rows.append({
                "setting": setting, "workload": workload, "concurrency": concurrency,
                "throughput_unit": "texts/s" if workload == "embeddings" else "output tokens/s",
                "p50_of": "request latency" if workload == "embeddings" else "time to first token",
                "over_off_throughput": ratio, "over_off_throughput_per_round": per_round,
                "p50_added_ms_per_round": p50_deltas, "p50_added_ms_median": median_p50_delta,
                "throughput_within_bound": None if ratio is None else ratio >= 1 - THROUGHPUT_BOUND,
                "p50_within_bound": None if median_p50_delta is None else median_p50_delta <= P50_BOUND_MS,
            })
    return rows


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"Observability against all of it off, {args.rounds} rounds, the settings alternating per "
                        f"point; targets: throughput >= {1 - THROUGHPUT_BOUND:.2f}x, p50 <= +{P50_BOUND_MS} ms")
    for header in ("setting", "workload", "conc", "throughput", "/off (all rounds)", "per round", "p50 of",
                   "+p50 ms (median)", "per round", "met"):
        table.add_column(header, justify="left" if header in ("setting", "workload", "throughput", "p50 of") else "right")
    for row in rows:
        met = [row["throughput_within_bound"], row["p50_within_bound"]]
        table.add_row(
            row["setting"], row["workload"], str(row["concurrency"]), row["throughput_unit"],
            _x(row["over_off_throughput"]),
            " ".join(_x(v) for v in row["over_off_throughput_per_round"]), row["p50_of"],
            _ms(row["p50_added_ms_median"], 2), " ".join(_ms(v, 2) for v in row["p50_added_ms_per_round"]),
            "-" if None in met else "yes" if all(met) else "NO",
        )
    console.print(table)


def _ms(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


# ---------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="embeddings,llm")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration-s", type=float, default=10.0, help="measured seconds per embeddings point")
    parser.add_argument("--llm-duration-s", type=float, default=20.0, help="measured seconds per LLM point")
    parser.add_argument("--warmup-s", type=float, default=2.0)
    parser.add_argument("--embedding-concurrency", default="1,8,32")
    parser.add_argument("--llm-concurrency", default="1,8")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--worker-threads", type=int, default=1,
                        help="torch threads per worker (two stacks share the cores)")
    parser.add_argument("--scrape-interval-s", type=float, default=1.0)
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS),
                        help=f"stacks to compare, the first 'off': some of {','.join(SETTINGS)} (one part on each)")
    args = parser.parse_args(argv)
    args.settings = [v.strip() for v in args.settings.split(",") if v.strip()]
    if not args.settings or args.settings[0] != "off" or set(args.settings) - set(SETTINGS) or len(args.settings) < 2:
        parser.error(f"--settings: off first, then some of {','.join(SETTINGS)}")
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not args.workloads or set(args.workloads) - {"embeddings", "llm"}:
        parser.error("--workloads: some of embeddings,llm")
    args.embedding_concurrency = [int(v) for v in args.embedding_concurrency.split(",") if v.strip()]
    args.llm_concurrency = [int(v) for v in args.llm_concurrency.split(",") if v.strip()]
    if args.rounds < 1:
        parser.error("--rounds: at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    created = datetime.now(timezone.utc)
    machine = machine_info(("torch", "grpcio", "prometheus-client", "opentelemetry-sdk", "tritonclient"))
    with_llm = "llm" in args.workloads
    prompts = []
    if with_llm:
        # Not services.launcher's demo_models: it imports protos.inference, which clashes with
        # tritonclient's copy of the same proto package in this process.
        from services.model_import import convert_gguf
        from services.worker.models.gguf_import import find_demo_gguf

        home = Path(tempfile.mkdtemp(prefix="tensoryard-bench-observability-"))
        try:  # the prompts are counted with the model's own tokenizer; each stack imports it again
            folder = convert_gguf(find_demo_gguf(), home / "imports" / "SmolLM2-135M-Instruct", show_progress=False)
            prompts = make_prompts(folder, NUM_PROMPTS, seed=0)
        finally:
            shutil.rmtree(home, ignore_errors=True)
    with contextlib.ExitStack() as stack_of:
        endpoint, sink = stack_of.enter_context(otlp_sink())
        stacks = {}
        for setting in args.settings:
            flags, env = stack_settings(setting, endpoint)
            log.print(f"starting the '{setting}' stack ...")
            stacks[setting] = stack_of.enter_context(running_stack(
                args.worker_threads, None, with_llm=with_llm, flags=flags, env=env))
        urls = [url for stack in stacks.values() for url in metrics_urls(stack)]  # --no-metrics: none
        log.print(f"scraping {len(urls)} endpoints every {args.scrape_interval_s:g}s")
        sources = {setting: RequestSource(prompts, args.max_tokens) for setting in args.settings} if with_llm else {}
        started = time.monotonic()
        with Scraper(urls, args.scrape_interval_s) as scraper:
            points = asyncio.run(measure(stacks, args, sources.get))
        scrapes = {"num_urls": len(urls), "num_scrapes": scraper.num_scrapes, "num_failures": scraper.num_failures,
                   "interval_s": args.scrape_interval_s}
        wall_s = time.monotonic() - started
    sink_summary = sink.stdout.read().strip()
    rows = compare(points, args.settings)
    print_table(rows, args)
    log.print(f"the OTLP sink: {sink_summary or '(no summary)'}; scrapes: {scrapes}")
    report = {
        "benchmark": "observability",
        "created_utc": created.isoformat(),
        "machine": {**machine, "load_avg_1_5_15m_at_end": list(os.getloadavg())},
        "options": vars(args),
        "settings": {s: dict(zip(("up_flags", "env"), stack_settings(s, "<sink>"))) for s in args.settings},
        "otlp_sink": sink_summary,
        "scrapes": scrapes,
        "measuring_wall_s": wall_s,
        "points": points,
        "comparisons": rows,
    }
    log.print(f"wrote {write_json(report, created, 'observability')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log.print("interrupted; the stacks were stopped")
        sys.exit(130)
