"""LLM requests on Triton's ModelStreamInfer, as a stream kind of `relay.Relay`.

Each such request runs on a one-request stream to its worker, marked so (metadata
`x-tensoryard-router-stream: 1`): the worker then ends the stream with the status of any failure,
and names the tokens behind each response's text in a `tensoryard_token_ids` parameter, which is
stripped here before the client sees the response. A resumed request carries the tokens already sent
in `tensoryard_resume_token_ids` (services/worker/generation_model.py).

Kept apart from relay.py: it needs the `inference` protos, which a process may load only once.
"""

from __future__ import annotations

import struct

from protos.inference import grpc_service_pb2 as pb
from services.router.pool import Backend

MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
ROUTER_STREAM_HEADER = ("x-tensoryard-router-stream", "1")
RESUME_TOKEN_IDS_PARAMETER = "tensoryard_resume_token_ids"
TOKEN_IDS_PARAMETER = "tensoryard_token_ids"


class TritonGenerate:
    """One LLM request of a ModelStreamInfer stream, on a one-request stream to the worker, which
    names the tokens behind each response's text (a parameter the client never sees)."""

    def open(self, backend: Backend, request: bytes, timeout_s, metadata):
        return backend.stream_stream(MODEL_STREAM_INFER)(
            iter((request,)), timeout=timeout_s, metadata=(*metadata, ROUTER_STREAM_HEADER)
        )

    def read(self, response: bytes) -> tuple[bytes, list[int], bool]:
        message = pb.ModelStreamInferResponse.FromString(response)
        parameters = message.infer_response.parameters
        token_ids: list[int] = []
        if TOKEN_IDS_PARAMETER in parameters:
            token_ids = [int(t) for t in parameters[TOKEN_IDS_PARAMETER].string_param.split()]
            del parameters[TOKEN_IDS_PARAMETER]
            response = message.SerializeToString()
        final = bool(message.error_message) or (
            "triton_final_response" in parameters and parameters["triton_final_response"].bool_param
        )
        return response, token_ids, final

    def resumed(self, request: bytes, sent_token_ids: list[int]) -> bytes:
        extra = pb.ModelInferRequest(parameters={
            RESUME_TOKEN_IDS_PARAMETER: pb.InferParameter(string_param=" ".join(map(str, sent_token_ids))),
        })
        return request + extra.SerializeToString()


def triton_text_input(request) -> str | None:
    """The first element of the request's text_input, decoded; None if it cannot be read."""
    for index, tensor in enumerate(request.inputs):
        if tensor.name != "text_input" or tensor.datatype != "BYTES":
            continue
        if request.raw_input_contents:
            if index >= len(request.raw_input_contents):
                return None
            raw = request.raw_input_contents[index]
            if len(raw) < 4:
                return None
            (length,) = struct.unpack_from("<I", raw)
            data = raw[4 : 4 + length]
            if len(data) != length:
                return None
        elif tensor.contents.bytes_contents:
            data = tensor.contents.bytes_contents[0]
        else:
            return None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def stream_error(request_id: str, message: str) -> bytes:
    """An in-stream error for one request, as a worker (or Triton) sends it."""
    response = pb.ModelStreamInferResponse(
        error_message=message, infer_response=pb.ModelInferResponse(id=request_id)
    )
    return response.SerializeToString()


def as_stream_response(infer_response: bytes) -> bytes:
    """ModelStreamInferResponse{infer_response = these bytes}, without decoding them: field 2,
    length-delimited."""
    return b"\x12" + _varint(len(infer_response)) + infer_response


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)
