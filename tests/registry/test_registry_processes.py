"""Registry processes on loopback, driven by raw gRPC clients: concurrent publishers on one
PostgreSQL, kill -9 in the middle of a resumable upload, and the RPCs of the rollout surface."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from protos.tensoryard.v1 import registry_pb2 as pb
from protos.tensoryard.v1 import registry_pb2_grpc
from tests.conftest import cli, free_port, health_status, stop, wait_until

TOKEN = "registry-test-token"
CHUNK_BYTES = 64 * 1024


def start_registry(backend, log_name: str, env: dict | None = None):
    backend.data_dir.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{free_port()}"
    process = cli("registry", "--port", address.split(":")[1], "--metrics-port", "-1", *backend.registry_flags(),
                  log_path=backend.data_dir.parent / log_name, env=env)
    wait_until(lambda: process.poll() is not None or health_status(address) == health_pb2.HealthCheckResponse.SERVING,
               60, "the registry to serve")
    assert process.poll() is None, (backend.data_dir.parent / log_name).read_text()
    return address, process


def upload(stub, content: bytes) -> pb.BlobRef:
    return stub.UploadBlob(iter([pb.BlobChunk(data=content)]), timeout=30)


def publish(stub, model: str, content: bytes, **fields) -> pb.ModelVersion:
    ref = upload(stub, content)
    return stub.CreateVersion(pb.CreateVersionRequest(
        model_name=model, files=[pb.ModelFile(path="weights.bin", sha256=ref.sha256, size_bytes=ref.size_bytes)],
        config_json="{}", **fields), timeout=30)


@pytest.fixture
def pg_s3_backend(tmp_path, postgres, s3):
    from tests.registry.conftest import Backend

    return Backend("postgresql+s3", postgres.create_database(), f"s3://{s3.create_bucket()}/shared",
                   s3.endpoint_url, tmp_path / "registry")


def test_two_registry_processes_on_one_postgresql_number_versions_without_gaps(pg_s3_backend, tmp_path):
    from dataclasses import replace

    backends = [replace(pg_s3_backend, data_dir=tmp_path / f"registry-{i}") for i in range(2)]
    registries = [start_registry(backend, f"registry-{i}.log") for i, backend in enumerate(backends)]
    per_process = 15
    published: list[list[int]] = [[], []]
    try:
        channels = [grpc.insecure_channel(address) for address, _ in registries]
        stubs = [registry_pb2_grpc.ModelRegistryStub(channel) for channel in channels]
        stubs[0].CreateModel(pb.CreateModelRequest(name="m", task="tensor"))
        barrier = threading.Barrier(2)

        def publisher(i: int) -> None:
            barrier.wait()
            for n in range(per_process):
                version = publish(stubs[i], "m", f"process {i} version {n}".encode())
                stubs[i].SetAlias(pb.SetAliasRequest(model_name="m", name=f"p{i}-n{n}", version=version.version))
                published[i].append(version.version)

        threads = [threading.Thread(target=publisher, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)

        model = stubs[1].GetModel(pb.GetModelRequest(name="m"))
        assert sorted(published[0] + published[1]) == list(range(1, 2 * per_process + 1))
        assert list(model.versions) == list(range(1, 2 * per_process + 1))
        aliases = {a.name: a.version for a in model.aliases}
        expected = {f"p{i}-n{n}": published[i][n] for i in range(2) for n in range(per_process)}
        assert aliases == expected
        for channel in channels:
            channel.close()
    finally:
        for _, process in registries:
            stop(process)


def slow_chunks(content: bytes, upload_id: str, offset: int = 0, pause_s: float = 0.0):
    for start in range(offset, len(content), CHUNK_BYTES):
        first = start == offset
        yield pb.BlobChunk(data=content[start:start + CHUNK_BYTES], upload_id=upload_id if first else "",
                           offset=offset if first else 0, last=start + CHUNK_BYTES >= len(content))
        time.sleep(pause_s)


def test_kill_9_mid_upload_leaves_a_clean_store_and_the_upload_resumes(backend):
    content = os.urandom(4 * 1024 * 1024)
    sha256 = hashlib.sha256(content).hexdigest()
    upload_id = "resume-test-0001"
    address, process = start_registry(backend, "registry.log")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            stub.CreateModel(pb.CreateModelRequest(name="m", task="tensor"))
            publish(stub, "m", b"version one")
            failure: list[grpc.RpcError] = []

            def interrupted_upload() -> None:
                try:
                    stub.UploadBlob(slow_chunks(content, upload_id, pause_s=0.01), timeout=60)
                except grpc.RpcError as error:
                    failure.append(error)

            uploader = threading.Thread(target=interrupted_upload)
            uploader.start()
            wait_until(lambda: stub.GetUpload(pb.GetUploadRequest(upload_id=upload_id)).received_bytes >= 1 << 20,
                       30, "a megabyte of the upload to arrive")
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
            uploader.join(30)
            assert failure and failure[0].code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop(process)

    address, process = start_registry(backend, "registry-restarted.log")
    try:
        with grpc.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            report = stub.VerifyStore(pb.VerifyStoreRequest(rehash=True))
            assert (report.num_versions, list(report.problems)) == (1, [])
            held = stub.GetUpload(pb.GetUploadRequest(upload_id=upload_id, sha256=[sha256]))
            assert 1 << 20 <= held.received_bytes < len(content)
            assert list(held.stored_sha256) == []

            with pytest.raises(grpc.RpcError) as wrong_offset:
                stub.UploadBlob(slow_chunks(content, upload_id, offset=held.received_bytes + 1), timeout=30)
            assert wrong_offset.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert f"holds {held.received_bytes} bytes" in wrong_offset.value.details()

            ref = stub.UploadBlob(slow_chunks(content, upload_id, offset=held.received_bytes), timeout=60)
            assert (ref.sha256, ref.size_bytes) == (sha256, len(content))
            version = stub.CreateVersion(pb.CreateVersionRequest(
                model_name="m", files=[pb.ModelFile(path="big.bin", sha256=sha256, size_bytes=len(content))],
                lineage=pb.Lineage(source_kind="push")), timeout=30)
            assert version.version == 2
            downloaded = b"".join(c.data for c in stub.DownloadBlob(pb.DownloadBlobRequest(sha256=sha256)))
            assert downloaded == content
            after = stub.GetUpload(pb.GetUploadRequest(upload_id=upload_id, sha256=[sha256]))
            assert (after.received_bytes, list(after.stored_sha256)) == (0, [sha256])
            assert list(stub.VerifyStore(pb.VerifyStoreRequest(rehash=True)).problems) == []
    finally:
        stop(process)


def test_rollout_rpcs_round_trip_and_audit_names_the_caller(tmp_path):
    from tests.registry.conftest import Backend

    backend = Backend("sqlite+local", "", "", "", tmp_path / "registry")
    address, process = start_registry(backend, "registry.log", env={"TENSORYARD_ADMIN_TOKEN": TOKEN})
    try:
        with grpc.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.ModelRegistryStub(channel)
            admin = (("authorization", f"Bearer {TOKEN}"),)
            with pytest.raises(grpc.RpcError) as refused:
                stub.SetAlias(pb.SetAliasRequest(model_name="m", name="production", version=1))
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED

            stub.CreateModel(pb.CreateModelRequest(name="m", task="generation"), metadata=admin)
            ref = stub.UploadBlob(iter([pb.BlobChunk(data=b"weights")]), metadata=admin)
            gate = pb.Gate(golden_prompts=[pb.GoldenPrompt(prompt="hi", max_tokens=2, expected_text="hello")])
            created = stub.CreateVersion(pb.CreateVersionRequest(
                model_name="m", files=[pb.ModelFile(path="w.bin", sha256=ref.sha256, size_bytes=ref.size_bytes)],
                config_json='{"max_batch_size": 4}',
                metadata=pb.VersionMetadata(architecture="LlamaForCausalLM", config_digest="forged", labels={"a": "b"}),
                lineage=pb.Lineage(source_kind="hf_folder", source_uri="/models/smol"), gate=gate), metadata=admin)
            stub.SetAlias(pb.SetAliasRequest(model_name="m", name="production", version=1, reason="go"),
                          metadata=admin)
            policy = stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(
                policy=pb.TrafficPolicy(model_name="m", stable_version=1, splits=[pb.TrafficSplit(version=1, percent=100)]),
                reason="all stable"), metadata=admin)
            with pytest.raises(grpc.RpcError) as stale:
                stub.SetTrafficPolicy(pb.SetTrafficPolicyRequest(
                    policy=pb.TrafficPolicy(model_name="m", stable_version=1), expected_revision=7), metadata=admin)
            assert stale.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            with pytest.raises(grpc.RpcError) as traversal:
                stub.GetVersion(pb.GetVersionRequest(model_name="m", ref="../1"))
            assert traversal.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            with pytest.raises(grpc.RpcError) as in_use:
                stub.DeleteVersion(pb.DeleteVersionRequest(model_name="m", version=1), metadata=admin)
            assert in_use.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            stub.SetDeployment(pb.SetDeploymentRequest(deployment=pb.Deployment(model_name="m", version=1, replicas=1)),
                               metadata=admin)
            stub.AppendAudit(pb.AppendAuditRequest(action="gate.pass", model_name="m", version=1,
                                                   details_json='{"prompts": 1}'), metadata=admin)

            by_alias = stub.GetVersion(pb.GetVersionRequest(model_name="m", ref="production"))
            model = stub.ListModels(pb.ListModelsRequest()).models[0]
            entries = stub.ListAudit(pb.ListAuditRequest(model_name="m")).entries
            deployments = stub.ListDeployments(pb.ListDeploymentsRequest()).deployments

        assert by_alias.version == created.version == 1
        assert by_alias.gate == gate and list(by_alias.aliases) == ["production"]
        assert by_alias.metadata.architecture == "LlamaForCausalLM"
        assert by_alias.metadata.config_digest == hashlib.sha256(b'{"max_batch_size":4}').hexdigest()
        assert (by_alias.lineage.source_kind, by_alias.lineage.created_by) == ("hf_folder", "admin-token")
        assert [(a.name, a.version) for a in model.aliases] == [("production", 1)]
        assert model.HasField("traffic_policy") and model.traffic_policy.revision == policy.revision == 1
        assert [(d.version, d.replicas) for d in deployments] == [(1, 1)]
        assert [e.action for e in entries] == [
            "model.create", "version.create", "alias.set", "traffic.set", "deployment.set", "gate.pass"]
        assert {e.actor for e in entries} == {"admin-token"}
        assert json.loads(entries[2].details_json)["reason"] == "go"
    finally:
        stop(process)
