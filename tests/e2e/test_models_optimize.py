"""`tensoryard models optimize`: a float32 LLM version becomes a bf16 version of the same model with
its quality figures in the version's metadata, through a real registry and the real CLI; a version
outside its bounds is not pushed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT, start_registry, stop
from tests.engine.checkpoints import byte_tokenizer, save_checkpoint

MODEL = "tiny-llm"


def models(registry: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "services.cli", "models", *args, "--registry", registry, "--json"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, check=False)


def ok(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    home = tmp_path_factory.mktemp("optimize")
    folder = home / "checkpoint"
    save_checkpoint(folder, "llama")
    byte_tokenizer().save(str(folder / "tokenizer.json"))
    address, process = start_registry(home)
    try:
        ok(models(address, "push", MODEL, str(folder), "--task", "generation"))
        yield {"address": address, "work": str(home / "work")}
    finally:
        stop(process)


def test_a_bf16_version_carries_its_quality_figures_config_and_lineage(registry):
    pushed = ok(models(registry["address"], "optimize", "--model", MODEL, "--weight-dtype", "bfloat16",
                       "--work-dir", registry["work"]))
    version = pushed["version"]
    assert pushed["created"] and version["version"] == 2
    assert version["config"]["weight_dtype"] == "bfloat16"
    labels = version["metadata"]["labels"]
    assert labels["quality.reference"] == "float32" and labels["quality.weight_dtype"] == "bfloat16"
    assert 0.0 <= float(labels["quality.greedy_agreement"]) <= 1.0
    ratio = float(labels["quality.ppl_ratio"])
    assert 0.9 < ratio <= 1.02, labels  # within the dtype's bound, else it would not have been pushed
    assert version["metadata"]["dtype"] == "bfloat16"
    assert version["lineage"]["parent_version"] == 1
    assert version["lineage"]["source_kind"] == "optimize"
    source = ok(models(registry["address"], "show", f"{MODEL}:1"))["version"]
    # The same files: the blobs are stored once, nothing was uploaded again.
    assert sorted((f["path"], f["sha256"]) for f in version["files"]) == \
        sorted((f["path"], f["sha256"]) for f in source["files"])
    assert all(upload["outcome"] == "stored" for upload in pushed["uploads"])


def test_outside_its_bounds_nothing_is_pushed(registry):
    before = ok(models(registry["address"], "show", MODEL))["version"]["version"]
    done = models(registry["address"], "optimize", "--model", f"{MODEL}:1", "--weight-dtype", "int8",
                  "--max-ppl-ratio", "0.5", "--work-dir", registry["work"])
    assert done.returncode != 0
    assert "not pushed" in done.stderr and "perplexity ratio" in done.stderr
    assert ok(models(registry["address"], "show", MODEL))["version"]["version"] == before


def test_an_optimised_version_is_not_a_source(registry):
    done = models(registry["address"], "optimize", "--model", f"{MODEL}:2", "--weight-dtype", "int8",
                  "--work-dir", registry["work"])
    assert done.returncode != 0 and "float32 version" in done.stderr
