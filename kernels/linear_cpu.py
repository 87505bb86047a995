"""Linear layers on CPU with the weight reordered once for oneDNN, at load time.

`F.linear` on CPU hands the row-major weight to MKL's sgemm, which repacks it on every call; at the
row counts of decode steps (a few to a few dozen tokens) that repacking costs about as much as the
product itself. oneDNN takes the weight in its own blocked layout, reordered once here, and then
reads it straight from memory. All linear layers of one SmolLM2-135M step, float32, 2 threads of
the 2-core AVX-512 machine the benchmarks run on (ms, F.linear / reordered for oneDNN):

    rows     1            4            8            16           32           64           300
           20.5 / 24.7  38.4 / 26.8  50.7 / 30.6  50.5 / 36.6  61.9 / 50.1  98.0 / 82.6  326 / 316

Single-token steps lose a little; every batched step gains, up to 1.65x. The reordered weight is an
opaque tensor (layout torch._mkldnn) that only `packed_linear` reads, so the plain one can be freed.
The ops are torch's own (the ones its CPU compiler emits); where a build lacks them, `pack` says so
by returning None and the caller keeps `F.linear`.
"""

from __future__ import annotations

import torch

_PACKABLE_DTYPES = (torch.float32, torch.bfloat16)


def can_pack(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in _PACKABLE_DTYPES
        and weight.dim() == 2
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def pack(weight: torch.Tensor) -> torch.Tensor | None:
    """[out, in] weight -> its oneDNN-reordered copy, or None where that path is not available."""
    if not can_pack(weight):
        return None
    with torch.inference_mode():
        return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous())


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ weight.T + bias, with the weight from `pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(torch.nn.Module):
    """An `nn.Linear` whose weight lives only in the reordered layout."""

    def __init__(self, packed: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.packed_weight = packed
        self.bias = bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed_weight, self.bias)


def pack_linear_layers(model: torch.nn.Module, layer_types: tuple[type, ...] = (torch.nn.Linear,)) -> int:
    """Swaps every layer of `layer_types` (modules with `weight` [out, in] and `bias`, computing
    F.linear) whose weight can be packed for a PackedLinear; returns how many."""
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, layer_types) and (packed := pack(child.weight)) is not None:
                bias = None if child.bias is None else child.bias.detach()
                setattr(parent, name, PackedLinear(packed, bias))
                swapped += 1
    return swapped
