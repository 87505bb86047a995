"""ONNX graphs to served models, in process: the config read from a graph (batch dimension,
runtime options), and OnnxModel's checks and batches against a real onnxruntime session.

Requests are built with tritonclient's compiled Triton protos (our `protos.inference` cannot be
imported in the same process); responses are end to end, in tests/e2e/test_onnx_models.py."""

from __future__ import annotations

import asyncio
import warnings

import numpy as np
import pytest
import torch

from tritonclient.grpc import service_pb2 as pb

from services.common.errors import InvalidArgument
from services.onnx_signature import read_signature, serving_config
from services.worker.batcher import BatcherConfig
from services.worker.onnx_model import OnnxModel, TensorJob
from services.worker.onnx_session import open_session, session_signature

VOCAB_SIZE = 10


class Pair(torch.nn.Module):
    """ids [B, T] int64 and weights [B, T] float -> [B, T, 4]: two inputs sharing B and T."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(VOCAB_SIZE, 4)

    def forward(self, ids, weights):
        return self.table(ids) * weights.unsqueeze(-1)


def export(module, args, path, input_names, output_names, dynamic_axes=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, dynamo=False)
    return path


@pytest.fixture(scope="module")
def pair_path(tmp_path_factory):
    axes = {0: "batch", 1: "sequence"}
    return export(Pair(), (torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 3)),
                  tmp_path_factory.mktemp("pair") / "pair.onnx", ["ids", "weights"], ["vectors"],
                  {"ids": axes, "weights": axes, "vectors": axes})


@pytest.fixture(scope="module")
def fixed_path(tmp_path_factory):
    return export(torch.nn.Linear(8, 2), (torch.randn(1, 8),), tmp_path_factory.mktemp("fixed") / "fixed.onnx",
                  ["x"], ["y"])


def served(path, max_batch_size: int = 16, max_queue_delay_us: int = 20_000) -> OnnxModel:
    session = open_session(path, {})
    batcher = BatcherConfig(max_batch_size=max_batch_size, max_queue_delay_us=max_queue_delay_us) \
        if max_batch_size else None
    return OnnxModel("m", "1", session, session_signature(session), batcher,
                     {"graph_optimization_level": "all", "intra_op_num_threads": 0, "inter_op_num_threads": 0})


def request(**arrays) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m")
    for name, (array, datatype) in arrays.items():
        message.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        message.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return message


def pair_job(model: OnnxModel, ids: np.ndarray) -> TensorJob:
    weights = np.linspace(0.5, 2, ids.size, dtype=np.float32).reshape(ids.shape)
    return model.job_from_infer_request(request(ids=(ids, "INT64"), weights=(weights, "FP32")))


def expected(model: OnnxModel, job: TensorJob) -> np.ndarray:
    return model.session.run(None, job.inputs)[0]


def test_dynamic_first_dims_are_the_batch_dimension(pair_path):
    config = serving_config(read_signature(pair_path), "pair.onnx")
    assert config["max_batch_size"] == 64
    assert config["inputs"] == [{"name": "ids", "datatype": "INT64", "dims": [-1]},
                                {"name": "weights", "datatype": "FP32", "dims": [-1]}]
    assert config["outputs"] == [{"name": "vectors", "datatype": "FP32", "dims": [-1, 4]}]


def test_a_fixed_first_dim_means_no_batching_and_refuses_max_batch_size(fixed_path):
    signature = read_signature(fixed_path)
    config = serving_config(signature, "fixed.onnx")
    assert config["max_batch_size"] == 0
    assert config["inputs"] == [{"name": "x", "datatype": "FP32", "dims": [1, 8]}]
    with pytest.raises(ValueError, match="batch dimension"):
        serving_config(signature, "fixed.onnx", {"max_batch_size": 8})


def test_runtime_options_come_from_the_config_and_are_checked(pair_path):
    signature = read_signature(pair_path)
    config = serving_config(signature, "pair.onnx", {"onnxruntime": {"intra_op_num_threads": 2,
                                                                     "graph_optimization_level": "basic"}})
    assert config["onnxruntime"] == {"graph_optimization_level": "basic", "intra_op_num_threads": 2,
                                     "inter_op_num_threads": 0}
    for bad in ({"graph_optimization_level": "max"}, {"intra_op_num_threads": -1}, {"threads": 2}):
        with pytest.raises(ValueError, match="onnxruntime"):
            serving_config(signature, "pair.onnx", {"onnxruntime": bad})
    with pytest.raises(ValueError, match="inputs"):
        serving_config(signature, "pair.onnx", {"inputs": []})


def test_requests_of_different_lengths_share_a_batch_in_shape_groups(pair_path):
    model = served(pair_path)
    try:
        jobs = [pair_job(model, np.array([[1, 2, 3]] * n)) for n in (1, 2)] + [pair_job(model, np.array([[4, 5, 6, 7, 8]]))]
        results = model._execute(jobs).results
        for job, result in zip(jobs, results):
            np.testing.assert_allclose(result["vectors"], expected(model, job), rtol=1e-6)
            assert result["vectors"].shape[0] == job.num_items
    finally:
        model.close()


def test_a_request_the_session_refuses_fails_alone(pair_path):
    model = served(pair_path)
    try:
        good = [pair_job(model, np.array([[1, 2, 3]])), pair_job(model, np.array([[3, 2, 1], [0, 0, 9]]))]
        bad = pair_job(model, np.array([[1, VOCAB_SIZE + 5, 2]]))  # out of the table: the Gather refuses it
        results = model._execute([good[0], bad, good[1]]).results
        assert isinstance(results[1], InvalidArgument)
        for job, result in zip(good, (results[0], results[2])):
            np.testing.assert_allclose(result["vectors"], expected(model, job), rtol=1e-6)
    finally:
        model.close()


def test_inputs_sharing_a_named_dimension_must_agree(pair_path):
    model = served(pair_path)
    try:
        message = request(ids=(np.zeros((1, 3), np.int64), "INT64"), weights=(np.ones((1, 4), np.float32), "FP32"))
        with pytest.raises(InvalidArgument, match="sequence"):
            model.job_from_infer_request(message)
    finally:
        model.close()


def test_a_batched_model_answers_concurrent_requests_through_one_batch(pair_path):
    # A long delay, so a loaded machine cannot split the batch; it leaves when full (1 + 2 + 3 rows).
    model = served(pair_path, max_batch_size=6, max_queue_delay_us=30_000_000)

    jobs = [pair_job(model, np.full((n, 3), n)) for n in (1, 2, 3)]

    async def send_all():
        return await asyncio.gather(*(model.batcher.submit_async(job, job.num_items) for job in jobs))

    try:
        results = asyncio.run(send_all())
        for job, result in zip(jobs, results):
            np.testing.assert_allclose(result["vectors"], expected(model, job), rtol=1e-6)
        assert model.statistics().execution_count == 1
    finally:
        model.close()


def test_an_unbatched_model_takes_the_graph_shape_as_it_is(fixed_path):
    model = served(fixed_path, max_batch_size=0)
    try:
        assert model.max_batch_size == 0 and model.inputs["x"].dims == (1, 8)
        job = model.job_from_infer_request(request(x=(np.ones((1, 8), np.float32), "FP32")))
        result = asyncio.run(model.batcher.submit_async(job, job.num_items))
        np.testing.assert_allclose(result["y"], expected(model, job), rtol=1e-6)
        with pytest.raises(InvalidArgument, match="shape"):
            model.job_from_infer_request(request(x=(np.ones((2, 8), np.float32), "FP32")))
    finally:
        model.close()


def test_a_cuda_worker_without_the_cuda_provider_runs_on_the_cpu(fixed_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    session = open_session(fixed_path, {}, device="cuda")
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_int8_import_records_itself_and_is_refused_where_it_cannot_apply(fixed_path, tmp_path):
    from services.model_import import prepared_import
    from tests.unit.test_imports import scorer_with_external_data

    with prepared_import(str(fixed_path), tmp_path / "work", quantize="int8") as prepared:
        assert prepared.source.details["quantization"] == "int8_dynamic"
        assert prepared.labels == {"quantization": "int8_dynamic"}
        assert [f.path for f in prepared.files] == ["fixed.onnx"]
        assert prepared.files[0].sha256 == prepared.source.details["quantized_sha256"]
        assert prepared.config["inputs"] == [{"name": "x", "datatype": "FP32", "dims": [1, 8]}]
    with pytest.raises(ValueError, match="external-data"), \
            prepared_import(str(scorer_with_external_data(tmp_path / "big.onnx")), tmp_path / "work", quantize="int8"):
        pass
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 16)
    with pytest.raises(ValueError, match="onnx sources"), prepared_import(str(gguf), tmp_path / "work", quantize="int8"):
        pass
