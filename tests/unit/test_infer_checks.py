"""Model-independent checks of a ModelInferRequest: each malformed request is refused, saying what
to fix; well-formed ones pass whatever model they name.

Requests are built with tritonclient's compiled Triton protos (our `protos.inference` cannot be
imported beside them: same proto package).
"""

from __future__ import annotations

import struct

import pytest
from tritonclient.grpc import service_pb2 as pb

from services.common.errors import InvalidArgument
from services.common.infer_checks import DATATYPES, check_infer_request


def raw_request(*tensors) -> pb.ModelInferRequest:
    """`tensors`: (name, datatype, shape, raw bytes) each."""
    request = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape, raw in tensors:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(raw)
    return request


def text(value: bytes = b"hello") -> tuple:
    return ("text", "BYTES", [1, 1], struct.pack("<I", len(value)) + value)


def test_raw_request_passes():
    check_infer_request(raw_request(text(), ("ids", "INT64", [1, 2], b"\x00" * 16)))


def test_typed_contents_pass():
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[2]).contents.fp32_contents.extend([1.0, 2.0])
    request.inputs.add(name="y", datatype="INT16", shape=[1]).contents.int_contents.append(7)
    check_infer_request(request)


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_kserve_datatype_is_known(datatype):
    check_infer_request(raw_request(("x", datatype, [0], b"")))


def test_contents_together_with_raw_input_contents_is_refused():
    request = raw_request(text())
    request.inputs[0].contents.bytes_contents.append(b"hello")
    with pytest.raises(InvalidArgument, match="'text' has both contents and raw_input_contents; send its data in one"):
        check_infer_request(request)


def test_empty_contents_message_beside_raw_is_refused_too():
    """Triton looks at whether contents is set, not at what it holds."""
    request = raw_request(text())
    request.inputs[0].contents.SetInParent()
    with pytest.raises(InvalidArgument, match="both contents and raw_input_contents"):
        check_infer_request(request)


def test_contents_on_an_input_without_raw_buffer_is_refused_when_others_use_raw():
    request = raw_request(text())
    request.inputs.add(name="ids", datatype="INT64", shape=[1]).contents.int64_contents.append(1)
    with pytest.raises(InvalidArgument, match="2 inputs but 1 raw_input_contents"):
        check_infer_request(request)


@pytest.mark.parametrize("num_raw", [2, 3])
def test_raw_buffer_count_must_match_inputs(num_raw):
    request = raw_request(text())
    for _ in range(num_raw - 1):
        request.raw_input_contents.append(b"")
    with pytest.raises(InvalidArgument, match=f"1 inputs but {num_raw} raw_input_contents; send one raw buffer per input"):
        check_infer_request(request)


def test_duplicate_input_names_are_refused():
    with pytest.raises(InvalidArgument, match="input 'text' appears more than once"):
        check_infer_request(raw_request(text(), text(b"again")))


def test_negative_dimension_is_refused():
    with pytest.raises(InvalidArgument, match=r"shape \[-1, 1\] has a negative dimension"):
        check_infer_request(raw_request(("text", "BYTES", [-1, 1], b"")))


@pytest.mark.parametrize(
    "shape",
    [
        [2**62, 4],  # 2**64 elements
        [2**32, 2**32],
        [0, 2**62, 2**62],  # zero elements, but numpy cannot even build the empty array
    ],
)
def test_shapes_whose_product_overflows_int64_are_refused(shape):
    with pytest.raises(InvalidArgument, match="multiply to more than an int64 holds"):
        check_infer_request(raw_request(("x", "FP32", shape, b"\x00" * 16)))


def test_shape_larger_than_any_message_is_refused():
    # 2**40 UINT8 elements fit in an int64 but not in a 2 GiB protobuf message.
    with pytest.raises(InvalidArgument, match="1099511627776 elements.*more than the request"):
        check_infer_request(raw_request(("x", "UINT8", [2**20, 2**20], b"")))


def test_shape_larger_than_the_message_at_hand_is_refused():
    """The router knows the request's size and passes it: a tighter bound."""
    request = raw_request(("x", "FP32", [1000], b"\x00" * 4000))
    check_infer_request(request, num_message_bytes=request.ByteSize())
    request.inputs[0].shape[:] = [10_000]
    with pytest.raises(InvalidArgument, match=r"at least 40000 bytes of data, more than the request \(\d+ bytes\)"):
        check_infer_request(request, num_message_bytes=request.ByteSize())


@pytest.mark.parametrize("datatype", ["FP31", "", "fp32", "STRING"])
def test_unknown_datatype_is_refused(datatype):
    with pytest.raises(InvalidArgument, match=f"unknown datatype '{datatype}'; use one of BOOL"):
        check_infer_request(raw_request(("x", datatype, [1], b"\x00" * 4)))


def test_contents_in_the_wrong_field_name_the_right_one():
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="ids", datatype="INT64", shape=[2]).contents.int_contents.extend([1, 2])
    with pytest.raises(InvalidArgument, match="'ids' is INT64 but its data is in int_contents; put INT64 data in int64_contents"):
        check_infer_request(request)


def test_fp16_contents_point_to_raw_input_contents():
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="h", datatype="FP16", shape=[1]).contents.fp32_contents.append(1.0)
    with pytest.raises(InvalidArgument, match="send FP16 data in raw_input_contents"):
        check_infer_request(request)


def test_output_requested_twice_is_refused():
    request = raw_request(text())
    request.outputs.add(name="embedding")
    request.outputs.add(name="embedding")
    with pytest.raises(InvalidArgument, match="output 'embedding' is requested more than once"):
        check_infer_request(request)


def test_no_inputs_at_all_is_for_the_model_to_judge():
    check_infer_request(pb.ModelInferRequest(model_name="m"))
