"""The registry's records and the checks every name, path and config passes before it is stored."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from enum import StrEnum

from services.common.errors import InvalidArgument
from services.registry.blobs import validate_sha256

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class Task(StrEnum):
    EMBEDDING = "embedding"
    GENERATION = "generation"
    TENSOR = "tensor"


@dataclass(frozen=True, slots=True)
class ModelRecord:
    name: str
    task: Task
    description: str
    created_at_s: float


@dataclass(frozen=True, slots=True)
class FileRecord:
    path: str  # relative POSIX path inside the model folder, e.g. "onnx/model.onnx"
    sha256: str
    size_bytes: int

    def __post_init__(self) -> None:
        validate_file_path(self.path)
        validate_sha256(self.sha256)
        if type(self.size_bytes) is not int or self.size_bytes < 0:
            raise InvalidArgument(
                f"file {self.path!r}: size_bytes must be a non-negative int, "
                f"got {self.size_bytes!r}"
            )


@dataclass(frozen=True, slots=True)
class VersionRecord:
    model_name: str
    version: int
    # Serving parameters (e.g. max_batch_size). A fresh copy per read: changing it changes
    # nothing stored. Left out of the hash because dicts are unhashable.
    config: dict = field(hash=False)
    files: tuple[FileRecord, ...]  # sorted by path
    created_at_s: float

    @property
    def total_bytes(self) -> int:
        return sum(file.size_bytes for file in self.files)


def validate_model_name(name: object) -> str:
    # fullmatch, not `$`: `$` would also accept a trailing newline.
    if not isinstance(name, str) or _MODEL_NAME.fullmatch(name) is None:
        raise InvalidArgument(
            f"invalid model name {name!r}: use 1-128 letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_file_path(path: object) -> str:
    """`path` if it is a canonical relative POSIX path that stays inside the model folder.

    Workers materialise these paths on disk, so `..`, absolute paths and backslashes (a
    separator on Windows) are refused; `.` and empty parts too, so that one file has one
    spelling and version comparisons by path are exact.
    """
    if not isinstance(path, str) or not path:
        raise InvalidArgument(f"file path must be a non-empty string, got {path!r}")
    if "\\" in path or "\0" in path:
        raise InvalidArgument(f"file path {path!r} must not contain backslashes or NUL")
    if path.startswith("/"):
        raise InvalidArgument(f"file path {path!r} must be relative")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise InvalidArgument(f"file path {path!r} must not contain '..', '.' or empty parts")
    return path


def validate_task(task: object) -> Task:
    try:
        return Task(task)
    except ValueError:
        allowed = ", ".join(t.value for t in Task)
        raise InvalidArgument(f"invalid task {task!r}: expected one of {allowed}") from None


def canonical_config_json(config: object) -> str:
    """One JSON spelling per config, so equal configs compare equal as text."""
    if not isinstance(config, dict):
        raise InvalidArgument(f"config must be a JSON object, got {type(config).__name__}")
    try:
        return json.dumps(config, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as error:
        raise InvalidArgument(f"config is not JSON-serializable: {error}") from None
