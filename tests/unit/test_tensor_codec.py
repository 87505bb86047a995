"""KServe v2 tensor decoding: every malformed payload is refused with the input's name.

Requests are built with tritonclient's compiled Triton protos: the same wire format and field
names as ours, and importing both in one process is not possible (same proto package).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from services.common.errors import InvalidArgument
from services.worker.tensor_codec import (
    TensorSpec,
    check_requested_outputs,
    decode_bytes_tensor,
    decode_inputs,
    encode_bytes_tensor,
)

SPECS = {
    "text": TensorSpec("text", "BYTES", (1,), optional=True),
    "ids": TensorSpec("ids", "INT64", (-1,), optional=True),
    "scale": TensorSpec("scale", "FP32", (2,), optional=True),
}


def request_with(*tensors) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def test_bytes_round_trip_keeps_empty_and_binary_elements():
    elements = [b"", b"hello", "ünïcode".encode(), bytes(range(256))]
    decoded = decode_bytes_tensor("t", encode_bytes_tensor(elements), len(elements))
    assert list(decoded) == elements


@pytest.mark.parametrize(
    "buffer, fragment",
    [
        (struct.pack("<I", 10) + b"abc", "claims 10 bytes"),
        (b"\x01\x00", "4-byte little-endian length prefix"),
        (struct.pack("<I", 1) + b"a" + b"junk", "left over"),
    ],
)
def test_malformed_bytes_buffers_are_refused(buffer, fragment):
    with pytest.raises(InvalidArgument, match=fragment):
        decode_bytes_tensor("t", buffer, 1)


def test_raw_numeric_input_decodes_little_endian():
    ids = np.array([[1, 2, 3], [4, 5, 6]], dtype="<i8")
    arrays, batch_size = decode_inputs(request_with(("ids", "INT64", [2, 3], ids.tobytes())), SPECS, "m", 8)
    assert batch_size == 2
    np.testing.assert_array_equal(arrays["ids"], ids)


def test_raw_byte_length_must_match_shape():
    with pytest.raises(InvalidArgument, match="raw data has 8 bytes but shape \\[1, 2\\] of INT64 needs 16"):
        decode_inputs(request_with(("ids", "INT64", [1, 2], b"\x00" * 8)), SPECS, "m", 8)


def test_datatype_must_match_the_model():
    with pytest.raises(InvalidArgument, match="has datatype INT32 but model 'm' expects INT64"):
        decode_inputs(request_with(("ids", "INT32", [1, 2], b"\x00" * 8)), SPECS, "m", 8)


def test_fixed_dims_are_enforced():
    with pytest.raises(InvalidArgument, match="expects \\[-1, 2\\]"):
        decode_inputs(request_with(("scale", "FP32", [1, 3], b"\x00" * 12)), SPECS, "m", 8)


def test_batch_larger_than_max_is_refused():
    raw = encode_bytes_tensor([b"x"] * 9)
    with pytest.raises(InvalidArgument, match="at most 8"):
        decode_inputs(request_with(("text", "BYTES", [9, 1], raw)), SPECS, "m", 8)


def test_inputs_must_agree_on_batch_size():
    request = request_with(
        ("text", "BYTES", [1, 1], encode_bytes_tensor([b"x"])),
        ("ids", "INT64", [2, 1], b"\x00" * 16),
    )
    with pytest.raises(InvalidArgument, match="disagree on the batch size"):
        decode_inputs(request, SPECS, "m", 8)


def test_typed_contents_are_decoded():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="scale", datatype="FP32", shape=[1, 2])
    tensor.contents.fp32_contents.extend([0.5, 2.0])
    arrays, _ = decode_inputs(request, SPECS, "m", 8)
    np.testing.assert_array_equal(arrays["scale"], [[0.5, 2.0]])


def test_typed_contents_count_must_match_shape():
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="scale", datatype="FP32", shape=[2, 2])
    tensor.contents.fp32_contents.extend([0.5, 2.0])
    with pytest.raises(InvalidArgument, match="contents hold 2 elements but shape \\[2, 2\\] needs 4"):
        decode_inputs(request, SPECS, "m", 8)


def test_required_inputs_must_be_present():
    specs = {"x": TensorSpec("x", "FP32", (1,))}
    with pytest.raises(InvalidArgument, match="needs input\\(s\\) x"):
        decode_inputs(pb.ModelInferRequest(model_name="m"), specs, "m", 8)


def test_requested_outputs_are_checked():
    request = pb.ModelInferRequest(model_name="m")
    request.outputs.add(name="nope")
    with pytest.raises(InvalidArgument, match="'nope'"):
        check_requested_outputs(request, {"embedding": TensorSpec("embedding", "FP32", (4,))}, "m")


def test_model_independent_checks_run_before_the_model_ones():
    """decode_inputs applies services.common.infer_checks first: the router's checks, the same words."""
    request = request_with(("text", "BYTES", [1, 1], encode_bytes_tensor([b"x"])))
    request.inputs[0].contents.bytes_contents.append(b"x")
    with pytest.raises(InvalidArgument, match="both contents and raw_input_contents"):
        decode_inputs(request, SPECS, "m", 8)


def test_overflowing_shape_is_refused_before_numpy_sees_it():
    with pytest.raises(InvalidArgument, match="multiply to more than an int64 holds"):
        decode_inputs(request_with(("ids", "INT64", [2**32, 2**32], b"\x00" * 8)), SPECS, "m", 8)


def test_duplicate_input_is_refused():
    raw = encode_bytes_tensor([b"x"])
    with pytest.raises(InvalidArgument, match="'text' appears more than once"):
        decode_inputs(request_with(("text", "BYTES", [1, 1], raw), ("text", "BYTES", [1, 1], raw)), SPECS, "m", 8)
