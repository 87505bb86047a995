"""SmolLM2-135M by weight dtype (float32, bfloat16, int8 and int4 weight-only): decode steps and
whole requests.

The engine itself (LLMEngine.step: runner, model, sampler), one engine per dtype in one process
with `--threads` torch threads and `--backend` kernels (auto: the serving default). They take
turns, so load from elsewhere on the machine falls on all of them alike and the ratios hold:
- decode steps: `--batch-sizes` sequences of `--prompt-tokens` tokens each, all past their prefill,
  a step each per round; each one's median over `--steps` rounds after `--warmup`;
- whole requests (`--request-tokens N`): one request at a time, a `--prompt-tokens` prompt and N
  output tokens, a request each per round over `--requests` rounds: the median request time
  (prefill and decode, what c=1 tok/s measures) and time to first token.
Prints the figures and ratios (to float32; requests also to bfloat16) and writes
bench/results/dtypes-<UTC>.json.

    .venv/bin/python -m bench.bench_dtypes [--threads 2] [--batch-sizes 1,32] [--request-tokens 64]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.machine import machine_info
from bench.result_files import write_json
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampler import SamplingParams
from services.worker.engine_settings import weight_bytes
from services.worker.models.gguf_import import find_demo_gguf, import_gguf

DTYPES = (("float32", "auto"), ("bfloat16", "auto"), ("int8", "auto"), ("int4", "auto"))


def decoding_engine(folder: Path, weight_dtype: str, kv_cache_dtype: str, batch_size: int, prompt_tokens: int,
                    max_steps: int, backend: str) -> LLMEngine:
    """An engine whose batch_size sequences are all past their prefill: each step decodes one token each."""
    engine = LLMEngine(EngineConfig(
        model_dir=str(folder), weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype, backend=backend,
        max_model_len=prompt_tokens + max_steps + 8,
        cache=CacheConfig(kv_cache_memory_bytes=128 * 2**20, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=batch_size, max_num_batched_tokens=max(2048, prompt_tokens)),
    ))
    params = SamplingParams(temperature=0.0, max_tokens=max_steps + 4, ignore_eos=True)
    for i in range(batch_size):
        engine.add_request(f"b{i}", [100 + (i * 7 + j) % 5000 for j in range(prompt_tokens)], params)
    while engine.stats().num_queued_prompt_tokens:
        engine.step()  # prefill (and its first token)
    return engine


def step_times_s(engines: dict[str, LLMEngine], warmup: int, steps: int) -> dict[str, float]:
    """Median decode step per engine. The engines take turns, one step each per round, so load from
    other processes on the machine falls on all of them alike and the ratios hold."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_index in range(warmup + steps):
        for name, engine in engines.items():
            started = time.perf_counter()
            engine.step()
            if round_index >= warmup:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def request_times_s(engines: dict[str, LLMEngine], prompts: list[list[int]], output_tokens: int,
                    warmup: int) -> dict[str, tuple[float, float]]:
    """(median request time, median time to first token) per engine, one greedy request at a time.
    Round r gives every engine the same prompt, prompts[r % len(prompts)]."""
    params = SamplingParams(temperature=0.0, max_tokens=output_tokens, ignore_eos=True)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in engines}
    for round_index in range(warmup + len(prompts)):
        for name, engine in engines.items():
            started = time.perf_counter()
            engine.add_request(f"q{round_index}", prompts[round_index % len(prompts)], params)
            first_token_s = None
            while engine.has_unfinished():
                outputs = engine.step()
                if first_token_s is None and any(o.new_token_ids for o in outputs):
                    first_token_s = time.perf_counter() - started
            if round_index >= warmup:
                times[name].append((time.perf_counter() - started, first_token_s))
    return {name: (statistics.median(t for t, _ in values), statistics.median(f for _, f in values))
            for name, values in times.items()}


def request_rows(folder: Path, args) -> list[dict]:
    engines = {weight_dtype: LLMEngine(EngineConfig(
        model_dir=str(folder), weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype, backend=args.backend,
        max_model_len=args.prompt_tokens + args.request_tokens + 8,
        cache=CacheConfig(kv_cache_memory_bytes=64 * 2**20, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=max(2048, args.prompt_tokens)),
    )) for weight_dtype, kv_cache_dtype in DTYPES}
    prompts = [[100 + (r * 13 + j * 7) % 5000 for j in range(args.prompt_tokens)] for r in range(args.requests)]
    medians = request_times_s(engines, prompts, args.request_tokens, args.warmup)
    bf16_s = medians["bfloat16"][0]
    return [{"weight_dtype": name, "kv_cache_dtype": engines[name].dtypes.kv_cache_dtype_name,
             "request_ms": round(total_s * 1e3, 1), "ttft_ms": round(first_s * 1e3, 1),
             "tokens_per_s": round(args.request_tokens / total_s, 2), "speedup_vs_bfloat16": round(bf16_s / total_s, 3)}
            for name, (total_s, first_s) in medians.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--backend", default="auto", help="the engine's kernels (auto: as served)")
    parser.add_argument("--request-tokens", type=int, default=0,
                        help="also time whole requests with this many output tokens (0: decode steps only)")
    parser.add_argument("--requests", type=int, default=12, help="timed rounds of whole requests")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    created = datetime.now(timezone.utc)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = import_gguf(find_demo_gguf(), Path(tmp) / "smollm2")
        for batch_size in batch_sizes:
            engines = {weight_dtype: decoding_engine(folder, weight_dtype, kv_cache_dtype, batch_size,
                                                     args.prompt_tokens, args.warmup + args.steps, args.backend)
                       for weight_dtype, kv_cache_dtype in DTYPES}
            medians = step_times_s(engines, args.warmup, args.steps)
            for weight_dtype, kv_cache_dtype in DTYPES:
                rows.append({"weight_dtype": weight_dtype,
                             "kv_cache_dtype": engines[weight_dtype].dtypes.kv_cache_dtype_name,
                             "batch_size": batch_size, "decode_step_ms": round(medians[weight_dtype] * 1e3, 2),
                             "weight_bytes": weight_bytes(engines[weight_dtype].runner.model)})
            del engines
            gc.collect()
        requests = request_rows(folder, args) if args.request_tokens else []
    base = {r["batch_size"]: r for r in rows if r["weight_dtype"] == "float32"}
    for r in rows:
        r["step_time_vs_float32"] = round(r["decode_step_ms"] / base[r["batch_size"]]["decode_step_ms"], 3)
        r["speedup_vs_float32"] = round(base[r["batch_size"]]["decode_step_ms"] / r["decode_step_ms"], 3)
        r["weight_bytes_vs_float32"] = round(r["weight_bytes"] / base[r["batch_size"]]["weight_bytes"], 3)
    print(f"{'weights':>9} {'batch':>5} {'step ms':>8} {'speedup':>8} {'bytes':>6}")
    for r in rows:
        print(f"{r['weight_dtype']:>9} {r['batch_size']:>5} {r['decode_step_ms']:>8.1f} "
              f"{r['speedup_vs_float32']:>7.2f}x {r['weight_bytes_vs_float32']:>6.2f}")
    if requests:
        print(f"\nwhole requests: {args.prompt_tokens}-token prompts, {args.request_tokens} output tokens, "
              f"one at a time, {args.requests} rounds")
        print(f"{'weights':>9} {'request ms':>10} {'TTFT ms':>8} {'tok/s':>7} {'vs bf16':>8}")
        for r in requests:
            print(f"{r['weight_dtype']:>9} {r['request_ms']:>10.1f} {r['ttft_ms']:>8.1f} {r['tokens_per_s']:>7.1f} "
                  f"{r['speedup_vs_bfloat16']:>7.2f}x")
    report = {
        "benchmark": "dtypes", "created_utc": created.isoformat(), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "threads": args.threads, "backend": args.backend, "prompt_tokens": args.prompt_tokens, "steps": args.steps,
        "rows": rows, "request_tokens": args.request_tokens, "requests": requests,
        "machine": machine_info(("torch",)), "load_avg_1_5_15m_at_end": list(os.getloadavg()),
    }
    print(write_json(report, created, "dtypes"))


if __name__ == "__main__":
    main()
