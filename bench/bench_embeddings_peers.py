"""Embeddings against a peer: tensoryard's router (torch and onnxruntime) and real NVIDIA Triton,
same load, same weights.

    .venv/bin/python -m bench.bench_embeddings_peers [--duration-s 10] [--concurrency 1,8,32]
        [--text-kinds short,long] [--worker-threads 1] [--pin] [--skip-inprocess] [--no-onnx]

Starts `tensoryard up --no-llm` (bench/stack.py) and the Triton peer (bench/peers/triton_peer.py,
PyTriton serving all-MiniLM-L6-v2 with dynamic batching) side by side, both on the server cores when
`--pin`, and drives each with the closed loop of bench/bench_embeddings.py: N asyncio tasks on one
tritonclient.grpc.aio client, one text per request. Targets alternate at each point, so drift on a
shared machine hits both alike; the idle one costs little. Torch runs `--worker-threads` threads in
tensoryard's worker, in the peer (its --torch-threads) and in the in-process sentence-transformers
reference. Writes bench/results/embeddings-peers-<UTC>.json and a .png beside it.

The onnxruntime path (unless --no-onnx; bench/onnx_serving.py): once the stack is up, MiniLM is
exported with `tensoryard models export-onnx` into the stack's registry as all-MiniLM-L6-v2-onnx and
deployed with one replica, so "tensoryard-ort" is the same router serving the ONNX version (its
worker runs onnxruntime with --worker-threads intra-op threads, behind the same dynamic batcher).
The in-process references are then two: sentence-transformers and the same export run by
onnxruntime in this process (batch 32, tokenization included in both).

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
from rich.table import Table

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
from bench.onnx_serving import ONNX_MODEL, InProcessOnnx, serve_onnx_export
from bench.peers import triton_peer
from bench.stack import background_server, free_ports, running_stack

RESULTS_NAME = "embeddings-peers"
TARGET_OVER_TRITON = 1.2  # issue 13: texts/s at c=8 and c=32, short and long, with p99 no worse
TARGETS = ("tensoryard", "tensoryard-ort", "triton")
ORT = "tensoryard-ort"
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

def compare(points: list[dict], inprocess: dict[str, dict], inprocess_onnx: dict[str, dict] | None = None) -> list[dict]:
    by_key = {(p["text_kind"], p["concurrency"], p["target"]): p for p in points}
    rows = []
    for (kind, concurrency, target), ours in by_key.items():
        if target != "tensoryard":
            continue
        peer = by_key[(kind, concurrency, "triton")]
        ort = by_key.get((kind, concurrency, ORT))
        ort_row = {} if ort is None else {
            "tensoryard_ort_over_triton_throughput": _ratio(ort["requests_per_s"], peer["requests_per_s"]),
            "tensoryard_ort_over_tensoryard_throughput": _ratio(ort["requests_per_s"], ours["requests_per_s"]),
            "tensoryard_ort_over_inprocess_ort_throughput": _ratio(
                ort["requests_per_s"], (inprocess_onnx or {}).get(kind, {}).get("texts_per_s")),
            "tensoryard_ort_minus_triton_p50_ms": _difference(ort["p50_ms"], peer["p50_ms"]),
            "tensoryard_ort_minus_triton_p99_ms": _difference(ort["p99_ms"], peer["p99_ms"]),
        }
        rows.append({
            "text_kind": kind,
            "concurrency": concurrency,
            "tensoryard_over_triton_throughput": _ratio(ours["requests_per_s"], peer["requests_per_s"]),
            "tensoryard_over_inprocess_throughput": _ratio(ours["requests_per_s"],
                                                           inprocess.get(kind, {}).get("texts_per_s")),
            "tensoryard_minus_triton_p50_ms": _difference(ours["p50_ms"], peer["p50_ms"]),
            "tensoryard_minus_triton_p99_ms": _difference(ours["p99_ms"], peer["p99_ms"]),
            **ort_row,
        })
    return rows


def check_targets(comparisons: list[dict]) -> list[dict]:
    """Per kind and concurrency, each tensoryard path against the issue's bound: texts/s over Triton's
    and p99 no worse (tensoryard minus Triton at most 0 ms)."""
    rows = []
    for row in comparisons:
        for path, prefix in (("torch", "tensoryard"), ("onnxruntime", "tensoryard_ort")):
            ratio, p99 = row.get(f"{prefix}_over_triton_throughput"), row.get(f"{prefix}_minus_triton_p99_ms")
            if ratio is None:
                continue
            rows.append({"text_kind": row["text_kind"], "concurrency": row["concurrency"], "path": path,
                         "over_triton_throughput": ratio, "minus_triton_p99_ms": p99,
                         "met": bool(ratio >= TARGET_OVER_TRITON and p99 is not None and p99 <= 0)})
    return rows


def print_tables(points: list[dict], comparisons: list[dict], inprocess: dict[str, dict],
                 text_stats: dict[str, dict], title: str, inprocess_onnx: dict[str, dict] | None = None) -> None:
    console = Console(width=None if sys.stdout.isatty() else 170)
    print_pair_table(
        console, title, points, comparisons, text_stats, ("tensoryard", "triton"),
        ("ty/triton", "ty-triton p99 ms", "ty/in-proc"),
        lambda row: (_x(row["tensoryard_over_triton_throughput"]), _signed_ms(row["tensoryard_minus_triton_p99_ms"]),
                     _x(row["tensoryard_over_inprocess_throughput"])),
    )
    ort_rows = [row for row in comparisons if "tensoryard_ort_over_triton_throughput" in row]
    if ort_rows:
        print_pair_table(
            console, f"onnxruntime path ({ONNX_MODEL} through the same router) vs Triton", points, ort_rows,
            text_stats, (ORT, "triton"), ("ort/triton", "ort-triton p99 ms", "ort/torch", "ort/in-proc ort"),
            lambda row: (_x(row["tensoryard_ort_over_triton_throughput"]),
                         _signed_ms(row["tensoryard_ort_minus_triton_p99_ms"]),
                         _x(row["tensoryard_ort_over_tensoryard_throughput"]),
                         _x(row["tensoryard_ort_over_inprocess_ort_throughput"])),
        )
    print_inprocess_table(console, inprocess)
    print_inprocess_table(console, inprocess_onnx or {}, "onnxruntime (the export)", "intra-op")
    table = Table(title=f"Target (issue 13): >= {TARGET_OVER_TRITON}x Triton's texts/s, p99 no worse")
    for header in ("texts", "conc", "path", "x Triton", "p99 - Triton ms", "met"):
        table.add_column(header, justify="left" if header in ("texts", "path") else "right")
    for row in check_targets(comparisons):
        table.add_row(row["text_kind"], str(row["concurrency"]), row["path"], _x(row["over_triton_throughput"]),
                      _signed_ms(row["minus_triton_p99_ms"]), "yes" if row["met"] else "NO")
    console.print(table)


def _signed_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def plot(points: list[dict], inprocess: dict[str, dict], title: str, path: Path,
         inprocess_onnx: dict[str, dict] | None = None) -> Path:
    """One row per text kind: texts/s vs concurrency, then p50 (solid) and p99 (dashed) latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, NullFormatter, ScalarFormatter

    kinds = list(dict.fromkeys(p["text_kind"] for p in points))
    colors = {"tensoryard": "tab:blue", ORT: "tab:purple", "triton": "tab:green", "in-process": "tab:gray",
              "in-process ort": "tab:olive"}
    figure, axes = plt.subplots(len(kinds), 2, figsize=(11, 4 * len(kinds)), squeeze=False)
    for (throughput_axis, latency_axis), kind in zip(axes, kinds):
        for target in TARGETS:
            series = sorted((p for p in points if p["text_kind"] == kind and p["target"] == target),
                            key=lambda p: p["concurrency"])
            if not series:
                continue
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
        if kind in (inprocess_onnx or {}):
            throughput_axis.axhline(inprocess_onnx[kind]["texts_per_s"], color=colors["in-process ort"], linestyle=":",
                                    label=f"in-process onnxruntime, batch {INPROCESS_BATCH_SIZE}")
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
        add_arguments=lambda parser: parser.add_argument(
            "--no-onnx", action="store_true", help="skip the onnxruntime path (served and in-process)"),
    )
    if args.worker_threads < 1:
        raise SystemExit("--worker-threads: at least 1 (the peer takes an explicit count)")
    return args


def run_inprocess(args: argparse.Namespace, texts: dict[str, list[str]],
                  server_cpus: set[int] | None) -> tuple[dict[str, dict], dict[str, dict], dict[str, np.ndarray | None]]:
    """Reference throughput per kind (sentence-transformers, then onnxruntime on the export), and
    sentence-transformers' embedding of each kind's first text."""
    reference: dict[str, np.ndarray | None] = {texts[k][0]: None for k in args.text_kinds}
    if args.skip_inprocess:
        return {}, {}, reference
    inprocess, inprocess_onnx = {}, {}
    with cpu_affinity(server_cpus):
        model = load_reference(args.worker_threads)
        for kind in args.text_kinds:
            log.print(f"in-process {kind}: {args.duration_s:g}s encode(batch_size={INPROCESS_BATCH_SIZE}), "
                      f"then {args.duration_s:g}s one text per call")
            inprocess[kind] = measure_inprocess(model, texts[kind], args.duration_s, args.warmup_s)
        reference = {text: model.encode([text], show_progress_bar=False)[0] for text in reference}
        del model
        if not args.no_onnx:
            onnx_model = InProcessOnnx(args.worker_threads)
            try:
                for kind in args.text_kinds:
                    log.print(f"in-process onnxruntime {kind}: {args.duration_s:g}s batches of {INPROCESS_BATCH_SIZE}, "
                              f"then {args.duration_s:g}s one text per call")
                    inprocess_onnx[kind] = {**measure_inprocess(onnx_model, texts[kind], args.duration_s, args.warmup_s),
                                            "torch_num_threads": args.worker_threads}  # onnxruntime's intra-op threads
            finally:
                onnx_model.close()
    return inprocess, inprocess_onnx, reference


def run_servers(args: argparse.Namespace, texts: dict[str, list[str]], reference: dict,
                server_cpus: set[int] | None, client_cpus: set[int] | None) -> tuple[list, dict, dict]:
    """Both servers up at once (they start in parallel), then every point against each in turn."""
    log.print("starting the Triton peer and tensoryard up ...")
    started_s = time.monotonic()
    with running_triton_peer(args.worker_threads, server_cpus) as (peer_address, wait_peer_ready), \
            running_stack(args.worker_threads, server_cpus, with_llm=False) as stack:
        wait_peer_ready()
        targets, onnx = {"tensoryard": stack.router}, {}
        if not args.no_onnx:
            log.print(f"exporting {ONNX_MODEL} into the stack's registry and deploying it ...")
            onnx = serve_onnx_export(stack.registry, stack.router, stack.home / "onnx-export")
            targets[ORT] = stack.router
        targets["triton"] = peer_address
        log.print(f"ready in {time.monotonic() - started_s:.0f}s: tensoryard router {stack.router}, "
                  f"triton {peer_address}")
        with cpu_affinity(client_cpus):
            points, checks = asyncio.run(measure_serving(
                targets, texts, args.concurrency, args.duration_s, args.warmup_s, reference, {ORT: ONNX_MODEL}
            ))
    return points, checks, {**targets, **({"onnx_version": onnx} if onnx else {})}


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
    inprocess, inprocess_onnx, reference = run_inprocess(args, texts, server_cpus)
    points, checks, targets = run_servers(args, texts, reference, server_cpus, client_cpus)

    comparisons = compare(points, inprocess, inprocess_onnx)
    title = (f"{MODEL}: tensoryard router (torch{'' if args.no_onnx else ', onnxruntime'}) vs Triton (PyTriton), "
             f"one text per request, closed loop, "
             f"{args.duration_s:g}s per point (torch threads {args.worker_threads}"
             f"{', pinned' if server_cpus else ''})")
    print_tables(points, comparisons, inprocess, text_stats, title, inprocess_onnx)
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
        "inprocess_onnxruntime": inprocess_onnx,
        "points": points,
        "comparisons": comparisons,
        "targets": check_targets(comparisons),
    }
    log.print(f"wrote {write_json(report, created, RESULTS_NAME)}")
    log.print(f"wrote {plot(points, inprocess, title, result_path(RESULTS_NAME, created, 'png'), inprocess_onnx)}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log.print("interrupted; both servers were stopped")
        sys.exit(130)
