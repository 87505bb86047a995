"""CPU decode attention: the torch path (gather + SDPA) against the compiled paged decode kernel.

    .venv/bin/python -m bench.bench_decode_attention_cpu [--rounds 15] [--generated 32] [--threads N]
        [--dtypes float32,bfloat16] [--skip-step] [--step-tokens 32] [--with-inductor] [--seed 0]

1. Attention alone, SmolLM2-135M's shapes: 32 decode sequences, prompts of 40..300 tokens (uniform,
   fixed seed) plus --generated tokens, 9 query heads over 3 KV heads, head dim 64, blocks of 16
   scattered through one [30 layers, 2, blocks, 16, 3, 64] pool as the engine allocates it. One
   "step" is what a decode step spends in attention: fresh metadata (so each path plans once, as in
   the engine), then 30 layers' calls. The paths alternate round by round; per path the median
   and minimum step over --rounds, and the ratio. The torch path's gather alone is timed too, and
   with --with-inductor torch.compile's C++ code for a gather-free formulation (the alternative to
   a hand-written kernel).
2. A whole decode step (unless --skip-step): the SmolLM2 demo imported, an in-process LLMEngine with
   the worker's config and backend "torch" or "auto" (the kernel), 32 prompts of the chat benchmark
   added at once, greedy for --step-tokens tokens; the p50 of the steps in which all 32 decode, and
   whether both paths produced the same tokens.

Prints a table and writes bench/results/decode-attention-cpu-<UTC>.json. The machine is shared:
the load average at start and end is recorded, and medians are what to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import shutil
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench.machine import machine_info
from bench.result_files import write_json
from kernels import paged_decode_cpu, paged_decode_cpu_build
from kernels.attention_torch import _gather, paged_attention_cpu, paged_attention_torch
from kernels.ops import AttentionMetadata

NUM_LAYERS, NUM_SEQS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 32, 9, 3, 64, 16
MIN_PROMPT, MAX_PROMPT = 40, 300
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PATHS = {"torch_gather_sdpa": paged_attention_torch, "kernel": paged_attention_cpu}


def make_step(dtype: torch.dtype, generated: int, seed: int):
    """The pool, one layer's q and the step's metadata fields for 32 decode rows."""
    generator = torch.Generator().manual_seed(seed)
    lens = (torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (NUM_SEQS,), generator=generator) + generated).tolist()
    blocks = [-(-n // BLOCK_SIZE) for n in lens]
    num_blocks = sum(blocks) + 64
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = torch.zeros(NUM_SEQS, max(blocks), dtype=torch.int32)
    taken = 0
    for b, n in enumerate(blocks):
        tables[b, :n] = torch.tensor(order[taken : taken + n], dtype=torch.int32)
        taken += n
    pool = torch.randn(NUM_LAYERS, 2, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    q = torch.randn(NUM_SEQS, NUM_HEADS, HEAD_DIM, generator=generator).to(dtype)
    return pool, q, tables, lens


def metadata_for(tables: torch.Tensor, lens: list[int]) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=torch.zeros(NUM_SEQS, dtype=torch.int64),
        cu_seqlens_q=torch.arange(NUM_SEQS + 1, dtype=torch.int32),
        context_lens=torch.tensor(lens, dtype=torch.int32),
        block_tables=tables,
        max_seqlen_q=1,
        max_context_len=max(lens),
    )


def attention_step_s(path, pool, q, tables, lens) -> tuple[float, float]:
    """(wall, process CPU) seconds of one step's attention. CPU time is the figure to read on a
    loaded machine at one thread: it leaves out the time other processes held the cores."""
    metadata = metadata_for(tables, lens)
    start, start_cpu = time.perf_counter(), time.process_time()
    for layer in range(NUM_LAYERS):
        path(q, pool[layer, 0], pool[layer, 1], metadata, HEAD_DIM**-0.5)
    return time.perf_counter() - start, time.process_time() - start_cpu


def gather_step_s(pool, tables, lens) -> tuple[float, float]:
    """The torch path's copies alone: every layer's K and V blocks into per-step buffers."""
    num_blocks = -(-max(lens) // BLOCK_SIZE)
    block_ids = tables[:, :num_blocks].long().reshape(-1)
    buffer = pool.new_empty(block_ids.numel(), pool[0, 0, 0].numel())
    start, start_cpu = time.perf_counter(), time.process_time()
    for layer in range(NUM_LAYERS):
        for kv in (0, 1):
            _gather(pool[layer, kv], block_ids, NUM_SEQS, max(lens), buffer)
    return time.perf_counter() - start, time.process_time() - start_cpu


def summary(samples: list[tuple[float, float]]) -> dict:
    walls, cpus = [w for w, _ in samples], [c for _, c in samples]
    return {"step_p50_ms": statistics.median(walls) * 1e3, "step_min_ms": min(walls) * 1e3,
            "step_cpu_p50_ms": statistics.median(cpus) * 1e3}


def inductor_gatherless(q, k_cache, v_cache, metadata: AttentionMetadata, scale: float, sliding_window=None):
    """torch's compiled C++ path, the alternative to the kernel: decode attention written with the
    block-table gather as an index expression that inductor may fuse into the reductions (decode
    rows only, no sliding window). Compiled with dynamic shapes, so one compile serves all lengths."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    positions = torch.arange(metadata.max_context_len)
    out = _compiled_gatherless()(q.view(num_rows, num_kv_heads, num_heads // num_kv_heads, head_dim), k_cache,
                                 v_cache, metadata.block_tables, metadata.context_lens, positions, scale)
    return out.reshape(num_rows, num_heads, head_dim)


@functools.cache
def _compiled_gatherless():
    def attend(q, k_cache, v_cache, block_tables, lens, positions, scale):
        num_kv_heads, head_dim = q.shape[1], q.shape[3]
        slots = block_tables[:, positions // BLOCK_SIZE].long() * BLOCK_SIZE + positions % BLOCK_SIZE  # [B, L]
        k = k_cache.view(-1, num_kv_heads, head_dim)[slots].float()  # [B, L, Hkv, D]
        v = v_cache.view(-1, num_kv_heads, head_dim)[slots].float()
        scores = (q.float()[:, None] * k[:, :, :, None, :]).sum(-1) * scale  # [B, L, Hkv, group]
        scores = scores.masked_fill((positions[None, :] >= lens[:, None])[:, :, None, None], float("-inf"))
        probs = torch.softmax(scores, dim=1)
        return (probs[..., None] * v[:, :, :, None, :]).sum(1).to(q.dtype)  # [B, Hkv, group, D]

    return torch.compile(attend, dynamic=True)


def measure_attention(dtype_name: str, args) -> dict:
    pool, q, tables, lens = make_step(DTYPES[dtype_name], args.generated, args.seed)
    paths = dict(PATHS)
    compile_s = None
    if args.with_inductor:
        started = time.perf_counter()
        inductor_gatherless(q, pool[0, 0], pool[0, 1], metadata_for(tables, lens), HEAD_DIM**-0.5)
        compile_s = time.perf_counter() - started
        paths["inductor_gatherless"] = inductor_gatherless
    want = paged_attention_torch(q, pool[0, 0], pool[0, 1], metadata_for(tables, lens), HEAD_DIM**-0.5)
    got = paged_attention_cpu(q, pool[0, 0], pool[0, 1], metadata_for(tables, lens), HEAD_DIM**-0.5)
    max_abs_diff = (got.float() - want.float()).abs().max().item()
    for path in paths.values():  # warm-up: allocator, thread pool, caches
        attention_step_s(path, pool, q, tables, lens)
    times = {name: [] for name in paths}
    gathers = []
    for _ in range(args.rounds):
        for name, path in paths.items():
            times[name].append(attention_step_s(path, pool, q, tables, lens))
        gathers.append(gather_step_s(pool, tables, lens))
    result = {name: summary(t) for name, t in times.items()}
    if compile_s is not None:
        result["inductor_gatherless"]["first_call_compile_s"] = compile_s
    result["torch_gather_only"] = summary(gathers)
    torch_p50, kernel_p50 = result["torch_gather_sdpa"]["step_p50_ms"], result["kernel"]["step_p50_ms"]
    kv_bytes = 2 * NUM_LAYERS * sum(lens) * NUM_KV_HEADS * HEAD_DIM * pool.element_size()
    return {**result, "kernel_speedup_p50": torch_p50 / kernel_p50,
            "kernel_speedup_cpu_p50": (result["torch_gather_sdpa"]["step_cpu_p50_ms"]
                                       / result["kernel"]["step_cpu_p50_ms"]),
            "max_abs_diff_vs_torch": max_abs_diff,
            "context_lens_mean": statistics.mean(lens), "kv_bytes_read_per_step": kv_bytes,
            "kernel_gb_per_s": kv_bytes / (kernel_p50 / 1e3) / 1e9}


def decode_steps(engine, prompts: list[list[int]], num_output_tokens: int) -> tuple[list, list[list[int]]]:
    """All prompts added at once, stepped until done; (wall, process CPU) seconds of each step in
    which all 32 sequences decode (no prefill), and every request's tokens."""
    from services.worker.engine.sampler import SamplingParams

    params = SamplingParams(max_tokens=num_output_tokens, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    steps = []
    while engine.has_unfinished():
        all_decoding = all(tokens.values())  # every request has its first token: this step only decodes
        start, start_cpu = time.perf_counter(), time.process_time()
        outputs = engine.step()
        if all_decoding and len(outputs) == len(prompts):
            steps.append((time.perf_counter() - start, time.process_time() - start_cpu))
        for output in outputs:
            tokens[output.request_id] += output.new_token_ids
    return steps, list(tokens.values())


def measure_whole_step(args) -> dict:
    """The demo SmolLM2 in an in-process engine, backend torch and auto, same prompts."""
    from bench.bench_llm import make_prompts
    from services.common.config import WorkerConfig
    from services.launcher import LLM_DEMO, demo_models
    from services.worker.engine.engine import LLMEngine
    from services.worker.loading import engine_config_for
    from services.worker.model_files import FetchedVersion

    home = Path(tempfile.mkdtemp(prefix="tensoryard-bench-decode-"))
    try:
        demo = next(m for m in demo_models(home) if m.name == LLM_DEMO)
        prompts = [p.token_ids for p in make_prompts(demo.folder, 2 * NUM_SEQS, args.seed)]
        fetched = FetchedVersion(LLM_DEMO, 1, "generation", demo.config, demo.folder)
        base = engine_config_for(fetched, WorkerConfig(model_name=LLM_DEMO, num_threads=args.threads))
        results, tokens = {}, {}
        for backend in ("torch", "auto"):
            engine = LLMEngine(dataclasses.replace(base, backend=backend))
            decode_steps(engine, prompts[NUM_SEQS:], 2)  # warm-up on other prompts (no prefix hits)
            steps, tokens[backend] = decode_steps(engine, prompts[:NUM_SEQS], args.step_tokens)
            results[backend] = summary(steps)
            del engine
            print(f"  whole step, backend {backend}: decode step p50 {results[backend]['step_p50_ms']:.1f} ms wall, "
                  f"{results[backend]['step_cpu_p50_ms']:.1f} ms CPU")
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return {
        "num_seqs": NUM_SEQS, "output_tokens": args.step_tokens,
        "mean_prompt_tokens": statistics.mean(len(p) for p in prompts[:NUM_SEQS]),
        "torch": results["torch"], "kernel": results["auto"],
        "kernel_speedup_p50": results["torch"]["step_p50_ms"] / results["auto"]["step_p50_ms"],
        "kernel_speedup_cpu_p50": results["torch"]["step_cpu_p50_ms"] / results["auto"]["step_cpu_p50_ms"],
        "greedy_tokens_identical": tokens["torch"] == tokens["auto"],
        "greedy_tokens_agreeing": sum(a == b for t, k in zip(tokens["torch"], tokens["auto"]) for a, b in zip(t, k)),
        "greedy_tokens_total": sum(len(t) for t in tokens["torch"]),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15, help="measured steps per path and dtype")
    parser.add_argument("--generated", type=int, default=32, help="tokens generated so far, added to each prompt")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="cache (and q) dtypes, comma-separated")
    parser.add_argument("--skip-step", action="store_true", help="attention alone, no whole decode step")
    parser.add_argument("--step-tokens", type=int, default=32, help="output tokens per request in the whole step")
    parser.add_argument("--with-inductor", action="store_true",
                        help="also torch.compile's C++ path on a gather-free formulation (compiles ~30 s)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    created = datetime.now(timezone.utc)
    machine = machine_info(("torch",))
    torch.set_num_threads(args.threads)
    if paged_decode_cpu.load(build=True) is None:
        print(f"the CPU decode kernel is not available: {paged_decode_cpu.unavailable_reason()}")
        return 1
    attention = {}
    for dtype_name in args.dtypes.split(","):
        attention[dtype_name] = row = measure_attention(dtype_name, args)
        for clock, key, ratio in (("wall", "step_p50_ms", "kernel_speedup_p50"),
                                  ("cpu", "step_cpu_p50_ms", "kernel_speedup_cpu_p50")):
            print(f"{dtype_name:9s} {clock:4s} 30 layers x 32 seqs: "
                  f"torch gather+SDPA {row['torch_gather_sdpa'][key]:6.1f}"
                  f" ms (gather alone {row['torch_gather_only'][key]:5.1f}), kernel {row['kernel'][key]:5.1f} ms:"
                  f" {row[ratio]:.2f}x" + (f"; inductor gather-free {row['inductor_gatherless'][key]:6.1f} ms"
                                           if "inductor_gatherless" in row else ""))
        if "inductor_gatherless" in row:
            print(f"{'':9s} inductor compile on first call {row['inductor_gatherless']['first_call_compile_s']:.1f} s")
    whole_step = None if args.skip_step else measure_whole_step(args)
    report = {
        "benchmark": "decode-attention-cpu",
        "created_utc": created.isoformat(),
        "machine": {**machine, "load_avg_1_5_15m_at_end": list(os.getloadavg())},
        "options": vars(args),
        "torch_num_threads": torch.get_num_threads(),
        "kernel": {"isa": paged_decode_cpu_build.isa_level()[0],
                   "library": paged_decode_cpu_build.library_path().name},
        "shapes": {"num_layers": NUM_LAYERS, "num_seqs": NUM_SEQS, "num_heads": NUM_HEADS,
                   "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE,
                   "prompt_tokens": [MIN_PROMPT, MAX_PROMPT], "generated": args.generated},
        "attention_step": attention,
        "whole_decode_step": whole_step,
    }
    print(f"wrote {write_json(report, created, 'decode-attention-cpu')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
