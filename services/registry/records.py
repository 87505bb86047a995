"""The registry's records and the checks every name, path and config passes before it is stored."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from dataclasses import dataclass, field
from enum import StrEnum

from services.common.errors import InvalidArgument
from services.registry.blobs import validate_sha256

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
# Never all digits (it starts with a letter), so a version reference is a number or an alias.
_ALIAS_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
_VERSION_NUMBER = re.compile(r"[0-9]{1,9}")
_AUDIT_ACTION = re.compile(r"[a-z][a-z0-9_.-]{0,63}")
LINEAGE_SOURCE_KINDS = frozenset({"", "folder", "hf_folder", "hf_cache", "gguf", "mlflow", "onnx", "optimize", "push"})
MAX_LABEL_CHARS = 1024


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
class VersionMetadata:
    """What a version is, as its publisher describes it; `config_digest` is the registry's own."""

    architecture: str = ""
    dtype: str = ""
    parameter_count: int = 0
    tokenizer: str = ""
    config_digest: str = ""  # sha256 of the canonical serving config JSON
    labels: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("architecture", "dtype", "tokenizer"):
            _check_text(f"metadata.{name}", getattr(self, name))
        if type(self.parameter_count) is not int or self.parameter_count < 0:
            raise InvalidArgument(
                f"metadata.parameter_count must be a non-negative int, got {self.parameter_count!r}"
            )
        _check_string_map("metadata.labels", self.labels)


@dataclass(frozen=True, slots=True)
class Lineage:
    """Where a version came from; `created_at_s` is the registry's clock at publish."""

    source_kind: str = ""  # one of LINEAGE_SOURCE_KINDS
    source_uri: str = ""
    parent_version: int = 0  # 0: none
    created_by: str = ""
    created_at_s: float = 0.0
    details: dict[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if self.source_kind not in LINEAGE_SOURCE_KINDS:
            allowed = ", ".join(sorted(kind for kind in LINEAGE_SOURCE_KINDS if kind))
            raise InvalidArgument(f"lineage.source_kind {self.source_kind!r}: expected one of {allowed}")
        _check_text("lineage.source_uri", self.source_uri)
        _check_text("lineage.created_by", self.created_by)
        if type(self.parent_version) is not int or self.parent_version < 0:
            raise InvalidArgument(f"lineage.parent_version must be >= 0, got {self.parent_version!r}")
        _check_string_map("lineage.details", self.details)


@dataclass(frozen=True, slots=True)
class VersionRecord:
    model_name: str
    version: int
    # Serving parameters (e.g. max_batch_size). A fresh copy per read: changing it changes
    # nothing stored. Left out of the hash because dicts are unhashable.
    config: dict = field(hash=False)
    files: tuple[FileRecord, ...]  # sorted by path
    created_at_s: float
    metadata: VersionMetadata = field(default_factory=VersionMetadata)
    lineage: Lineage = field(default_factory=Lineage)
    # The Gate message as a JSON object (proto field names); None: no gate.
    gate: dict | None = field(default=None, hash=False)
    aliases: tuple[str, ...] = ()  # sorted; what points at this version when it was read

    @property
    def total_bytes(self) -> int:
        return sum(file.size_bytes for file in self.files)


@dataclass(frozen=True, slots=True)
class AliasRecord:
    model_name: str
    name: str
    version: int
    updated_at_s: float


@dataclass(frozen=True, slots=True)
class DeploymentRecord:
    model_name: str
    version: int
    replicas: int  # 0: none wanted
    updated_at_s: float
    # Autoscaled (issue 12): the registry's autoscaler sets `replicas` within these bounds. A fixed
    # deployment has autoscale False and both bounds 0.
    min_replicas: int = 0
    max_replicas: int = 0
    autoscale: bool = False


@dataclass(frozen=True, slots=True)
class AuditEntry:
    sequence: int
    at_s: float
    actor: str
    action: str  # "model.create", "version.create", "alias.set", ... (registry.proto)
    model_name: str
    version: int  # 0: not about one version
    details: dict = field(hash=False)


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


def check_link_stays_inside(folder: Path, absolute: Path) -> None:
    """InvalidArgument when `absolute` (a file under `folder`) is a link that leads out of it.

    A model folder holding `weights.bin -> /etc/shadow` must not ship that file to the registry
    and every worker. One exception: a Hugging Face cache snapshot (`<repo>/snapshots/<rev>/`) is
    made of links into its repository's `blobs/` folder, where the bytes live.
    """
    folder = Path(folder).resolve()
    target = Path(absolute).resolve()
    if target.is_relative_to(folder):
        return
    if folder.parent.name == "snapshots" and target.is_relative_to(folder.parent.parent / "blobs"):
        return
    raise InvalidArgument(f"{absolute} is a link to {target}, outside the model folder {folder}")


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


def validate_alias_name(name: object) -> str:
    if not isinstance(name, str) or _ALIAS_NAME.fullmatch(name) is None:
        raise InvalidArgument(
            f"invalid alias name {name!r}: use 1-64 letters, digits, '_', '.' or '-', "
            "starting with a letter"
        )
    return name


def parse_version_ref(ref: object) -> int | str:
    """A version reference as the number it names, or the alias name; "" is the latest (0).

    Anything else ('..', '/', NUL, '-1', '1.0') is InvalidArgument: references reach log lines,
    metrics labels and, on workers, file names.
    """
    if ref == "":
        return 0
    if isinstance(ref, str) and _VERSION_NUMBER.fullmatch(ref):
        if int(ref) == 0:
            raise InvalidArgument("version reference '0' names no version: leave it empty for the latest")
        return int(ref)
    if isinstance(ref, str) and _ALIAS_NAME.fullmatch(ref):
        return ref
    raise InvalidArgument(
        f"invalid version reference {ref!r}: give a version number or an alias name "
        "(1-64 letters, digits, '_', '.' or '-', starting with a letter)"
    )


def validate_audit_action(action: object) -> str:
    if not isinstance(action, str) or _AUDIT_ACTION.fullmatch(action) is None:
        raise InvalidArgument(
            f"invalid audit action {action!r}: use 1-64 lowercase letters, digits, '_', '.' or '-' "
            "(e.g. gate.pass, rollback)"
        )
    return action


def config_digest(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or "\0" in value or len(value) > MAX_LABEL_CHARS:
        raise InvalidArgument(f"{name} must be a string of at most {MAX_LABEL_CHARS} characters without NUL")


def _check_string_map(name: str, mapping: object) -> None:
    if not isinstance(mapping, dict):
        raise InvalidArgument(f"{name} must be a map of strings, got {type(mapping).__name__}")
    for key, value in mapping.items():
        if not isinstance(key, str) or not key:
            raise InvalidArgument(f"{name}: keys must be non-empty strings, got {key!r}")
        _check_text(f"{name}[{key!r}]", key)
        _check_text(f"{name}[{key!r}]", value)


def check_version_number(version: object) -> None:
    if type(version) is not int or version < 1:
        raise InvalidArgument(f"version must be a positive integer, got {version!r}")
