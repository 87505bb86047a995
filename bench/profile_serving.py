"""Where the serving CPU goes: `tensoryard up` under load, py-spy on the router and the worker.

    .venv/bin/python -m bench.profile_serving [--workload embeddings|llm] [--concurrency 32]
        [--duration-s 15] [--pin] [--worker-threads 1]

Starts the stack (bench/stack.py), drives it with the benchmarks' own closed loop (embeddings: one
short text per request through tritonclient; llm: streaming chat Generate, 64 tokens), and while
the load runs:
- `py-spy record` samples the router and the worker (every thread) into flame graphs (SVG) and
  raw collapsed stacks;
- /proc gives the CPU each process and each thread used, so the cost per request of the router and
  the worker's gRPC thread reads straight off the summary.
Writes bench/results/profile-<workload>-<UTC>/ with the SVGs, the raw stacks and summary.json
(CPU split, requests/s, the top leaf functions of each process), and prints the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from bench.machine import cpu_affinity, split_cpus
from bench.result_files import result_path
from bench.stack import running_stack

SAMPLE_RATE_HZ = 100
TOP_FUNCTIONS = 15
WARMUP_S = 3.0

log = Console(stderr=True)


def service_pids(launcher_pid: int) -> dict[str, int]:
    """The launcher's children by role: router, registry, worker:<model>."""
    children = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    roles = {}
    for pid in map(int, children):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        command = [part.decode() for part in argv if part]
        role = command[command.index("services.cli") + 1]
        if role == "worker":
            role = f"worker:{command[command.index('--model-name') + 1]}"
        roles[role] = pid
    return roles


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) per thread, keyed 'name/tid'."""
    ticks_per_s = os.sysconf("SC_CLK_TCK")
    seconds = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / ticks_per_s
    return seconds


def cpu_split(before: dict[str, float], after: dict[str, float], duration_s: float) -> dict:
    threads = {name: (after[name] - before.get(name, 0.0)) / duration_s for name in after}
    busy = {name: round(share, 4) for name, share in sorted(threads.items(), key=lambda item: -item[1])
            if share >= 0.005}
    return {"cores": round(sum(threads.values()), 4), "threads": busy}


def top_leaves(raw_path: Path) -> list[tuple[str, float]]:
    """The functions on top of the sampled stacks, by share of samples."""
    counts: collections.Counter = collections.Counter()
    total = 0
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        counts[stack.split(";")[-1]] += int(count)
        total += int(count)
    return [(name, round(count / total, 4)) for name, count in counts.most_common(TOP_FUNCTIONS)] if total else []


def record(pid: int, duration_s: float, out: Path, raw: bool) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(duration_s)), "--rate", str(SAMPLE_RATE_HZ),
         "--threads", "--nonblocking", "--format", "raw" if raw else "flamegraph", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def run_load(args: argparse.Namespace, router: str) -> dict:
    """The closed loop of the workload's benchmark for warm-up + duration; its summary."""
    if args.workload == "embeddings":
        from bench.bench_embeddings import make_texts, measure_serving

        texts, _ = make_texts(["short"])
        points, _ = asyncio.run(measure_serving({"tensoryard": router}, texts, [args.concurrency],
                                                args.duration_s, WARMUP_S, {}))
        return points[0]
    return asyncio.run(_llm_load(args, router))


async def _llm_load(args: argparse.Namespace, router: str) -> dict:
    import functools

    import grpc

    from bench.bench_llm import RequestSource, make_prompts
    from bench.llm_load import closed_loop_point, summarize, traced_generate
    from protos.tensoryard.v1 import generation_pb2_grpc

    prompts = make_prompts(args.llm_folder, 2 * args.concurrency, 0)
    source = RequestSource(prompts, args.max_tokens)
    async with grpc.aio.insecure_channel(router) as channel:
        call = functools.partial(traced_generate, generation_pb2_grpc.TextGenerationStub(channel))
        traces, start_s, end_s = await closed_loop_point(call, source, args.concurrency, args.duration_s, WARMUP_S)
    return summarize(traces, start_s, end_s, args.max_tokens)


def profile(args: argparse.Namespace, out_dir: Path) -> dict:
    server_cpus, client_cpus = split_cpus(args.pin)
    with running_stack(args.worker_threads, server_cpus, with_llm=args.workload == "llm") as stack:
        pids = service_pids(stack.process.pid)
        worker_role = next(role for role in pids if role.startswith("worker:") and
                           (args.workload == "llm") == ("SmolLM2" in role))
        targets = {"router": pids["router"], "worker": pids[worker_role]}
        if args.workload == "llm":
            from services.launcher import LLM_DEMO, demo_models

            args.llm_folder = next(m for m in demo_models(stack.home) if m.name == LLM_DEMO).folder
        result: dict = {}
        load = threading.Thread(target=lambda: result.update(load=run_load(args, stack.router)))
        with cpu_affinity(client_cpus):
            load.start()
        time.sleep(WARMUP_S)  # profile the measured window only
        before = {name: thread_cpu_seconds(pid) for name, pid in targets.items()}
        started_s = time.monotonic()
        with cpu_affinity(client_cpus):  # the profiler's own CPU goes with the client's
            recorders = [record(pid, args.duration_s - 1, out_dir / f"{name}.{suffix}", raw)
                         for name, pid in targets.items() for suffix, raw in (("svg", False), ("txt", True))]
        for recorder in recorders:
            recorder.wait()
        elapsed_s = time.monotonic() - started_s
        split = {name: cpu_split(before[name], thread_cpu_seconds(pid), elapsed_s) for name, pid in targets.items()}
        load.join()
    load_summary = result.get("load", {})
    rate = load_summary.get("requests_per_s") or 0.0
    return {
        "workload": args.workload,
        "concurrency": args.concurrency,
        "pinning": {"server_cpus": sorted(server_cpus or []), "client_cpus": sorted(client_cpus or [])},
        "load": load_summary,
        "cpu": split,
        "cpu_ms_per_request": {name: round(1e3 * s["cores"] / rate, 3) for name, s in split.items()} if rate else None,
        "top_leaf_functions": {name: top_leaves(out_dir / f"{name}.txt") for name in targets
                               if (out_dir / f"{name}.txt").exists()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=("embeddings", "llm"), default="embeddings")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--duration-s", type=float, default=15.0)
    parser.add_argument("--max-tokens", type=int, default=64, help="llm: output tokens per request")
    parser.add_argument("--worker-threads", type=int, default=1)
    parser.add_argument("--pin", action="store_true", help="servers on some cores, client and py-spy on the others")
    args = parser.parse_args(argv)
    if args.duration_s < 3 or args.concurrency < 1:
        parser.error("--duration-s: at least 3; --concurrency: at least 1")
    created = datetime.now(timezone.utc)
    out_dir = result_path(f"profile-{args.workload}", created)
    out_dir.mkdir()
    summary = profile(args, out_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    Console().print_json(data={k: v for k, v in summary.items() if k != "top_leaf_functions"})
    log.print(f"wrote {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
