"""Embeddings against a peer: tensoryard's router and real NVIDIA Triton, same load, same weights.

    .venv/bin/python -m bench.bench_embeddings_peers [--duration-s 10] [--concurrency 1,8,32]
        [--text-kinds short,long] [--worker-threads 1] [--pin] [--skip-inprocess]

Starts `tensoryard up --no-llm` (bench/stack.py) and the Triton peer (bench/peers/triton_peer.py,
PyTriton serving all-MiniLM-L6-v2 with dynamic batching) side by side, both on the server cores when
`--pin`, and drives each with the closed loop of bench/bench_embeddings.py: N asyncio tasks on one
tritonclient.grpc.aio client, one text per request. Targets alternate at each point, so drift on a
shared machine hits both alike; the idle one costs little. Torch runs `--worker-threads` threads in
tensoryard's worker, in the peer (its --torch-threads) and in the in-process sentence-transformers
reference. Writes bench/results/embeddings-peers-<UTC>.json and a .png beside it.

The peer needs its venv (`python -m bench.peers.triton_peer --install`); inference RPCs need no
access token, so its token goes to a temporary file and is never read.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from rich.console import Console

from bench.bench_embeddings import (
    INPROCESS_BATCH_SIZE,
    MODEL,
    _difference,
    _ratio,
    _x,
    load_reference,
    make_texts,
    measure_inprocess,
    measure_serving,
    parse_load_args,
    print_inprocess_table,
    print_pair_table,
)
from bench.machine import cpu_affinity, machine_info, split_cpus
from bench.result_files import result_path, write_json
from bench.peers import triton_peer
from bench.stack import background_server, free_ports, running_stack

RESULTS_NAME = "embeddings-peers"
TARGETS = ("tensoryard", "triton")
PEER_STOP_TIMEOUT_S = 60.0

log = Console(stderr=True)


# -------------------------------------------------------------------------------------------- peer

@contextlib.contextmanager
def running_triton_peer(torch_threads: int, server_cpus: set[int] | None):
    """The Triton peer in its own session (tritonserver and its stubs stop with it): yields its
    gRPC address and a `wait_ready()`."""
    if not triton_peer.venv_python().exists():
        raise SystemExit(triton_peer.NOT_INSTALLED)
    workdir = Path(tempfile.mkdtemp(prefix="tensoryard-triton-peer-"))
    grpc_port, http_port, metrics_port = free_ports(3)
    command = [sys.executable, "-m", "bench.peers.triton_peer", "--no-llm",
               "--grpc-port", str(grpc_port), "--http-port", str(http_port), "--metrics-port", str(metrics_port),
               "--torch-threads", str(torch_threads), "--access-token-file", str(workdir / "access-token")]
    with background_server("Triton peer", command, workdir, triton_peer.READY_LINE, server_cpus,
                           stop_timeout_s=PEER_STOP_TIMEOUT_S) as (_, wait_ready):
        yield f"127.0.0.1:{grpc_port}", wait_ready


# ------------------------------------------------------------------------------------------ report

def compare(points: list[dict], inprocess: dict[str, dict]) -> list[dict]:
    by_key = {(p["text_kind"], p["concurrency"], p["target"]): p for p in points}
    rows = []
    for (kind, concurrency, target), ours in by_key.items():
        if target != "tensoryard":
            continue
        peer = by_key[(kind, concurrency, "triton")]
        rows.append({
            "text_kind": kind,
            "concurrency": concurrency,
            "tensoryard_over_triton_throughput": _ratio(ours["requests_per_s"], peer["requests_per_s"]),
            "tensoryard_over_inprocess_throughput": _ratio(ours["requests_per_s"],
                                                           inprocess.get(kind, {}).get("texts_per_s")),
            "tensoryard_minus_triton_p50_ms": _difference(ours["p50_ms"], peer["p50_ms"]),
            "tensoryard_minus_triton_p99_ms": _difference(ours["p99_ms"], peer["p99_ms"]),
        })
    return rows


def print_tables(points: list[dict], comparisons: list[dict], inprocess: dict[str, dict],
                 text_stats: dict[str, dict], title: str) -> None:
    console = Console(width=None if sys.stdout.isatty() else 170)
    print_pair_table(
        console, title, points, comparisons, text_stats, ("tensoryard", "triton"),
        ("ty/triton", "ty-triton p99 ms", "ty/in-proc"),
        lambda row: (_x(row["tensoryard_over_triton_throughput"]), _signed_ms(row["tensoryard_minus_triton_p99_ms"]),
                     _x(row["tensoryard_over_inprocess_throughput"])),
    )
    print_inprocess_table(console, inprocess)


def _signed_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def plot(points: list[dict], inprocess: dict[str, dict], title: str, path: Path) -> Path:
    """One row per text kind: texts/s vs concurrency, then p50 (solid) and p99 (dashed) latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, NullFormatter, ScalarFormatter

    kinds = list(dict.fromkeys(p["text_kind"] for p in points))
    colors = {"tensoryard": "tab:blue", "triton": "tab:green", "in-process": "tab:gray"}
    figure, axes = plt.subplots(len(kinds), 2, figsize=(11, 4 * len(kinds)), squeeze=False)
    for (throughput_axis, latency_axis), kind in zip(axes, kinds):
        for target in TARGETS:
            series = sorted((p for p in points if p["text_kind"] == kind and p["target"] == target),
                            key=lambda p: p["concurrency"])
            concurrency = [p["concurrency"] for p in series]
            throughput_axis.plot(concurrency, [p["requests_per_s"] for p in series], "o-",
                                 color=colors[target], label=target)
            latency_axis.plot(concurrency, [p["p50_ms"] for p in series], "o-", color=colors[target],
                              label=f"{target} p50")
            latency_axis.plot(concurrency, [p["p99_ms"] for p in series], "s--", color=colors[target],
                              label=f"{target} p99")
        if kind in inprocess:
            throughput_axis.axhline(inprocess[kind]["texts_per_s"], color=colors["in-process"], linestyle=":",
                                    label=f"in-process encode, batch {INPROCESS_BATCH_SIZE}")
            latency_axis.axhline(inprocess[kind]["one_text_p50_ms"], color=colors["in-process"], linestyle=":",
                                 label="in-process, 1 text p50")
        throughput_axis.set(title=f"{kind} texts: throughput", xlabel="concurrency", ylabel="texts/s", xscale="log",
                            ylim=(0, None))
        latency_axis.set(title=f"{kind} texts: latency", xlabel="concurrency", ylabel="ms", xscale="log",
                         yscale="log")
        for axis in (throughput_axis, latency_axis):
            # Plain numbers at the measured concurrencies only, not log-scale minor labels.
            concurrencies = sorted({p["concurrency"] for p in points})
            axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=8)
        latency_axis.yaxis.set_major_formatter(ScalarFormatter())
        latency_axis.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# -------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    args = parse_load_args(
        argv, __doc__, worker_threads_default=1,
        worker_threads_help="torch threads in tensoryard's worker, the Triton peer and the in-process reference",
    )
    if args.worker_threads < 1:
        raise SystemExit("--worker-threads: at least 1 (the peer takes an explicit count)")
    return args


def run_inprocess(args: argparse.Namespace, texts: dict[str, list[str]],
                  server_cpus: set[int] | None) -> tuple[dict[str, dict], dict[str, np.ndarray | None]]:
    """Reference throughput per kind, and the reference embedding of each kind's first text."""
    reference: dict[str, np.ndarray | None] = {texts[k][0]: None for k in args.text_kinds}
    if args.skip_inprocess:
        return {}, reference
    inprocess = {}
    with cpu_affinity(server_cpus):
        model = load_reference(args.worker_threads)
        for kind in args.text_kinds:
            log.print(f"in-process {kind}: {args.duration_s:g}s encode(batch_size={INPROCESS_BATCH_SIZE}), "
                      f"then {args.duration_s:g}s one text per call")
            inprocess[kind] = measure_inprocess(model, texts[kind], args.duration_s, args.warmup_s)
        reference = {text: model.encode([text], show_progress_bar=False)[0] for text in reference}
    return inprocess, reference


def run_servers(args: argparse.Namespace, texts: dict[str, list[str]], reference: dict,
                server_cpus: set[int] | None, client_cpus: set[int] | None) -> tuple[list, dict, dict]:
    """Both servers up at once (they start in parallel), then every point against each in turn."""
    log.print("starting the Triton peer and tensoryard up ...")
    started_s = time.monotonic()
    with running_triton_peer(args.worker_threads, server_cpus) as (peer_address, wait_peer_ready), \
            running_stack(args.worker_threads, server_cpus, with_llm=False) as stack:
        wait_peer_ready()
        targets = {"tensoryard": stack.router, "triton": peer_address}
        log.print(f"ready in {time.monotonic() - started_s:.0f}s: tensoryard router {stack.router}, "
                  f"triton {peer_address}")
        with cpu_affinity(client_cpus):
            points, checks = asyncio.run(measure_serving(
                targets, texts, args.concurrency, args.duration_s, args.warmup_s, reference
            ))
    return points, checks, targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so both servers are stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    created = datetime.now(timezone.utc)
    machine = machine_info(("torch", "sentence-transformers", "tritonclient", "grpcio", "numpy", "matplotlib"))
    server_cpus, client_cpus = split_cpus(args.pin)
    if args.pin and not server_cpus:
        log.print("[yellow]--pin needs at least 2 usable cores; not pinning[/yellow]")
    texts, text_stats = make_texts(args.text_kinds)
    inprocess, reference = run_inprocess(args, texts, server_cpus)
    points, checks, targets = run_servers(args, texts, reference, server_cpus, client_cpus)

    comparisons = compare(points, inprocess)
    title = (f"{MODEL}: tensoryard router vs Triton (PyTriton), one text per request, closed loop, "
             f"{args.duration_s:g}s per point (torch threads {args.worker_threads}"
             f"{', pinned' if server_cpus else ''})")
    print_tables(points, comparisons, inprocess, text_stats, title)
    report = {
        "benchmark": RESULTS_NAME,
        "model": MODEL,
        "created_utc": created.isoformat(),
        "machine": {**machine, "load_avg_1_5_15m_at_end": list(os.getloadavg())},
        "options": {**vars(args), "inprocess_batch_size": INPROCESS_BATCH_SIZE},
        "pinning": {"server_cpus": sorted(server_cpus or []), "client_cpus": sorted(client_cpus or [])},
        "targets": targets,
        "texts": text_stats,
        "checks": checks,
        "inprocess": inprocess,
        "points": points,
        "comparisons": comparisons,
    }
    log.print(f"wrote {write_json(report, created, RESULTS_NAME)}")
    log.print(f"wrote {plot(points, inprocess, title, result_path(RESULTS_NAME, created, 'png'))}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log.print("interrupted; both servers were stopped")
        sys.exit(130)
