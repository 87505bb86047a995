"""The elementwise kernels go through triton's real compiler to an sm_90 (H100/H200) cubin, on a
machine without a GPU: the interpreter runs the kernels' Python, not their lowering, so a type,
layout or control-flow construct the compiler rejects would pass every interpreter test.

Compiled ahead of time in a subprocess (TRITON_INTERPRET must be off when kernels/ is imported),
at Llama-8B shapes in bfloat16 with the num_warps the launchers pick.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent('''
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.activation import _act_and_mul_kernel
    from kernels.kv_write import _write_kv_kernel
    from kernels.layernorm import _layernorm_kernel
    from kernels.rmsnorm import _rmsnorm_kernel, row_launch_settings
    from kernels.rope import _rope_kernel

    def build(fn, pointers, ints, floats, constexprs, num_warps):
        signature = {**pointers, **{name: "i32" for name in ints},
                     **{name: "fp32" for name in floats}, **{name: "constexpr" for name in constexprs}}
        source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
        assert compiled.asm["cubin"], fn.__name__
        print(fn.__name__, constexprs)

    bf16 = "*bf16"
    block, warps = row_launch_settings(4096)
    rows = ["stride_x", "stride_residual", "stride_out", "stride_sum", "H"]
    build(_rmsnorm_kernel, dict.fromkeys(["x_ptr", "residual_ptr", "weight_ptr", "out_ptr", "sum_ptr"], bf16),
          rows, ["eps"], {"HAS_RESIDUAL": True, "BLOCK_H": block}, warps)
    build(_layernorm_kernel,
          dict.fromkeys(["x_ptr", "residual_ptr", "weight_ptr", "bias_ptr", "out_ptr", "sum_ptr"], bf16), rows, ["eps"],
          {"HAS_RESIDUAL": True, "STORE_SUM": False, "HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_H": block}, warps)
    for is_neox in (True, False):
        build(_rope_kernel, {"q_ptr": bf16, "k_ptr": bf16, "positions_ptr": "*i64", "cache_ptr": "*fp32"},
              ["stride_qn", "stride_qh", "stride_qd", "stride_kn", "stride_kh", "stride_kd", "stride_cache",
               "num_q_heads", "num_kv_heads"], [],
              {"IS_NEOX": is_neox, "HALF": 64, "BLOCK_HALF": 64, "BLOCK_Q_HEADS": 32, "BLOCK_KV_HEADS": 8}, 8)
    for kind in (0, 1, 2):
        build(_act_and_mul_kernel, {"x_ptr": bf16, "out_ptr": bf16}, ["stride_x", "stride_out", "I"], [],
              {"KIND": kind, "BLOCK": 1024}, 4)
    build(_write_kv_kernel, {"k_ptr": bf16, "v_ptr": bf16, "k_cache_ptr": "*fp16", "v_cache_ptr": "*fp16",
                             "slot_mapping_ptr": "*i64"},
          ["stride_kn", "stride_kh", "stride_kd", "stride_vn", "stride_vh", "stride_vd",
           "stride_cb", "stride_cs", "stride_ch", "stride_cd", "num_kv_heads", "block_size"], [],
          {"HEAD_DIM": 128, "BLOCK_HEADS": 8, "BLOCK_D": 128}, 4)
''')


def _has_nvidia_compiler() -> bool:
    try:
        import triton.backends.nvidia as nvidia
    except ImportError:
        return False
    return (Path(nvidia.__file__).parent / "bin" / "ptxas").exists()


@pytest.mark.slow
@pytest.mark.skipif(not _has_nvidia_compiler(), reason="needs triton's NVIDIA backend with its bundled ptxas")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert len(done.stdout.splitlines()) == 8
