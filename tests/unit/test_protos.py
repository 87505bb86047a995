"""The wire contract: generated code is current, and the Triton-compatible messages use the same
field names and numbers as Triton's own (as compiled into tritonclient)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2 as triton_model_config
from tritonclient.grpc import service_pb2 as triton_service

from protos.generate import PROTO_ROOT, stale_files


def test_generated_code_is_not_stale():
    stale = stale_files()
    assert stale == [], f"run `python -m protos.generate`; stale: {stale}"


def _our_descriptors() -> dict[str, descriptor_pb2.FileDescriptorProto]:
    """Compile our sources to a descriptor set without importing them (tritonclient already
    registered the `inference` package in this process)."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "set.pb"
        sources = [str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto")]
        assert protoc.main(["protoc", f"-I{PROTO_ROOT}", f"--descriptor_set_out={out}", "--include_imports", *sources]) == 0
        files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    return {f.name: f for f in files}


def _messages(file_proto):
    for message in file_proto.message_type:
        yield message.name, message
        yield from _messages_nested(message, message.name + ".")


def _messages_nested(message, prefix):
    for nested in message.nested_type:
        if nested.options.map_entry:
            continue
        yield f"{prefix}{nested.name}", nested
        yield from _messages_nested(nested, f"{prefix}{nested.name}.")


def _triton_fields(full_name: str):
    pool = triton_service.DESCRIPTOR.pool
    descriptor = pool.FindMessageTypeByName(full_name)
    return {f.name: (f.number, f.type, f.is_repeated) for f in descriptor.fields}


@pytest.mark.parametrize("source", ["inference/grpc_service.proto", "inference/model_config.proto"])
def test_fields_match_triton(source):
    ours = _our_descriptors()[source]
    checked = 0
    for name, message in _messages(ours):
        triton_fields = _triton_fields(f"inference.{name}")
        for field in message.field:
            repeated = field.label == descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED
            assert field.name in triton_fields, f"inference.{name}.{field.name} is not in Triton's proto"
            number, kind, triton_repeated = triton_fields[field.name]
            assert (field.number, field.type, repeated) == (number, kind, triton_repeated), (
                f"inference.{name}.{field.name} differs from Triton's"
            )
            checked += 1
    assert checked > 40


def test_service_methods_match_triton():
    ours = _our_descriptors()["inference/grpc_service.proto"].service[0]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.name == "GRPCInferenceService"
    our_methods = {m.name: (m.input_type.lstrip("."), m.output_type.lstrip("."), m.client_streaming, m.server_streaming) for m in ours.method}
    their_methods = {
        m.name: (m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming)
        for m in theirs.methods
    }
    assert our_methods == their_methods


def test_model_config_enums_match_triton():
    ours = _our_descriptors()["inference/model_config.proto"]
    data_type = next(e for e in ours.enum_type if e.name == "DataType")
    assert {v.name: v.number for v in data_type.value} == dict(triton_model_config.DataType.items())


def test_generated_modules_import_in_a_clean_process():
    code = (
        "import protos.inference.grpc_service_pb2_grpc, protos.tensoryard.v1.discovery_pb2_grpc, "
        "protos.tensoryard.v1.registry_pb2_grpc, protos.tensoryard.v1.generation_pb2_grpc, "
        "protos.tensoryard.v1.worker_pb2_grpc, protos.tensoryard.v1.embeddings_pb2_grpc"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=PROTO_ROOT.parent)
    assert result.returncode == 0, result.stderr
