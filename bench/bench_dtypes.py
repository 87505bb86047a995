"""Decode step time of SmolLM2-135M by weight dtype: float32, bfloat16, int8 and int4 weight-only.

The engine itself (LLMEngine.step: runner, model, sampler) on `--batch-sizes` sequences of
`--prompt-tokens` tokens each, all past their prefill, so every timed step decodes one token per
sequence. One engine per dtype in one process with `--threads` torch threads; they take turns, a
step each per round, and each one's median over `--steps` rounds after `--warmup` is reported. Prints step times and ratios to float32 and writes
bench/results/dtypes-<UTC>.json.

    .venv/bin/python -m bench.bench_dtypes [--threads 2] [--batch-sizes 1,32]
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
from services.worker.loading import weight_bytes
from services.worker.models.gguf_import import find_demo_gguf, import_gguf

DTYPES = (("float32", "auto"), ("bfloat16", "auto"), ("int8", "auto"), ("int4", "auto"))


def decoding_engine(folder: Path, weight_dtype: str, kv_cache_dtype: str, batch_size: int, prompt_tokens: int,
                    max_steps: int) -> LLMEngine:
    """An engine whose batch_size sequences are all past their prefill: each step decodes one token each."""
    engine = LLMEngine(EngineConfig(
        model_dir=str(folder), weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype, backend="torch",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,32")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    created = datetime.now(timezone.utc)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = import_gguf(find_demo_gguf(), Path(tmp) / "smollm2")
        for batch_size in batch_sizes:
            engines = {weight_dtype: decoding_engine(folder, weight_dtype, kv_cache_dtype, batch_size,
                                                     args.prompt_tokens, args.warmup + args.steps)
                       for weight_dtype, kv_cache_dtype in DTYPES}
            medians = step_times_s(engines, args.warmup, args.steps)
            for weight_dtype, kv_cache_dtype in DTYPES:
                rows.append({"weight_dtype": weight_dtype,
                             "kv_cache_dtype": engines[weight_dtype].dtypes.kv_cache_dtype_name,
                             "batch_size": batch_size, "decode_step_ms": round(medians[weight_dtype] * 1e3, 2),
                             "weight_bytes": weight_bytes(engines[weight_dtype].runner.model)})
            del engines
            gc.collect()
    base = {r["batch_size"]: r for r in rows if r["weight_dtype"] == "float32"}
    for r in rows:
        r["step_time_vs_float32"] = round(r["decode_step_ms"] / base[r["batch_size"]]["decode_step_ms"], 3)
        r["speedup_vs_float32"] = round(base[r["batch_size"]]["decode_step_ms"] / r["decode_step_ms"], 3)
        r["weight_bytes_vs_float32"] = round(r["weight_bytes"] / base[r["batch_size"]]["weight_bytes"], 3)
    print(f"{'weights':>9} {'batch':>5} {'step ms':>8} {'speedup':>8} {'bytes':>6}")
    for r in rows:
        print(f"{r['weight_dtype']:>9} {r['batch_size']:>5} {r['decode_step_ms']:>8.1f} "
              f"{r['speedup_vs_float32']:>7.2f}x {r['weight_bytes_vs_float32']:>6.2f}")
    report = {
        "benchmark": "dtypes", "created_utc": created.isoformat(), "model": "SmolLM2-135M-Instruct (Q4_1 GGUF)",
        "threads": args.threads, "prompt_tokens": args.prompt_tokens, "steps": args.steps, "rows": rows,
        "machine": machine_info(("torch",)), "load_avg_1_5_15m_at_end": list(os.getloadavg()),
    }
    print(write_json(report, created, "dtypes"))


if __name__ == "__main__":
    main()
