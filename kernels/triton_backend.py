"""The `triton` backend: the Ops of kernels/ assembled from each op module's Triton launcher.

Chosen automatically on CUDA (`get_ops("auto")`), or by `--kernels triton` (alias `--backend`).
Without a GPU it runs only when asked for explicitly and `TRITON_INTERPRET=1` is set, on CPU
tensors through triton's interpreter: that is how the tests hold the engine to its greedy parity
on this backend, at tiny sizes (the interpreter runs each program instance in Python).

The kernels read the step's metadata tensors and the host maxima directly, so the backend needs
no per-step plan (`plan_step` is the default no-op): nothing is read back from the device inside
a step, which CUDA-graph capture requires. Sampling is on the device too (`sample`): the engine's
`DeviceSampler` reads back one token per row, once a step.
"""

from __future__ import annotations

from kernels.activation import silu_and_mul_triton
from kernels.attention_triton import paged_attention_triton
from kernels.kv_write import write_kv_triton
from kernels.ops import Ops
from kernels.rmsnorm import rmsnorm_triton
from kernels.rope import rope_triton
from kernels.sampling import sample


def make_ops() -> Ops:
    return Ops(
        name="triton",
        rmsnorm=rmsnorm_triton,
        rope=rope_triton,
        silu_and_mul=silu_and_mul_triton,
        write_kv=write_kv_triton,
        paged_attention=paged_attention_triton,
        sample=sample,
    )
