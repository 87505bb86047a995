"""`tensoryard models ...` as a user runs it, against a real `tensoryard registry` process: push, list,
show, alias, diff, rm, a push resumed after kill -9 (of the push, and of the registry), and imports
from an HF folder, an HF cache snapshot, a GGUF file and a local MLflow store."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2
from safetensors.torch import save_file

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from tests.conftest import REPO_ROOT, cli, free_port, health_status, start_registry, stop, wait_until
from tests.unit.model_sources import REVISION, hf_cache, hf_folder

BIG_FILE_BYTES = 8 << 20
# Slow enough that the push is still sending when the test kills it: 8 MiB at 512 KiB/s leaves
# some 14 s after the first MiB, room for a loaded 2-core machine to notice and send the signal.
SLOW_PUSH = ("--chunk-bytes", str(64 << 10), "--max-bytes-per-s", str(512 << 10))


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    address, process = start_registry(tmp_path_factory.mktemp("models-cli"))
    yield address
    stop(process)


def models(registry: str, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "models", *args, "--registry", registry],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False,
    )


def models_json(registry: str, *args: str, timeout_s: float = 300) -> dict:
    done = models(registry, *args, "--json", timeout_s=timeout_s)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def model_folder(folder, seed: int = 0, extra: dict | None = None):
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    save_file({"w": torch.rand(16, 8, generator=generator)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architectures": ["TinyModel"], "torch_dtype": "float32"}))
    for name, data in (extra or {}).items():
        (folder / name).write_bytes(data)
    return folder


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def held_bytes(registry: str, sha256: str) -> int:
    with grpc.insecure_channel(registry) as channel:
        reply = registry_pb2_grpc.ModelRegistryStub(channel).GetUpload(
            registry_pb2.GetUploadRequest(upload_id=sha256, sha256=[sha256]), timeout=5)
    return reply.received_bytes


def settled_held_bytes(registry: str, sha256: str) -> int:
    """What the registry holds once the killed stream's last chunks are written."""
    last = -1
    for _ in range(50):
        now = held_bytes(registry, sha256)
        if now == last:
            return now
        last = now
        time.sleep(0.2)
    return last


def test_push_then_list_and_show_name_the_source(registry, tmp_path):
    folder = model_folder(tmp_path / "tiny")
    pushed = models_json(registry, "push", "tiny", str(folder), "--task", "tensor",
                         "--config", '{"max_batch_size": 4}', "--label", "team=search")
    assert pushed["created"] and pushed["version"]["version"] == 1
    listed = {m["name"]: m for m in models_json(registry, "list")["models"]}
    assert listed["tiny"]["versions"] == [1] and listed["tiny"]["task"] == "tensor"
    shown = models_json(registry, "show", "tiny")
    version = shown["version"]
    assert version["lineage"]["source_kind"] == "push"
    assert version["lineage"]["source_uri"] == str(folder.resolve())
    assert version["metadata"]["architecture"] == "TinyModel"
    assert version["metadata"]["parameter_count"] == 16 * 8
    assert version["metadata"]["labels"] == {"team": "search"}
    assert version["config"] == {"max_batch_size": 4}
    assert {f["path"] for f in version["files"]} == {"config.json", "model.safetensors"}
    assert "version.create" in {e["action"] for e in shown["audit"]}
    human = models(registry, "show", "tiny:1")
    assert human.returncode == 0 and "push" in human.stdout and "model.safetensors" in human.stdout


def test_pushing_the_same_folder_again_creates_nothing(registry, tmp_path):
    folder = model_folder(tmp_path / "same")
    assert models_json(registry, "push", "same", str(folder), "--task", "tensor")["created"]
    again = models(registry, "register", "same", str(folder), "--task", "tensor")
    assert again.returncode == 0 and "unchanged, already registered as version 1" in again.stdout


def test_alias_points_show_at_a_version_and_rm_is_refused_while_it_does(registry, tmp_path):
    models_json(registry, "push", "aliased", str(model_folder(tmp_path / "v1", seed=1)), "--task", "tensor")
    models_json(registry, "push", "aliased", str(model_folder(tmp_path / "v2", seed=2)), "--task", "tensor",
                "--parent", "1")
    assert models_json(registry, "alias", "aliased", "production", "1")["version"] == 1
    assert models_json(registry, "show", "aliased:production")["version"]["version"] == 1
    assert models_json(registry, "show", "aliased:2")["version"]["lineage"]["parent_version"] == 1

    refused = models(registry, "rm", "aliased", "1")
    assert refused.returncode == 1
    assert "FAILED_PRECONDITION" in refused.stderr and "production" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1

    assert models_json(registry, "alias", "aliased", "production", "--delete")["deleted"]
    assert models(registry, "show", "aliased:production").returncode == 1
    removed = models(registry, "rm", "aliased", "1")
    assert removed.returncode == 0, removed.stderr
    listed = {m["name"]: m for m in models_json(registry, "list")["models"]}
    assert listed["aliased"]["versions"] == [2] and listed["aliased"]["aliases"] == {}
    actions = [e["action"] for e in models_json(registry, "show", "aliased")["audit"]]
    assert {"alias.set", "alias.delete", "version.delete"} <= set(actions)


def test_a_gate_file_travels_with_the_version(registry, tmp_path):
    gate = {"golden_embeddings": [{"text": "hello", "expected": [0.5, 0.5], "min_cosine": 0.999}],
            "latency_budget_s": 2.0}
    (tmp_path / "gate.json").write_text(json.dumps(gate))
    folder = model_folder(tmp_path / "gated")
    pushed = models_json(registry, "push", "gated", str(folder), "--task", "tensor", "--gate", str(tmp_path / "gate.json"))
    assert pushed["version"]["gate"] == gate
    assert models_json(registry, "show", "gated:1")["version"]["gate"] == gate
    # A new gate on the same files is a new version: what must be passed is part of what a version is.
    gate["latency_budget_s"] = 1.0
    (tmp_path / "gate.json").write_text(json.dumps(gate))
    again = models_json(registry, "push", "gated", str(folder), "--task", "tensor", "--gate", str(tmp_path / "gate.json"))
    assert again["created"] and again["version"]["version"] == 2
    (tmp_path / "bad.json").write_text('{"golden_prompts": 3}')
    bad = models(registry, "push", "gated", str(folder), "--task", "tensor", "--gate", str(tmp_path / "bad.json"))
    assert bad.returncode == 1 and "not a gate" in bad.stderr


def test_traffic_sets_sticky_and_ab_keys_and_rollback_bounds_keeping_the_split(registry, tmp_path):
    for seed in (1, 2):
        models_json(registry, "push", "routed", str(model_folder(tmp_path / f"v{seed}", seed=seed)), "--task", "tensor")
    no_policy = models(registry, "traffic", "routed", "--sticky-key", "x-user-id")
    assert no_policy.returncode == 1 and "promote" in no_policy.stderr
    with grpc.insecure_channel(registry) as channel:
        registry_pb2_grpc.ModelRegistryStub(channel).SetTrafficPolicy(registry_pb2.SetTrafficPolicyRequest(
            policy=registry_pb2.TrafficPolicy(model_name="routed", stable_version=1, splits=[
                registry_pb2.TrafficSplit(version=1, percent=90), registry_pb2.TrafficSplit(version=2, percent=10)])))

    changed = models_json(registry, "traffic", "routed", "--sticky-key", "x-user-id", "--ab-key", "x-variant",
                          "--ab-route", "a=1", "--ab-route", "b=2", "--rollback-window-s", "20",
                          "--rollback-min-requests", "50", "--reason", "experiment 7")["traffic_policy"]
    assert changed["splits"] == [{"version": 1, "percent": 90.0}, {"version": 2, "percent": 10.0}]
    assert (changed["sticky_key"], changed["ab_key"]) == ("x-user-id", "x-variant")
    assert changed["ab_routes"] == [{"value": "a", "version": 1}, {"value": "b", "version": 2}]
    assert (changed["rollback"]["window_s"], changed["rollback"]["min_requests"]) == (20.0, 50)
    assert changed["revision"] == 2
    cleared = models_json(registry, "traffic", "routed", "--ab-key", "")["traffic_policy"]
    assert cleared["ab_key"] == "" and cleared["ab_routes"] == [] and cleared["sticky_key"] == "x-user-id"
    human = models(registry, "traffic", "routed")
    assert human.returncode == 0 and "sticky     by x-user-id" in human.stdout and "v2 10%" in human.stdout
    audit = models_json(registry, "show", "routed")["audit"]
    assert any(e["action"] == "traffic.set" and "experiment 7" in json.dumps(e) for e in audit)


def test_diff_lists_files_by_sha256_and_config_changes(registry, tmp_path):
    a = model_folder(tmp_path / "a", seed=1, extra={"notes.txt": b"first", "vocab.txt": b"a\nb\n"})
    b = model_folder(tmp_path / "b", seed=2, extra={"vocab.txt": b"a\nb\n", "tokenizer.json": b"{}"})
    models_json(registry, "push", "diffed", str(a), "--task", "tensor", "--config", '{"max_batch_size": 4}')
    models_json(registry, "push", "diffed", str(b), "--task", "tensor",
                "--config", '{"max_batch_size": 8, "max_queue_delay_us": 100}')
    diff = models_json(registry, "diff", "diffed", "1", "2")
    assert [f["path"] for f in diff["files"]["added"]] == ["tokenizer.json"]
    assert [f["path"] for f in diff["files"]["removed"]] == ["notes.txt"]
    changed = diff["files"]["changed"]
    assert [f["path"] for f in changed] == ["model.safetensors"]
    assert changed[0]["sha256"] == [sha256_of(a / "model.safetensors"), sha256_of(b / "model.safetensors")]
    assert diff["files"]["unchanged"] == 2  # config.json, vocab.txt
    assert diff["config"] == {"max_batch_size": [4, 8], "max_queue_delay_us": [None, 100]}
    assert diff["metadata"]["tokenizer"] == ["vocab.txt", "tokenizer.json"]
    human = models(registry, "diff", "diffed", "1", "2")
    assert "+ tokenizer.json" in human.stdout and "- notes.txt" in human.stdout


def test_registry_refusals_exit_1_naming_the_status(registry, tmp_path):
    missing = models(registry, "show", "no-such-model")
    assert missing.returncode == 1 and missing.stderr.startswith("tensoryard models show: NOT_FOUND:")
    bad_folder = models(registry, "push", "x", str(tmp_path / "absent"), "--task", "tensor")
    assert bad_folder.returncode == 1 and "is not a folder" in bad_folder.stderr
    (tmp_path / "escaping").mkdir()
    (tmp_path / "escaping" / "weights.bin").symlink_to("/etc/passwd")
    escaping = models(registry, "push", "escaping", str(tmp_path / "escaping"), "--task", "tensor")
    assert escaping.returncode == 1, escaping.stdout
    assert escaping.stderr.startswith("tensoryard models push: INVALID_ARGUMENT:") and "outside the model folder" in escaping.stderr


def big_model_folder(folder):
    folder.mkdir(parents=True)
    (folder / "weights.bin").write_bytes(os.urandom(BIG_FILE_BYTES))
    (folder / "config.json").write_text("{}")
    return folder, sha256_of(folder / "weights.bin")


def start_push(registry: str, name: str, folder) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "services.cli", "models", "push", name, str(folder), "--task", "tensor",
         "--registry", registry, *SLOW_PUSH],
        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )


def assert_resumed(registry: str, name: str, folder, sha256: str, held: int) -> None:
    resumed = models_json(registry, "push", name, str(folder), "--task", "tensor")
    uploads = {u["path"]: u for u in resumed["uploads"]}
    assert uploads["weights.bin"]["outcome"] == "resumed"
    assert uploads["weights.bin"]["resumed_at_bytes"] == held
    files = {f["path"]: f for f in resumed["version"]["files"]}
    assert files["weights.bin"]["sha256"] == sha256 and files["weights.bin"]["size_bytes"] == BIG_FILE_BYTES
    assert held_bytes(registry, sha256) == 0  # the spool is gone: the blob store holds it


def test_ctrl_c_stops_a_push_saying_how_to_resume(registry, tmp_path):
    folder, sha256 = big_model_folder(tmp_path / "big")
    push = start_push(registry, "ctrl-c-push", folder)
    try:
        wait_until(lambda: held_bytes(registry, sha256) >= 1 << 20, 60, "the push to send its first MiB")
    finally:
        push.send_signal(signal.SIGINT)
        assert push.wait(10) == 130
    assert push.stderr.read().decode().strip().splitlines()[-1] == \
        "tensoryard models push: interrupted (run it again to resume)"


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_push_resumes_where_it_stopped(registry, tmp_path, sig):
    folder, sha256 = big_model_folder(tmp_path / "big")
    name = f"resumed-push-{sig.name.lower()}"
    push = start_push(registry, name, folder)
    try:
        wait_until(lambda: held_bytes(registry, sha256) >= 1 << 20, 60, "the push to send its first MiB")
    finally:
        push.send_signal(sig)
        push.wait(10)
    held = settled_held_bytes(registry, sha256)
    assert 0 < held < BIG_FILE_BYTES
    assert_resumed(registry, name, folder, sha256, held)


def test_push_resumes_after_the_registry_is_killed_and_restarted(tmp_path):
    home = tmp_path / "home"
    port = free_port()
    address = f"127.0.0.1:{port}"

    def start():
        process = cli("registry", "--port", str(port), "--data-dir", str(home / "data"), "--metrics-port", "-1",
                      log_path=tmp_path / "registry.log")
        wait_until(lambda: health_status(address) == health_pb2.HealthCheckResponse.SERVING, 60, "the registry")
        return process

    registry_process = start()
    folder, sha256 = big_model_folder(tmp_path / "big")
    push = start_push(address, "survives-crash", folder)
    try:
        wait_until(lambda: held_bytes(address, sha256) >= 1 << 20, 60, "the push to send its first MiB")
        registry_process.send_signal(signal.SIGKILL)
        registry_process.wait(10)
        assert push.wait(60) == 1
        assert "UNAVAILABLE" in push.stderr.read().decode()
        registry_process = start()
        held = held_bytes(address, sha256)
        assert 0 < held < BIG_FILE_BYTES
        assert_resumed(address, "survives-crash", folder, sha256, held)
        with grpc.insecure_channel(address) as channel:
            verified = registry_pb2_grpc.ModelRegistryStub(channel).VerifyStore(
                registry_pb2.VerifyStoreRequest(rehash=True), timeout=60)
        assert list(verified.problems) == []
    finally:
        if push.poll() is None:
            push.kill()
        stop(registry_process)


def test_import_hf_folder_records_its_path(registry, tmp_path):
    folder = hf_folder(tmp_path / "tiny-llama")
    imported = models_json(registry, "import", str(folder), "--name", "hf-folder")
    version = imported["version"]
    assert version["task"] == "generation"
    assert version["lineage"]["source_kind"] == "hf_folder"
    assert version["lineage"]["source_uri"] == str(folder.resolve())
    assert version["metadata"]["architecture"] == "LlamaForCausalLM"


def test_import_hf_cache_snapshot_records_repo_and_revision(registry, tmp_path):
    _, snapshot = hf_cache(tmp_path / "hub")
    version = models_json(registry, "import", str(snapshot))["version"]
    assert version["model"] == "tiny-model"
    assert version["lineage"]["source_kind"] == "hf_cache"
    assert version["lineage"]["source_uri"] == f"org/tiny-model@{REVISION}"
    assert version["lineage"]["details"]["revision"] == REVISION
    # The snapshot's file names, not the cache's blob names.
    assert {f["path"] for f in version["files"]} == {"config.json", "model.safetensors", "tokenizer.json"}


@pytest.mark.slow
def test_import_gguf_records_the_file_and_its_quantization(registry, tmp_path):
    from services.worker.models.gguf_import import find_demo_gguf

    gguf = find_demo_gguf()
    imported = models_json(registry, "import", str(gguf), "--name", "gguf-demo", "--work-dir", str(tmp_path / "work"))
    version = imported["version"]
    assert version["lineage"]["source_kind"] == "gguf"
    assert version["lineage"]["source_uri"] == str(gguf.resolve())
    assert version["lineage"]["details"]["file_type"] == "Q4_1"
    assert version["lineage"]["details"]["sha256"] == sha256_of(gguf)
    assert version["metadata"]["architecture"] == "LlamaForCausalLM"
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= {f["path"] for f in version["files"]}


def mlflow_model_version(tmp_path, folder) -> tuple[str, str]:
    """A local MLflow store (sqlite + a file artifact root) holding `folder` as model version 1."""
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = f"""
import mlflow
from mlflow import MlflowClient
client = MlflowClient(tracking_uri={tracking_uri!r}, registry_uri={tracking_uri!r})
experiment = client.create_experiment("imports", artifact_location={(tmp_path / 'artifacts').as_uri()!r})
run = client.create_run(experiment)
client.log_artifacts(run.info.run_id, {str(folder)!r}, artifact_path="model")
client.set_terminated(run.info.run_id)
client.create_registered_model("fraud-scorer")
client.create_model_version("fraud-scorer", f"runs:/{{run.info.run_id}}/model", run_id=run.info.run_id)
print(run.info.run_id)
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    return tracking_uri, done.stdout.strip().splitlines()[-1]


def test_import_mlflow_model_version_records_its_run(registry, tmp_path):
    pytest.importorskip("mlflow")
    folder = model_folder(tmp_path / "logged")
    tracking_uri, run_id = mlflow_model_version(tmp_path, folder)
    version = models_json(registry, "import", "models:/fraud-scorer/1", "--mlflow-tracking-uri", tracking_uri,
                          "--task", "tensor", "--work-dir", str(tmp_path / "work"))["version"]
    assert version["model"] == "fraud-scorer"
    assert version["lineage"]["source_kind"] == "mlflow"
    assert version["lineage"]["source_uri"] == "models:/fraud-scorer/1"
    assert version["lineage"]["details"]["run_id"] == run_id
    files = {f["path"]: f["sha256"] for f in version["files"]}
    assert files == {"config.json": sha256_of(folder / "config.json"),
                     "model.safetensors": sha256_of(folder / "model.safetensors")}
    missing = models(registry, "import", "models:/fraud-scorer/9", "--mlflow-tracking-uri", tracking_uri,
                     "--task", "tensor", "--work-dir", str(tmp_path / "work"))
    assert missing.returncode == 1 and "fraud-scorer" in missing.stderr
