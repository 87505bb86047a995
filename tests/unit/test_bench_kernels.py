"""bench/bench_kernels.py without a GPU: its byte counts equal the sizes of the tensors each kernel
reads and writes, its arguments parse, and its --smoke run (CPU, triton's interpreter) writes a
report with a measured row for every kernel."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import kernel_traffic as traffic
from bench.bench_kernels import parse_args

REPO_ROOT = Path(__file__).resolve().parents[2]


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_norm_bytes_are_the_rows_read_and_written():
    x, residual, weight, bias = torch.empty(7, 72, dtype=torch.bfloat16), torch.empty(7, 72, dtype=torch.bfloat16), \
        torch.empty(72, dtype=torch.bfloat16), torch.empty(72, dtype=torch.bfloat16)
    out, summed = torch.empty_like(x), torch.empty_like(x)
    assert traffic.norm_bytes(7, 72, 2, residual=True) == nbytes(x, residual, weight, out, summed)
    assert traffic.norm_bytes(7, 72, 2, residual=False) == nbytes(x, weight, out)
    assert traffic.norm_bytes(7, 72, 2, residual=True, num_params=2, store_sum=False) == \
        nbytes(x, residual, weight, bias, out)


def test_rope_bytes_are_q_and_k_both_ways_plus_the_table_rows():
    q, k = torch.empty(5, 32, 128, dtype=torch.float16), torch.empty(5, 8, 128, dtype=torch.float16)
    table_rows, positions = torch.empty(5, 128, dtype=torch.float32), torch.empty(5, dtype=torch.int64)
    assert traffic.rope_bytes(5, 32, 8, 128, 2) == 2 * nbytes(q, k) + nbytes(table_rows, positions)


def test_act_kv_and_copy_bytes():
    x, out = torch.empty(3, 2 * 14336, dtype=torch.bfloat16), torch.empty(3, 14336, dtype=torch.bfloat16)
    assert traffic.act_and_mul_bytes(3, 14336, 2) == nbytes(x, out)
    k = torch.empty(4, 8, 128, dtype=torch.bfloat16)
    cache_rows, slots = torch.empty(4, 8, 128, dtype=torch.float32), torch.empty(4, dtype=torch.int64)
    assert traffic.kv_write_bytes(4, 8, 128, 2, 4) == 2 * nbytes(k) + 2 * nbytes(cache_rows) + nbytes(slots)
    assert traffic.copy_bytes(1 << 30) == 2 << 30


def test_decode_bytes_are_dominated_by_the_whole_cache_read_once():
    """Llama-8B at batch 64, context 4096, bfloat16: K and V are 1 GiB; q, out and tables add ~0.1%."""
    moved = traffic.decode_attention_bytes(64, 4096, 32, 8, 128, 2, 16)
    kv = 2 * 64 * 4096 * 8 * 128 * 2
    assert kv == 1 << 30
    extra = 2 * 64 * 32 * 128 * 2 + 64 * (4096 // 16) * 4 + 64 * 4
    assert moved == kv + extra and extra / kv < 2e-3
    assert traffic.decode_attention_bytes(1, 17, 4, 2, 8, 2, 16) == 2 * 17 * 2 * 8 * 2 + 2 * 4 * 8 * 2 + 2 * 4 + 4


def test_causal_flops_count_the_triangle():
    # One 3-token prompt sees 1 + 2 + 3 keys; QK^T and PV are 2 D FLOPs each per pair.
    assert traffic.causal_attention_flops([3], num_heads=2, head_dim=8) == 6 * 2 * (2 * 8 + 2 * 8)
    assert traffic.causal_attention_flops([3, 1], 1, 4) == traffic.causal_attention_flops([3], 1, 4) + 16


def test_arguments_parse_and_unknown_kernels_are_refused(capsys):
    args = parse_args(["--tokens", "1,4096", "--only", "rmsnorm, decode_attention"])
    assert args.tokens == [1, 4096] and args.only == ["rmsnorm", "decode_attention"] and args.decode_batch == 64
    with pytest.raises(SystemExit):
        parse_args(["--only", "rmsnorm,flash"])
    assert "unknown kernels ['flash']" in capsys.readouterr().err


def test_without_cuda_it_exits_saying_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the benchmark would run")
    done = subprocess.run([sys.executable, "-m", "bench.bench_kernels", "--only", "rmsnorm"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "needs a CUDA device" in done.stderr


@pytest.mark.slow
def test_smoke_run_measures_every_kernel_and_writes_the_report(tmp_path):
    done = subprocess.run([sys.executable, "-m", "bench.bench_kernels", "--smoke", "--out-dir", str(tmp_path)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    (report_path,) = tmp_path.glob("kernels-*/results.json")
    report = json.loads(report_path.read_text())
    assert report["copy"]["gb_per_s"] > 0
    kernels = {row["kernel"] for row in report["rows"] if "error" not in row}
    assert kernels == {"rmsnorm", "layernorm", "rope", "silu_and_mul", "gelu_tanh_and_mul", "write_kv",
                       "decode_attention", "prefill_attention"}, [r for r in report["rows"] if "error" in r]
    assert all(row["max_abs_diff_vs_torch"] < 0.1 for row in report["rows"])
