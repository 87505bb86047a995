"""Checks of a KServe v2 `ModelInferRequest` that need no knowledge of the model.

The router runs them before it forwards a request and the worker before it decodes tensors
(`services.worker.tensor_codec.decode_inputs`), so a malformed request stops at the first hop with
INVALID_ARGUMENT (Triton's code) and a message that says what to fix. What depends on the model
(which inputs it takes, their datatypes and shapes, exact byte counts, BYTES length prefixes) is
checked by the worker, which knows the model.

Nothing here reads a tensor's data: a repeated `bytes` field hands out a copy of an element each
time it is read, and the worker reads each raw buffer once, when it decodes it.
"""

from __future__ import annotations

import math

from services.common.errors import InvalidArgument

INT64_MAX = 2**63 - 1
# protobuf cannot serialize a message of 2 GiB or more, so no request carries more data than this.
MAX_PROTOBUF_MESSAGE_BYTES = 2**31 - 1

# The fewest bytes one element of each KServe datatype takes in a request: its size in
# `raw_input_contents`, and 4 for BYTES (each element starts with a 4-byte length prefix).
# Typed `contents` take at least a byte per element too (packed varints, tag + length for bytes).
MIN_ELEMENT_BYTES: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 1,
    "UINT16": 2,
    "UINT32": 4,
    "UINT64": 8,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
    "BYTES": 4,
}
DATATYPES = tuple(MIN_ELEMENT_BYTES)

# Which `contents` field carries each datatype. FP16 and BF16 have none: raw_input_contents only.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def check_infer_request(request, num_message_bytes: int | None = None) -> None:
    """Raise InvalidArgument if `request` (a ModelInferRequest) is malformed whatever the model.

    `num_message_bytes`, the request's serialized size where the caller has it (the router has the
    bytes), bounds the elements a shape may claim; without it the bound is protobuf's 2 GiB.
    """
    inputs = request.inputs
    num_raw = len(request.raw_input_contents)
    if num_raw and num_raw != len(inputs):
        raise InvalidArgument(
            f"the request has {len(inputs)} inputs but {num_raw} raw_input_contents; send one raw "
            f"buffer per input, in the order of the inputs, or none and put the data in contents"
        )
    max_message_bytes = num_message_bytes if num_message_bytes is not None else MAX_PROTOBUF_MESSAGE_BYTES
    names = set()
    for tensor in inputs:
        if tensor.name in names:
            raise InvalidArgument(f"input '{tensor.name}' appears more than once; send each input once")
        names.add(tensor.name)
        _check_input(tensor, uses_raw=num_raw > 0, max_message_bytes=max_message_bytes)
    outputs = set()
    for output in request.outputs:
        if output.name in outputs:
            raise InvalidArgument(f"output '{output.name}' is requested more than once; ask for each output once")
        outputs.add(output.name)


def _check_input(tensor, uses_raw: bool, max_message_bytes: int) -> None:
    name, datatype = tensor.name, tensor.datatype
    if datatype not in MIN_ELEMENT_BYTES:
        raise InvalidArgument(
            f"input '{name}': unknown datatype '{datatype}'; use one of {', '.join(DATATYPES)}"
        )
    shape = list(tensor.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(
            f"input '{name}': shape {shape} has a negative dimension; send the actual size of each "
            f"dimension (-1 is only for model configurations)"
        )
    # Python ints: exact, however large. A zero dimension makes the count 0, but the others must
    # still be countable (numpy refuses such shapes even when empty).
    if math.prod(dim for dim in shape if dim) > INT64_MAX:
        raise InvalidArgument(
            f"input '{name}': the dimensions of shape {shape} multiply to more than an int64 holds; "
            f"send the tensor's actual shape"
        )
    num_elements = math.prod(shape)
    min_bytes = num_elements * MIN_ELEMENT_BYTES[datatype]
    if min_bytes > max_message_bytes:
        raise InvalidArgument(
            f"input '{name}': shape {shape} of {datatype} has {num_elements} elements, at least "
            f"{min_bytes} bytes of data, more than the request ({max_message_bytes} bytes) can "
            f"carry; send the tensor's actual shape"
        )
    if not tensor.HasField("contents"):
        return
    if uses_raw:
        # Triton's rule: an input's data is in exactly one place.
        raise InvalidArgument(
            f"input '{name}' has both contents and raw_input_contents; send its data in one of "
            f"them (with raw_input_contents, leave every input's contents unset)"
        )
    field = CONTENTS_FIELD.get(datatype)
    others = [f.name for f, _ in tensor.contents.ListFields() if f.name != field]
    if others:
        where = f"put {datatype} data in {field}" if field else f"send {datatype} data in raw_input_contents"
        raise InvalidArgument(f"input '{name}' is {datatype} but its data is in {', '.join(others)}; {where}")
