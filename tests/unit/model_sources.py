"""Model sources laid out as their tools write them: a Hugging Face folder and an HF cache
(used by tests/unit/test_imports.py and tests/e2e/test_models_cli.py)."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors.torch import save_file

REVISION = "0123456789abcdef0123456789abcdef01234567"


def hf_folder(folder, architectures=("LlamaForCausalLM",), model_type="llama"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"architectures": list(architectures), "model_type": model_type,
                                                     "torch_dtype": "float32", "_name_or_path": "org/tiny"}))
    save_file({"w": torch.zeros(3, 4)}, str(folder / "model.safetensors"))
    (folder / "tokenizer.json").write_text("{}")
    return folder


def hf_cache(root, repo_id="org/tiny-model", revision=REVISION):
    """The layout huggingface_hub writes: blobs named by content, snapshot files linking to them."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    source = hf_folder(root / "source")
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in source.iterdir():
        data = file.read_bytes()
        # LFS files (weights) are stored under their sha256, small ones under a git blob sha1.
        name = hashlib.sha256(data).hexdigest() if file.suffix == ".safetensors" else hashlib.sha1(data).hexdigest()
        (repo / "blobs" / name).write_bytes(data)
        (snapshot / file.name).symlink_to(f"../../blobs/{name}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return repo, snapshot
