"""`models diff`'s comparison of two versions (services/models_cli/diff.py), on protos built here."""

from __future__ import annotations

import json

from protos.tensoryard.v1 import registry_pb2
from services.models_cli.diff import version_diff


def version(number: int, files: dict[str, str], config: dict, **metadata) -> registry_pb2.ModelVersion:
    return registry_pb2.ModelVersion(
        model_name="m", version=number, config_json=json.dumps(config),
        files=[registry_pb2.ModelFile(path=p, sha256=sha, size_bytes=len(sha)) for p, sha in files.items()],
        metadata=registry_pb2.VersionMetadata(**metadata),
    )


def test_files_are_compared_by_path_and_sha256():
    a = version(1, {"keep": "k", "gone": "g", "edit": "e1"}, {})
    b = version(2, {"keep": "k", "new": "n", "edit": "e2"}, {})
    files = version_diff(a, b)["files"]
    assert [f["path"] for f in files["added"]] == ["new"]
    assert [f["path"] for f in files["removed"]] == ["gone"]
    assert files["changed"] == [{"path": "edit", "sha256": ["e1", "e2"], "size_bytes": [2, 2]}]
    assert files["unchanged"] == 1


def test_nested_config_differences_are_named_by_dotted_keys():
    a = version(1, {}, {"batch": {"max_size": 4, "delay_us": 10}, "dropped": True})
    b = version(2, {}, {"batch": {"max_size": 8, "delay_us": 10}})
    assert version_diff(a, b)["config"] == {"batch.max_size": [4, 8], "dropped": [True, None]}


def test_identical_versions_differ_in_nothing():
    a = version(1, {"w": "s"}, {"x": 1}, architecture="BertModel", parameter_count=7)
    b = version(2, {"w": "s"}, {"x": 1}, architecture="BertModel", parameter_count=7)
    diff = version_diff(a, b)
    assert diff["metadata"] == {} and diff["config"] == {} and diff["files"]["changed"] == []


def test_metadata_differences_keep_their_types():
    a = version(1, {}, {}, dtype="float32", parameter_count=100)
    b = version(2, {}, {}, dtype="bfloat16", parameter_count=100)
    assert version_diff(a, b)["metadata"] == {"dtype": ["float32", "bfloat16"]}
