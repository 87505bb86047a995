"""services/model_import.py: telling sources apart, and the folder and lineage each one yields
(the pushes themselves are in tests/e2e/test_models_cli.py)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from services.model_import import detect_kind, guess_task, prepared_import
from tests.unit.model_sources import REVISION, hf_cache, hf_folder


def test_sources_are_told_apart(tmp_path):
    folder = hf_folder(tmp_path / "folder")
    repo, snapshot = hf_cache(tmp_path / "cache")
    gguf = tmp_path / "model.bin"
    gguf.write_bytes(b"GGUF" + b"\x00" * 16)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"\x08\x07")
    assert detect_kind(str(folder)) == "hf_folder"
    assert detect_kind(str(snapshot)) == "hf_cache"
    assert detect_kind(str(repo)) == "hf_cache"
    assert detect_kind(str(gguf)) == "gguf"
    assert detect_kind(str(onnx)) == "onnx"
    assert detect_kind("models:/fraud/3") == "mlflow"


def test_a_folder_without_config_is_not_guessed_at(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"\x00")
    with pytest.raises(ValueError, match="models push"):
        detect_kind(str(tmp_path))
    with pytest.raises(ValueError, match="no such file"):
        detect_kind(str(tmp_path / "missing"))


def test_hf_folder_lineage_names_the_folder(tmp_path):
    folder = hf_folder(tmp_path / "tiny")
    with prepared_import(str(folder), tmp_path / "work") as prepared:
        assert prepared.source.kind == "hf_folder"
        assert prepared.source.uri == str(folder.resolve())
        assert prepared.source.details["_name_or_path"] == "org/tiny"
        assert (prepared.name, prepared.task) == ("tiny", "generation")
        assert prepared.metadata.parameter_count == 12
        assert {f.path for f in prepared.files} == {"config.json", "model.safetensors", "tokenizer.json"}


@pytest.mark.parametrize("use_repo_folder", [False, True])
def test_hf_cache_snapshot_lineage_is_repo_at_revision(tmp_path, use_repo_folder):
    repo, snapshot = hf_cache(tmp_path / "cache")
    with prepared_import(str(repo if use_repo_folder else snapshot), tmp_path / "work") as prepared:
        assert prepared.source.kind == "hf_cache"
        assert prepared.source.uri == f"org/tiny-model@{REVISION}"
        assert prepared.source.details["ref"] == "main"
        assert prepared.name == "tiny-model"
        # The snapshot's names, with the blobs' bytes behind them.
        files = {f.path: f for f in prepared.files}
        assert set(files) == {"config.json", "model.safetensors", "tokenizer.json"}
        assert files["model.safetensors"].sha256 == (snapshot / "model.safetensors").resolve().name


def test_hf_cache_blob_whose_bytes_do_not_match_its_name_is_refused(tmp_path):
    _, snapshot = hf_cache(tmp_path / "cache")
    blob = (snapshot / "model.safetensors").resolve()
    blob.write_bytes(blob.read_bytes()[:-1] + b"\x01")
    with pytest.raises(ValueError, match="model.safetensors"), prepared_import(str(snapshot), tmp_path / "work"):
        pass


def test_hf_cache_snapshot_with_a_missing_blob_is_refused(tmp_path):
    _, snapshot = hf_cache(tmp_path / "cache")
    (snapshot / "tokenizer.json").resolve().unlink()
    with pytest.raises(ValueError, match="missing"), prepared_import(str(snapshot), tmp_path / "work"):
        pass


def scorer_with_external_data(path):
    """x [B, 4] @ w [4, 2] -> y [B, 2], with w in `<file>.data` (as torch.onnx writes big models)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.arange(8, dtype=np.float32).reshape(4, 2), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "scorer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2])], [weight])
    onnx.save_model(helper.make_model(graph), str(path), save_as_external_data=True,
                    location=f"{path.name}.data", size_threshold=0)
    return path


def test_onnx_file_becomes_a_tensor_model_with_its_external_data(tmp_path):
    onnx = scorer_with_external_data(tmp_path / "scorer.onnx")
    with prepared_import(str(onnx), tmp_path / "work") as prepared:
        assert (prepared.source.kind, prepared.task, prepared.name) == ("onnx", "tensor", "scorer")
        assert prepared.source.details["sha256"] == hashlib.sha256(onnx.read_bytes()).hexdigest()
        assert prepared.config["inputs"] == [{"name": "x", "datatype": "FP32", "dims": [4]}]
        assert prepared.config["max_batch_size"] == 64
        assert prepared.metadata.parameter_count == 8
        # Pushed from where they are (no staging copy or links to leave behind).
        assert {(f.path, f.absolute) for f in prepared.files} == {
            ("scorer.onnx", onnx), ("scorer.onnx.data", tmp_path / "scorer.onnx.data")}
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("uri", ["models:/fraud", "models:/fraud/latest", "models:/fraud/1/extra"])
def test_mlflow_uri_must_name_a_version_number(tmp_path, uri):
    with pytest.raises(ValueError, match="models:/NAME/VERSION"), \
            prepared_import(uri, tmp_path / "work", "sqlite:///unused.db"):
        pass


def test_task_is_guessed_only_when_plain(tmp_path):
    assert guess_task(hf_folder(tmp_path / "a", ("Qwen2ForCausalLM",), "qwen2")) == "generation"
    assert guess_task(hf_folder(tmp_path / "b", ("BertModel",), "bert")) == "embedding"
    assert guess_task(hf_folder(tmp_path / "c", ("BertForSequenceClassification",), "bert")) == ""
