"""The batching core: the CUDA kernel against the torch path, and both against per-step Python lists.

    .venv/bin/python -m bench.bench_batch_core [--iters 200] [--device cuda|cpu] [--threads 1] [--seed 0]

Persistent buffers as the runner holds them (256 slots of 4096 tokens, blocks of 16, so block
tables of 256 entries per slot) and five steps: 1, 64 and 256 decodes, 60 decodes with 4 prefill
chunks of 512 tokens over cached prefixes, and 8 whole prompts of 1024 tokens. Per step and path:
- `host_us`: what one call costs the host (Python and launches), the figure that bounds a decode
  step's pace on a GPU, since the launches do not wait for the device;
- `step_us`: calls issued back to back, then one synchronisation, per call (the pace when the
  device is the slower side; the median of 10 such chunks);
- `describe_us` (one figure per step): StepDescription.from_lists, the host packing both paths share.
Paths: `cuda` (the kernel, where CUDA and cupy are present), `torch` (the reference), both into
preallocated FlatBatchBuffers as the engine calls them, and `python_lists`, the runner's former
per-sequence loop that builds Python lists and copies each to the device.

Without CUDA it says so, and times the torch path and the lists on the CPU (the CPU serving path),
at --threads torch threads: at 2 on a loaded 2-core machine the gathers' intra-op threads stall
for milliseconds behind other processes, at 1 a call is ~50-70 us throughout.
Prints a table and writes bench/results/batch-core-<UTC>.json.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

from bench.machine import machine_info
from bench.result_files import write_json
from kernels import batch_core
from kernels.batch_core import FlatBatchBuffers, StepDescription, build_flat_batch

MAX_SLOTS, MAX_LEN, BLOCK_SIZE = 256, 4096, 16
MAX_BLOCKS = MAX_LEN // BLOCK_SIZE
# name -> [(num_computed, num_new)], one per sequence
STEPS = {
    "decode_1": [(700, 1)],
    "decode_64": [(300 + 37 * i, 1) for i in range(64)],
    "decode_256": [(200 + 13 * i, 1) for i in range(256)],
    "mixed_60d_4x512": [(300 + 37 * i, 1) for i in range(60)] + [(1024 * i, 512) for i in range(4)],
    "prefill_8x1024": [(0, 1024)] * 8,
}


def make_buffers(device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, 150_000, (MAX_SLOTS, MAX_LEN), generator=generator, dtype=torch.int32)
    block_tables = torch.randperm(MAX_SLOTS * MAX_BLOCKS, generator=generator).to(torch.int32)
    return token_ids.to(device), block_tables.view(MAX_SLOTS, MAX_BLOCKS).to(device)


def describe(shape: list[tuple[int, int]], seed: int, pin: bool) -> tuple[list, StepDescription]:
    slots = random.Random(seed).sample(range(MAX_SLOTS), len(shape))
    sample = [1 if n == 1 or c == 0 else 0 for c, n in shape]  # decodes and whole prompts; chunks mid-prompt do not
    lists = (slots, [c for c, _ in shape], [n for _, n in shape], sample)
    return lists, StepDescription.from_lists(*lists, pin_memory=pin)


def python_lists(lists, host_tokens: list[list[int]], host_tables: list[list[int]], device: torch.device):
    """The runner's former prepare(): per-sequence Python lists, each copied to the device."""
    input_ids, positions, slot_mapping, cu_seqlens, context_lens, logits_indices = [], [], [], [0], [], []
    for slot, start, num_new, sample in zip(*lists):
        end, table = start + num_new, host_tables[slot]
        input_ids.extend(host_tokens[slot][start:end])
        positions.extend(range(start, end))
        slot_mapping.extend(table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end))
        cu_seqlens.append(cu_seqlens[-1] + num_new)
        context_lens.append(end)
        if sample:
            logits_indices.append(cu_seqlens[-1] - 1)
    tables = [host_tables[slot] for slot in lists[0]]
    return [torch.tensor(values, dtype=dtype).to(device, non_blocking=True) for values, dtype in (
        (input_ids, torch.int64), (positions, torch.int64), (slot_mapping, torch.int64), (cu_seqlens, torch.int32),
        (context_lens, torch.int32), (tables, torch.int32), (logits_indices, torch.int64))]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(call, iters: int, device: torch.device) -> dict:
    for _ in range(5):  # warm-up: compile, allocator, caches
        call()
    sync(device)
    host = []
    for _ in range(iters):
        start = time.perf_counter()
        call()
        host.append(time.perf_counter() - start)
        sync(device)  # so each sample is one call's host cost, not a queue's back-pressure
    chunks = []  # back to back in 10 chunks: the median chunk, robust to another process's burst
    for _ in range(10):
        start = time.perf_counter()
        for _ in range(max(1, iters // 10)):
            call()
        sync(device)
        chunks.append((time.perf_counter() - start) / max(1, iters // 10))
    return {"host_us": statistics.median(host) * 1e6, "host_min_us": min(host) * 1e6,
            "step_us": statistics.median(chunks) * 1e6}


def measure(name: str, shape, token_ids, block_tables, host_tokens, host_tables, args, paths) -> dict:
    device = token_ids.device
    lists, desc = describe(shape, args.seed, device.type == "cuda")
    out = FlatBatchBuffers.allocate(desc.num_tokens, desc.num_seqs, MAX_BLOCKS, device)
    row = {"step": name, "num_seqs": desc.num_seqs, "num_tokens": desc.num_tokens}
    pin = device.type == "cuda"
    row["describe_us"] = timed(lambda: StepDescription.from_lists(*lists, pin_memory=pin), args.iters,
                               torch.device("cpu"))["host_us"]
    for impl in paths:
        row[impl] = timed(lambda: build_flat_batch(desc, token_ids, block_tables, BLOCK_SIZE, out, impl=impl),
                          args.iters, device)
    row["python_lists"] = timed(lambda: python_lists(lists, host_tokens, host_tables, device), args.iters, device)
    if "cuda" in paths:  # the kernel's output equals the reference's
        want = build_flat_batch(desc, token_ids, block_tables, BLOCK_SIZE, impl="torch")
        got = build_flat_batch(desc, token_ids, block_tables, BLOCK_SIZE, impl="cuda")
        row["cuda_equals_torch"] = all(torch.equal(getattr(got, f), getattr(want, f)) for f in
                                       ("input_ids", "positions", "slot_mapping", "cu_seqlens_q", "context_lens",
                                        "block_tables", "logits_indices"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    paths = ["torch"]
    if device.type == "cuda":
        reason = batch_core.cuda_unavailable_reason(device)
        if reason is not None:
            sys.exit(f"the CUDA batching core cannot run on {device}: {reason}")
        paths.insert(0, "cuda")
    else:
        print(f"No CUDA device here ({batch_core.cuda_unavailable_reason()}): the CUDA kernel needs a GPU; "
              "timing the torch path and the Python lists on the CPU.", file=sys.stderr)
    created = datetime.now(timezone.utc)
    report = {"created": created.isoformat(), "device": str(device), "torch_threads": torch.get_num_threads(),
              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
              "machine": machine_info(("torch", "cupy", "cupy-cuda12x", "cupy-cuda13x")),
              "buffers": {"max_slots": MAX_SLOTS, "max_len": MAX_LEN, "block_size": BLOCK_SIZE}, "rows": []}
    token_ids, block_tables = make_buffers(device, args.seed)
    host_tokens, host_tables = token_ids.tolist(), block_tables.tolist()
    columns = [*paths, "python_lists"]
    print(f"{'step':>16} {'seqs':>5} {'tokens':>6} {'describe':>9} "
          + " ".join(f"{c + ' host/step us':>26}" for c in columns))
    for name, shape in STEPS.items():
        row = measure(name, shape, token_ids, block_tables, host_tokens, host_tables, args, paths)
        report["rows"].append(row)
        cells = " ".join(f"{row[c]['host_us']:>12.1f} /{row[c]['step_us']:>12.1f}" for c in columns)
        print(f"{name:>16} {row['num_seqs']:>5} {row['num_tokens']:>6} {row['describe_us']:>9.1f} {cells}"
              + ("" if row.get("cuda_equals_torch", True) else "  CUDA != torch"))
    report["machine"]["load_avg_1_5_15m_at_end"] = list(os.getloadavg())
    print(write_json(report, created, "batch-core"))


if __name__ == "__main__":
    main()
