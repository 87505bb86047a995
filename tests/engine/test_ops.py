from __future__ import annotations

import pytest
import torch

from kernels import paged_decode_cpu
from kernels.ops import get_ops


def test_torch_backend_is_the_reference():
    assert get_ops("torch").name == "torch"


def test_auto_without_cuda_takes_the_cpu_kernel_where_it_loads_else_torch():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: auto may pick triton")
    assert get_ops("auto").name == ("cpu" if paged_decode_cpu.load() is not None else "torch")


def test_triton_without_cuda_is_refused(monkeypatch):
    """Without CUDA the triton backend runs only under the interpreter, asked for explicitly."""
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="triton"):
        get_ops("triton")
    assert get_ops("auto").name != "triton"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        get_ops("cuda")
