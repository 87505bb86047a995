"""LLM generation end to end: tensoryard (router and worker) against transformers and our own engine.

    .venv/bin/python -m bench.bench_llm [--duration-s 30] [--warmup-s 5] [--concurrency 1,8,32]
        [--rates auto|2,4,8] [--open-loop-s S] [--max-tokens 64] [--worker-threads N] [--pin]
        [--skip-transformers] [--skip-engine-only] [--seed 0]

One run, on SmolLM2-135M-Instruct, chat prompts of mixed lengths (about 30 to 300 tokens with the
chat template, fixed seed) and exactly --max-tokens output tokens per request (greedy, ignore_eos,
so every system produces the same count):

- in-process first, before the stack starts: Hugging Face `generate` on the imported folder, one
  request at a time and static batches of each --concurrency value above 1 (left padding); and the
  "engine only" point, an in-process LLMEngine (the worker's own config) stepping the first
  max(--concurrency) prompts, added at once, with no gRPC;
- closed loop (bench/loadgen.py) at each --concurrency, over grpc.aio streaming Generate, through
  the router and straight to the worker (found through discovery), alternating at each point;
- open loop through the router: Poisson arrivals at each --rate for --open-loop-s ("auto": a
  quarter, a half and three quarters of the router's best closed-loop throughput);
- static batching under the same arrival times, simulated from the measured `generate` times
  (bench/llm_reference.py), for TTFT p99 next to tensoryard's measured one.

During every serving point the worker's GetStats is polled for peak KV-cache use. Each request
takes the next prompt of one list for the whole run, so no prompt repeats within a few hundred
requests and prefix-cache hits stay those of the shared system prompt (reported per point).
Metrics (bench/llm_load.py): output tokens/s, TTFT, inter-token latency, request latency.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import os
import random
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import grpc
from rich.console import Console

from bench.bench_embeddings import short_texts
from bench.llm_report import MODEL, compare, format_ms, format_pct, print_tables, simulate
from bench.llm_load import (closed_loop_point, open_loop_point, peak_stats, poisson_arrivals_s, polling_worker_stats,
                            summarize, traced_generate)
from bench.llm_reference import measure_engine_only, measure_transformers, set_torch_threads
from bench.machine import cpu_affinity, machine_info, split_cpus
from bench.result_files import write_json
from bench.stack import running_stack, worker_address

MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS = 32, 300  # with the chat template (its system prompt is ~30)
NUM_PROMPTS = 512
AUTO_RATE_FRACTIONS = (0.25, 0.5, 0.75)
STATS_POLL_INTERVAL_S = 0.1

log = Console(stderr=True)

INSTRUCTIONS = (
    "Summarize these notes in one paragraph.",
    "Write a short headline for each of these notes.",
    "Which of these events sounds most surprising, and why?",
    "Turn these notes into a polite email to the team.",
    "List every person or group mentioned in these notes.",
    "Rewrite these notes as a short story for children.",
)


@dataclass(frozen=True, slots=True)
class Prompt:
    content: str  # the user message
    token_ids: list[int]  # as the worker tokenizes it: chat template, then no special tokens added


def make_prompts(folder: Path, num_prompts: int, seed: int) -> list[Prompt]:
    """User messages of an instruction and notes, grown to a length drawn uniformly per prompt."""
    from tokenizers import Tokenizer

    from services.common.chat_template import ChatTemplate

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    template = ChatTemplate.from_folder(folder)

    def tokenize(content: str) -> list[int]:
        text = template.render([{"role": "user", "content": content}])
        return tokenizer.encode(text, add_special_tokens=False).ids

    rng = random.Random(seed)
    prompts = []
    for _ in range(num_prompts):
        target = rng.randint(MIN_PROMPT_TOKENS, MAX_PROMPT_TOKENS)
        instruction = rng.choice(INSTRUCTIONS)
        overhead = len(tokenize(instruction + "\n\n"))
        notes: list[str] = []
        # Count the notes alone (fast), render the whole message once at the end.
        while overhead + len(tokenizer.encode(" ".join(notes), add_special_tokens=False).ids) < target:
            notes += short_texts(rng, 1)
        content = f"{instruction}\n\n{' '.join(notes)}".strip()
        prompts.append(Prompt(content, tokenize(content)))
    return prompts


def prompt_stats(prompts: list[Prompt]) -> dict:
    lengths = [len(p.token_ids) for p in prompts]
    return {"num_prompts": len(prompts), "mean_tokens": sum(lengths) / len(lengths), "min_tokens": min(lengths),
            "max_tokens": max(lengths), "example": prompts[0].content}


# ------------------------------------------------------------------------------------------- serving

class RequestSource:
    """The next prompt's request, cycling through one list for the whole run."""

    def __init__(self, prompts: list[Prompt], max_tokens: int):
        from protos.tensoryard.v1 import generation_pb2 as g

        sampling = g.SamplingParameters(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        self.requests = [  # built once: the client loop stays light
            g.GenerateRequest(model_name=MODEL, sampling=sampling, messages=g.ChatMessages(
                messages=[g.ChatMessage(role="user", content=p.content)]))
            for p in prompts
        ]
        self.num_sent = 0

    def __call__(self):
        request = self.requests[self.num_sent % len(self.requests)]
        self.num_sent += 1
        return request


async def measure_serving(targets: dict[str, str], prompts: list[Prompt], args: argparse.Namespace,
                          reference_tokens: list[int] | None) -> dict:
    from protos.tensoryard.v1 import generation_pb2_grpc

    channels = {target: grpc.aio.insecure_channel(address) for target, address in targets.items()}
    calls = {target: functools.partial(traced_generate, generation_pb2_grpc.TextGenerationStub(channel))
             for target, channel in channels.items()}
    source = RequestSource(prompts, args.max_tokens)
    results: dict = {"closed_loop": [], "open_loop": [], "arrivals_s": {}}
    try:
        check_traces: list = []
        await calls["router"](source(), check_traces)  # prompt 0, also a warm-up
        results["check"] = _check(check_traces[0], prompts[0], args.max_tokens, reference_tokens)
        for concurrency in args.concurrency:
            for target in ("router", "direct"):
                async with polling_worker_stats(channels["direct"], STATS_POLL_INTERVAL_S) as samples:
                    traces, start_s, end_s = await closed_loop_point(
                        calls[target], source, concurrency, args.duration_s, args.warmup_s)
                point = {"target": target, "concurrency": concurrency,
                         **summarize(traces, start_s, end_s, args.max_tokens),
                         **peak_stats(samples, start_s, end_s), "load_avg_1m_after": os.getloadavg()[0]}
                results["closed_loop"].append(point)
                _log_point(point, f"c={concurrency:<3}")
        results["rates"] = resolve_rates(args.rates, results["closed_loop"], args.max_tokens)
        for index, rate in enumerate(results["rates"]):
            arrivals_s = poisson_arrivals_s(rate, args.open_loop_s, args.seed + 1000 + index)
            async with polling_worker_stats(channels["direct"], STATS_POLL_INTERVAL_S) as samples:
                traces, start_s, end_s = await open_loop_point(
                    calls["router"], source, arrivals_s, args.open_loop_s, args.drain_timeout_s)
            point = {"target": "router", "rate_per_s": rate, "num_arrivals": len(arrivals_s),
                     **summarize(traces, start_s, end_s, args.max_tokens, latency_over_all=True),
                     **peak_stats(samples, start_s, end_s), "load_avg_1m_after": os.getloadavg()[0]}
            results["open_loop"].append(point)
            results["arrivals_s"][rate] = arrivals_s
            _log_point(point, f"{rate:g}/s")
    finally:
        for channel in channels.values():
            await channel.close()
    return results


def resolve_rates(rates: list[float] | None, closed_points: list[dict], max_tokens: int,
                  target: str = "router") -> list[float]:
    """The given rates, or fractions of the target's best closed-loop request rate."""
    if rates:
        return rates
    best_per_s = max((p["output_tokens_per_s"] / max_tokens for p in closed_points if p["target"] == target),
                     default=0.0)
    if best_per_s <= 0:
        raise RuntimeError(f"--rates auto: {target}'s closed-loop points produced no tokens")
    return [round(best_per_s * fraction, 3) for fraction in AUTO_RATE_FRACTIONS]


def _check(trace, prompt: Prompt, max_tokens: int, reference_tokens: list[int] | None) -> dict:
    """Prompt tokenization and output count always; greedy tokens against transformers when it ran."""
    check = {
        "prompt_tokens_served": trace.num_prompt_tokens,
        "prompt_tokens_expected": len(prompt.token_ids),
        "output_tokens": len(trace.token_ids),
        "output_tokens_expected": max_tokens,
    }
    # The reference: transformers' tokens, else the in-process engine's.
    check["greedy_tokens_matching_reference"] = _matching(trace.token_ids, reference_tokens)
    check["ok"] = (check["prompt_tokens_served"] == check["prompt_tokens_expected"]
                   and check["output_tokens"] == max_tokens)
    if not check["ok"]:
        log.print(f"[red]check failed: {check}[/red]")
    return check


def _matching(tokens: list[int] | None, reference: list[int] | None) -> int | None:
    """How many leading tokens agree (None without both)."""
    if not tokens or not reference:
        return None
    return next((i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b), min(len(tokens), len(reference)))


def _log_point(point: dict, label: str) -> None:
    """One line per point; a point with errors and no tokens at all stops the run (the server is gone)."""
    errors = f", [red]{point['num_errors']} errors: {point['first_error']}[/red]" if point["num_errors"] else ""
    log.print(f"  {point['target']:>6} {label} {point['output_tokens_per_s']:7.1f} tok/s  "
              f"TTFT p50 {format_ms(point['ttft_p50_ms'])} p99 {format_ms(point['ttft_p99_ms'])} ms  "
              f"ITL p50 {format_ms(point['itl_p50_ms'])} ms  peak KV {format_pct(point['peak_kv_use'])}{errors}", soft_wrap=True)
    if point["num_errors"] and not point["output_tokens_per_s"]:
        raise RuntimeError(f"{point['target']} {label}: every request failed: {point['first_error']}")


# --------------------------------------------------------------------------------------------- main

def _numbers(text: str, kind) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def add_load_arguments(parser: argparse.ArgumentParser, duration_s: float, concurrency_help: str,
                       auto_rates_of: str) -> None:
    """The load's options, shared with bench_llm_peers: points, rates, output length, seed."""
    parser.add_argument("--duration-s", type=float, default=duration_s, help="measured seconds per closed-loop point")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="unmeasured seconds before each closed-loop point")
    parser.add_argument("--concurrency", default="1,8,32", help=concurrency_help)
    parser.add_argument("--rates", default="auto",
                        help="open-loop Poisson rates in requests/s, comma-separated; 'auto': "
                             f"{', '.join(f'{f:g}' for f in AUTO_RATE_FRACTIONS)} x {auto_rates_of}")
    parser.add_argument("--open-loop-s", type=float, help="seconds of arrivals per rate (default: --duration-s)")
    parser.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    parser.add_argument("--seed", type=int, default=0, help="prompts and arrival times")


def finish_load_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Parses the lists and checks the load's options in place (parser.error on bad ones)."""
    args.concurrency = sorted(set(_numbers(args.concurrency, int)))
    args.rates = None if args.rates.strip() == "auto" else _numbers(args.rates, float)
    args.open_loop_s = args.open_loop_s or args.duration_s
    # Overloaded rates leave a queue: wait this long for it after the arrivals stop, then cancel.
    args.drain_timeout_s = max(30.0, args.open_loop_s)
    if not args.concurrency or min(args.concurrency) < 1:
        parser.error("--concurrency: positive integers")
    if args.rates is not None and (not args.rates or min(args.rates) <= 0):
        parser.error("--rates: positive numbers, or auto")
    if args.max_tokens < 1 or args.duration_s <= 0 or args.open_loop_s <= 0:
        parser.error("--max-tokens, --duration-s and --open-loop-s must be positive")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_load_arguments(parser, 30.0, "closed-loop clients per point, and the static batch sizes, comma-separated",
                       "the router's best closed-loop rate")
    parser.add_argument("--worker-threads", type=int, default=0,
                        help="torch threads in the worker and the in-process runs (0: torch's default)")
    parser.add_argument("--pin", action="store_true",
                        help="servers and in-process runs on some cores, this client on the others")
    parser.add_argument("--skip-transformers", action="store_true", help="skip the transformers reference")
    parser.add_argument("--skip-engine-only", action="store_true", help="skip the in-process engine point")
    args = parser.parse_args(argv)
    finish_load_arguments(parser, args)
    return args


def run_inprocess(folder: Path, demo_config: dict, prompts: list[Prompt], args: argparse.Namespace) -> tuple:
    """transformers at each batch size, then the engine alone; both on the first max(concurrency) prompts."""
    from services.common.config import WorkerConfig
    from services.worker.loading import engine_config_for
    from services.worker.model_files import FetchedVersion

    num_prompts = max(args.concurrency)
    batch_prompts = [p.token_ids for p in prompts[:num_prompts]]
    warmup_prompts = [p.token_ids for p in prompts[num_prompts:2 * num_prompts]]
    transformers, engine_only = {}, None
    if not args.skip_transformers:
        from bench.llm_reference import load_transformers

        log.print(f"transformers generate: batch sizes {args.concurrency}, {len(batch_prompts)} prompts")
        model = load_transformers(folder)
        pad_token_id = model.generation_config.pad_token_id
        pad_token_id = model.config.eos_token_id if pad_token_id is None else pad_token_id
        transformers = measure_transformers(model, batch_prompts, warmup_prompts, args.concurrency, args.max_tokens,
                                            int(pad_token_id), args.duration_s, log=log.print)
        del model
        gc.collect()
    if not args.skip_engine_only:
        log.print(f"engine only: {len(batch_prompts)} requests at once, in process")
        # The worker's own engine config: the demo's registered config, no overrides but threads.
        fetched = FetchedVersion(MODEL, 1, "generation", demo_config, folder)
        engine_config = engine_config_for(fetched, WorkerConfig(model_name=MODEL, num_threads=args.worker_threads))
        engine_only = measure_engine_only(engine_config, batch_prompts, warmup_prompts, args.max_tokens)
        log.print(f"  engine only: {engine_only['output_tokens_per_s']:.1f} tok/s, "
                  f"decode step p50 {format_ms(engine_only['decode_step_p50_ms'])} ms")
        gc.collect()
    return transformers, engine_only


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the stack is stopped either way.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    created = datetime.now(timezone.utc)
    machine = machine_info(("torch", "transformers", "tokenizers", "grpcio", "numpy"))
    server_cpus, client_cpus = split_cpus(args.pin)
    if args.pin and not server_cpus:
        log.print("[yellow]--pin needs at least 2 usable cores; not pinning[/yellow]")

    from services.launcher import LLM_DEMO, demo_models

    # One home for the whole run: the GGUF is imported once, here, and `up` reuses the import. The
    # stack removes the home when all went well; the import (~0.5 GB) goes in any case.
    home = Path(tempfile.mkdtemp(prefix="tensoryard-bench-llm-"))
    try:
        demo = next(m for m in demo_models(home) if m.name == LLM_DEMO)
        prompts = make_prompts(demo.folder, max(NUM_PROMPTS, 2 * max(args.concurrency)), args.seed)
        log.print(f"{len(prompts)} prompts, {prompt_stats(prompts)['mean_tokens']:.0f} tokens on average")

        with cpu_affinity(server_cpus):
            torch_num_threads = set_torch_threads(args.worker_threads)
            transformers, engine_only = run_inprocess(demo.folder, demo.config, prompts, args)
        reference_tokens = (transformers[1]["first_request_token_ids"] if 1 in transformers
                            else engine_only and engine_only["first_request_token_ids"])

        log.print("starting tensoryard up ...")
        with running_stack(args.worker_threads, server_cpus, home=home) as stack:
            targets = {"router": stack.router, "direct": worker_address(stack.registry, MODEL)}
            log.print(f"ready: router {targets['router']}, worker {targets['direct']}")
            with cpu_affinity(client_cpus):
                serving = asyncio.run(measure_serving(targets, prompts, args, reference_tokens))
    finally:
        shutil.rmtree(home / "imports", ignore_errors=True)
        with contextlib.suppress(OSError):
            home.rmdir()  # when nothing else is left in it

    simulated = simulate(transformers, serving) if transformers else []
    report = {
        "benchmark": "llm",
        "model": MODEL,
        "created_utc": created.isoformat(),
        "machine": {**machine, "load_avg_1_5_15m_at_end": list(os.getloadavg())},
        "options": vars(args),
        "pinning": {"server_cpus": sorted(server_cpus or []), "client_cpus": sorted(client_cpus or [])},
        "prompts": prompt_stats(prompts),
        "torch_num_threads": torch_num_threads,
        "check": {**serving["check"], "engine_only_greedy_tokens_matching_transformers": _matching(
            engine_only and engine_only["first_request_token_ids"],
            transformers.get(1, {}).get("first_request_token_ids"))},
        "transformers": transformers,
        "engine_only": engine_only,
        "serving": {k: v for k, v in serving.items() if k not in ("arrivals_s", "check")},
        "static_batching_simulated": simulated,
        "comparisons": compare(serving, transformers, engine_only, simulated, args.concurrency),
    }
    print_tables(report)
    log.print(f"wrote {write_json(report, created, 'llm')}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log.print("interrupted; the stack was stopped")
        sys.exit(130)
