"""KServe v2 tensors <-> numpy, with every check a bad request needs.

A request's tensors arrive either as one raw little-endian buffer per input
(`raw_input_contents`, what tritonclient sends) or as typed `contents`. BYTES elements are each a
4-byte little-endian length followed by the bytes. The checks that need no model (datatypes,
shapes, where the data is, duplicates) are `services.common.infer_checks`, shared with the router;
the ones here hold a request against the model and its data against its shape (datatype, shape,
byte count, a length prefix running past the buffer). Each raises InvalidArgument naming the
input, so the caller can fix it; nothing here touches any other request.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

from services.common.errors import InvalidArgument
from services.common.infer_checks import CONTENTS_FIELD, check_infer_request

# KServe datatype -> numpy dtype (little-endian on the wire).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# What tensoryard decodes (BF16, a valid KServe datatype, is not among them).
DATATYPES = (*NUMPY_DTYPES, "BYTES")

_LENGTH_PREFIX = struct.Struct("<I")


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """One model input or output. dims exclude the batch dimension; -1 is variable."""

    name: str
    datatype: str
    dims: tuple[int, ...]
    optional: bool = False

    def shape_with_batch(self, batched: bool) -> list[int]:
        return [-1, *self.dims] if batched else list(self.dims)


def element_count(shape) -> int:
    return math.prod(shape) if len(shape) else 1


def decode_bytes_tensor(name: str, buffer: bytes, count: int) -> np.ndarray:
    """Split a length-prefixed BYTES buffer into `count` elements (numpy object array)."""
    elements = []
    view = memoryview(buffer)
    offset = 0
    for index in range(count):
        if offset + 4 > len(view):
            raise InvalidArgument(
                f"input '{name}': BYTES buffer ends after {index} of {count} elements "
                f"(each element needs a 4-byte little-endian length prefix)"
            )
        (length,) = _LENGTH_PREFIX.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise InvalidArgument(
                f"input '{name}': element {index} claims {length} bytes but only "
                f"{len(view) - offset} remain in the buffer (malformed length prefix)"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise InvalidArgument(
            f"input '{name}': {len(view) - offset} bytes left over after {count} BYTES elements; "
            f"the shape and the data disagree"
        )
    return np.array(elements, dtype=object)


def encode_bytes_tensor(elements) -> bytes:
    parts = []
    for element in elements:
        data = element if isinstance(element, bytes) else str(element).encode()
        parts.append(_LENGTH_PREFIX.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_input(tensor, raw: bytes | None) -> np.ndarray:
    """One InferInputTensor (+ its raw buffer, if the request used raw contents) -> ndarray."""
    name = tensor.name
    datatype = tensor.datatype
    if datatype not in DATATYPES:
        raise InvalidArgument(
            f"input '{name}': datatype '{datatype}' is not supported here (one of {', '.join(DATATYPES)})"
        )
    shape = list(tensor.shape)  # non-negative and countable: check_infer_request ran first
    count = element_count(shape)
    if raw is not None:
        if datatype == "BYTES":
            return decode_bytes_tensor(name, raw, count).reshape(shape)
        dtype = NUMPY_DTYPES[datatype]
        expected_bytes = count * dtype.itemsize
        if len(raw) != expected_bytes:
            raise InvalidArgument(
                f"input '{name}': raw data has {len(raw)} bytes but shape {shape} of {datatype} "
                f"needs {expected_bytes}"
            )
        return np.frombuffer(raw, dtype=dtype).reshape(shape)
    if datatype == "FP16":
        raise InvalidArgument(f"input '{name}': FP16 data must be sent in raw_input_contents")
    values = getattr(tensor.contents, CONTENTS_FIELD[datatype])
    if len(values) != count:
        raise InvalidArgument(
            f"input '{name}': contents hold {len(values)} elements but shape {shape} needs {count}"
        )
    if datatype == "BYTES":
        return np.array(list(values), dtype=object).reshape(shape)
    return np.array(values, dtype=NUMPY_DTYPES[datatype]).reshape(shape)


def decode_inputs(
    request, specs: dict[str, TensorSpec], model_name: str, max_batch_size: int
) -> tuple[dict[str, np.ndarray], int]:
    """Decode and check every input of a ModelInferRequest against the model's inputs.

    Returns the arrays by name and the batch size (0 when the model does not batch).
    """
    check_infer_request(request)
    raw_contents = request.raw_input_contents
    arrays: dict[str, np.ndarray] = {}
    batch_sizes = set()
    for index, tensor in enumerate(request.inputs):
        spec = specs.get(tensor.name)
        if spec is None:
            raise InvalidArgument(
                f"unexpected inference input '{tensor.name}' for model '{model_name}'; "
                f"expected one of: {', '.join(specs)}"
            )
        if tensor.datatype != spec.datatype:
            raise InvalidArgument(
                f"input '{tensor.name}' has datatype {tensor.datatype or '(none)'} but model "
                f"'{model_name}' expects {spec.datatype}"
            )
        _check_shape(tensor.name, list(tensor.shape), spec, model_name, max_batch_size)
        if max_batch_size > 0:
            batch_sizes.add(tensor.shape[0])
        arrays[tensor.name] = decode_input(tensor, raw_contents[index] if raw_contents else None)
    missing = [s.name for s in specs.values() if not s.optional and s.name not in arrays]
    if missing:
        raise InvalidArgument(f"model '{model_name}' needs input(s) {', '.join(missing)}")
    if len(batch_sizes) > 1:
        raise InvalidArgument(f"inputs disagree on the batch size: {sorted(batch_sizes)}")
    batch_size = batch_sizes.pop() if batch_sizes else 0
    if max_batch_size > 0 and batch_size == 0 and arrays:
        raise InvalidArgument("empty batch: the first dimension of every input is 0")
    return arrays, batch_size


def _check_shape(name, shape, spec: TensorSpec, model_name: str, max_batch_size: int) -> None:
    expected = spec.shape_with_batch(max_batch_size > 0)
    matches = len(shape) == len(expected) and all(
        want == -1 or want == got for want, got in zip(expected, shape)
    )
    if not matches:
        raise InvalidArgument(
            f"input '{name}' has shape {shape} but model '{model_name}' expects {expected} "
            f"(-1: any size)"
        )
    if max_batch_size > 0 and shape[0] > max_batch_size:
        raise InvalidArgument(
            f"input '{name}' has batch size {shape[0]} but model '{model_name}' takes at most "
            f"{max_batch_size}"
        )


def check_requested_outputs(request, specs: dict[str, TensorSpec], model_name: str) -> list[str]:
    """Names of the outputs to return: the requested ones (checked) or all of them."""
    if not request.outputs:
        return list(specs)
    names = []
    for output in request.outputs:
        if output.name not in specs:
            raise InvalidArgument(
                f"unexpected inference output '{output.name}' for model '{model_name}'; "
                f"it has: {', '.join(specs)}"
            )
        names.append(output.name)
    return names
