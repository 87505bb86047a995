"""The GPU backend's Triton kernels against the memory limit: achieved bandwidth as a fraction of the
device's copy bandwidth, measured in the same run, and speed-up over the torch reference.

    .venv/bin/python -m bench.bench_kernels [--tokens 1,32,128,4096] [--contexts 1024,4096]
        [--decode-batch 64] [--dtype bfloat16] [--only rmsnorm,rope,...] [--out-dir DIR] [--smoke]

1. Copy bandwidth: a 1 GiB device-to-device copy (read + write: 2 GiB moved per call).
2. Each kernel at Llama-8B shapes (hidden 4096, 32 query / 8 KV heads of 128, intermediate 14336)
   for --tokens rows: RMSNorm with the residual add, LayerNorm with the residual add (post-norm:
   the sum is not stored), rotary embedding (neox, q/k views of a fused qkv buffer, llama3-scaled
   table), SiLU-and-mul, GELU(tanh)-and-mul, the KV-cache write (scattered slots, blocks of 16).
   Bytes moved are the compulsory traffic (bench/kernel_traffic.py): bandwidth = bytes / time.
3. The attention kernels where their modules exist (a missing or failing one is reported in its
   row, not fatal): paged decode at --decode-batch sequences of each --contexts length, and the
   varlen paged prefill of 4 prompts of 1024 tokens (reported in TFLOP/s: it is compute-bound).

Each row also times the torch reference the torch backend serves with (rmsnorm_torch, layernorm_ref,
rope_ref, *_and_mul_ref, write_kv_ref, paged_attention_torch) for the speed-up, and records the
largest difference of the kernel's output from it. Timing: triton.testing.do_bench, median, with
L2 flushed before every call, so small sizes are not served from a warm cache.

Targets (issue 14): norms, rotary and activations >= 80% of copy bandwidth, paged decode >= 70% at
context >= 1k. They are judged where a kernel can be bandwidth-bound: elementwise rows at >= 4096
tokens (below that a call moves a few MB, which launch latency dominates), decode rows at context
>= 1024; the KV write and prefill have none. Prints a table; writes
bench/results/kernels-<UTC>/results.json and, where matplotlib is installed, bandwidth.png.

--smoke runs tiny shapes on CPU under triton's interpreter: it checks the script end to end; its
figures mean nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import kernel_traffic as traffic
from bench.kernel_cases import (DECODE_TARGET, ELEMENTWISE_TARGET, TARGET_MIN_CONTEXT, TARGET_MIN_TOKENS,
                                CaseBuilder)
from bench.machine import machine_info
from bench.result_files import RESULTS_DIR

ELEMENTWISE = ("rmsnorm", "layernorm", "rope", "silu_and_mul", "gelu_tanh_and_mul", "write_kv")
ATTENTION = ("decode_attention", "prefill_attention")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PREFILL_PROMPTS = [1024] * 4


def time_ms(fn, device: torch.device, smoke: bool) -> float:
    """Median milliseconds a call; on CUDA with do_bench (warm-up, L2 flushed before each call)."""
    if smoke:  # the interpreter: one call after a warm-up one, wall clock
        fn()
        started = time.perf_counter()
        fn()
        return (time.perf_counter() - started) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device: torch.device, num_bytes: int, smoke: bool) -> dict:
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, smoke)
    moved = traffic.copy_bytes(num_bytes)
    return {"buffer_bytes": num_bytes, "bytes_moved": moved, "ms": ms, "gb_per_s": moved / ms / 1e6}


def build_cases(builder, args) -> list:
    """(kernel, size, Case | Exception) for every selected kernel and size."""
    sizes = {name: [(n,) for n in args.tokens] for name in ELEMENTWISE}
    sizes["decode_attention"] = [(args.decode_batch, c) for c in args.contexts]
    sizes["prefill_attention"] = [(args.prefill_prompts,)]
    built = []
    for name in args.only:
        for size in sizes[name]:
            try:
                built.append((name, size, getattr(builder, name)(*size)))
            except Exception as error:  # a kernel module not there (yet), or failing to build its inputs
                built.append((name, size, error))
    return built


def measure(case, copy_gb_per_s: float, device: torch.device, smoke: bool) -> dict:
    row = {"kernel": case.kernel, "size": case.size, "bytes_moved": case.bytes_moved, "target": case.target}
    row["max_abs_diff_vs_torch"] = case.max_abs_diff()  # first call: compiles, and checks the result
    row["kernel_us"] = time_ms(case.run, device, smoke) * 1e3
    row["torch_us"] = time_ms(case.reference, device, smoke) * 1e3
    row["speedup_vs_torch"] = row["torch_us"] / row["kernel_us"]
    row["gb_per_s"] = case.bytes_moved / row["kernel_us"] / 1e3
    row["fraction_of_copy"] = row["gb_per_s"] / copy_gb_per_s
    if case.flops is not None:
        row["tflop_per_s"] = case.flops / row["kernel_us"] / 1e6
    row["meets_target"] = None if case.target is None else row["fraction_of_copy"] >= case.target
    return row


def print_table(copy: dict, rows: list[dict]) -> None:
    print(f"copy bandwidth: {copy['gb_per_s']:.0f} GB/s ({copy['buffer_bytes'] >> 20} MiB device-to-device)")
    print(f"{'kernel':<18} {'size':<22} {'MB':>8} {'us':>9} {'GB/s':>7} {'of copy':>8} {'target':>7} "
          f"{'met':>4} {'torch us':>9} {'speedup':>8} {'max diff':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['kernel']:<18} {r['size']:<22} not measured: {r['error']}")
            continue
        target = "-" if r["target"] is None else f"{r['target']:.0%}"
        met = {None: "-", True: "yes", False: "NO"}[r["meets_target"]]
        extra = f"  {r['tflop_per_s']:.1f} TFLOP/s" if "tflop_per_s" in r else ""
        print(f"{r['kernel']:<18} {r['size']:<22} {r['bytes_moved'] / 1e6:>8.2f} {r['kernel_us']:>9.1f} "
              f"{r['gb_per_s']:>7.0f} {r['fraction_of_copy']:>8.1%} {target:>7} {met:>4} {r['torch_us']:>9.1f} "
              f"{r['speedup_vs_torch']:>7.2f}x {r['max_abs_diff_vs_torch']:>9.2e}{extra}")


def plot(rows: list[dict], title: str, path: Path) -> Path | None:
    """Fraction of copy bandwidth per row, the targets drawn; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    measured = [r for r in rows if "fraction_of_copy" in r and "tflop_per_s" not in r]
    colors = {True: "tab:green", False: "tab:red", None: "tab:gray"}
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(measured) + 1.5))
    labels = [f"{r['kernel']} {r['size']}" for r in measured]
    ax.barh(labels, [r["fraction_of_copy"] for r in measured], color=[colors[r["meets_target"]] for r in measured])
    for target, style in ((ELEMENTWISE_TARGET, "--"), (DECODE_TARGET, ":")):
        ax.axvline(target, color="black", linestyle=style, linewidth=1, label=f"target {target:.0%}")
    ax.invert_yaxis()
    ax.set_xlim(0, max([1.05] + [r["fraction_of_copy"] * 1.05 for r in measured]))
    ax.set_xlabel("achieved bandwidth / copy bandwidth (gray: no target at this size)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", default="1,32,128,4096", help="rows for the elementwise kernels")
    parser.add_argument("--contexts", default="1024,4096", help="context lengths for decode attention")
    parser.add_argument("--decode-batch", type=int, default=64)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--only", default=",".join(ELEMENTWISE + ATTENTION), help="kernels to run, comma-separated")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where the kernels-<UTC> folder goes")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU under triton's interpreter")
    args = parser.parse_args(argv)
    args.tokens = [int(t) for t in args.tokens.split(",")]
    args.contexts = [int(c) for c in args.contexts.split(",")]
    args.only = [k.strip() for k in args.only.split(",") if k.strip()]
    unknown = sorted(set(args.only) - set(ELEMENTWISE + ATTENTION))
    if unknown:
        parser.error(f"--only: unknown kernels {unknown}; known: {', '.join(ELEMENTWISE + ATTENTION)}")
    args.prefill_prompts = PREFILL_PROMPTS
    if args.smoke:
        args.tokens, args.contexts, args.decode_batch, args.prefill_prompts = [1, 3], [40], 2, [5, 3]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:
        # Read by triton when a kernel is decorated, so before kernels/ is first imported.
        os.environ["TRITON_INTERPRET"] = "1"
        device, shapes, copy_size = torch.device("cpu"), traffic.SMOKE, 1 << 24
    elif not torch.cuda.is_available():
        sys.exit("bench_kernels measures GPU kernels and needs a CUDA device (torch.cuda.is_available() is "
                 "False here); --smoke checks the script on CPU under triton's interpreter")
    else:
        device, shapes, copy_size = torch.device("cuda"), traffic.LLAMA_8B, 1 << 30
    created = datetime.now(timezone.utc)
    copy = copy_bandwidth(device, copy_size, args.smoke)
    rows = []
    for name, size, case in build_cases(CaseBuilder(shapes, DTYPES[args.dtype], device), args):
        try:
            if isinstance(case, Exception):
                raise case
            rows.append(measure(case, copy["gb_per_s"], device, args.smoke))
        except Exception as error:  # reported in its row; the other kernels still run
            rows.append({"kernel": name, "size": " ".join(map(str, size)), "error": f"{type(error).__name__}: {error}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_table(copy, rows)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (triton interpreter)"
    folder = args.out_dir / f"kernels-{created.strftime('%Y%m%dT%H%M%SZ')}"
    folder.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "kernels", "created_utc": created.isoformat(), "device": device_name, "dtype": args.dtype,
        "smoke": args.smoke, "shapes": dataclasses.asdict(shapes),
        "targets": {"elementwise": {"fraction_of_copy": ELEMENTWISE_TARGET, "min_tokens": TARGET_MIN_TOKENS},
                    "decode_attention": {"fraction_of_copy": DECODE_TARGET, "min_context": TARGET_MIN_CONTEXT}},
        "copy": copy, "rows": rows, "machine": machine_info(("torch", "triton")),
    }
    (folder / "results.json").write_text(json.dumps(report, indent=2) + "\n")
    print(folder / "results.json")
    picture = plot(rows, f"Triton kernels, {device_name}, {args.dtype}", folder / "bandwidth.png")
    if picture:
        print(picture)


if __name__ == "__main__":
    main()
