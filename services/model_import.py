"""`tensoryard models import SOURCE`: what SOURCE is, the folder to push for it, and its lineage.

Sources, told apart by `detect_kind`:
- `hf_folder`: a Hugging Face model folder (config.json); pushed as it is.
- `hf_cache`: a snapshot in a Hugging Face cache (`.../models--org--name/snapshots/<revision>`, or
  the `models--org--name` folder, whose refs/main names the snapshot); read offline, and each file
  whose blob is named by a sha256 (LFS files) is checked against it before anything is sent.
- `gguf`: a llama.cpp GGUF file, converted to a safetensors folder (services/worker/models/gguf_import.py).
- `mlflow`: a registered model version, `models:/NAME/VERSION`, downloaded with MLflow's own client.
- `onnx`: an ONNX file (with its external-data file, if any), served as a tensor model with
  onnxruntime; its inputs and outputs become the version's config (services/onnx_signature.py),
  and `--quantize int8` pushes its int8 dynamic quantization instead, recorded in the lineage.

The registry verifies every blob's size and sha256 again when it creates the version.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from services.registry.client import LocalFile, Source, file_sha256, scan_folder
from services.registry.metadata_probe import ProbedMetadata, probe_folder, probe_gguf
from services.worker.models.gguf_import import import_gguf

SOURCE_KINDS = ("hf_folder", "hf_cache", "gguf", "mlflow", "onnx")
_MLFLOW_URI = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
# Architectures whose task is plain from their name; anything else needs --task.
_GENERATION_SUFFIXES = ("ForCausalLM", "LMHeadModel")
_EMBEDDING_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "mpnet", "distilbert", "nomic_bert", "modernbert")


@dataclass(frozen=True, slots=True)
class PreparedImport:
    """A folder ready to push, and what the CLI records about where it came from."""

    folder: Path
    source: Source
    name: str  # the model name to use when none is given
    task: str  # "" when it cannot be told: the caller must name one
    metadata: ProbedMetadata
    files: list[LocalFile]  # scanned (hashed) already
    config: dict | None = None  # the version's config when the source defines it; None: the user's as given
    labels: dict[str, str] = field(default_factory=dict)  # added to the user's


def detect_kind(source: str) -> str:
    """Which of SOURCE_KINDS `source` is; ValueError saying why when it is none of them."""
    if source.startswith("models:/"):
        return "mlflow"
    path = Path(source)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return "gguf"
        if path.suffix == ".onnx":
            return "onnx"
        raise ValueError(f"{source} is neither a GGUF file nor an .onnx file")
    if path.is_dir():
        if _snapshot_of(path) is not None:
            return "hf_cache"
        if (path / "config.json").is_file():
            return "hf_folder"
        raise ValueError(f"{source} holds no config.json and is no Hugging Face cache snapshot "
                         "(to upload a folder as it is, use `tensoryard models push`)")
    raise ValueError(f"{source}: no such file or folder (an MLflow version is models:/NAME/VERSION)")


@contextlib.contextmanager
def prepared_import(source: str, work_dir: Path, mlflow_tracking_uri: str = "", quantize: str = "",
                    config: dict | None = None) -> Iterator[PreparedImport]:
    """The folder and lineage for `source`; temporary downloads are removed on leaving.

    `config` is the user's serving config, which an ONNX source merges into the graph's;
    `quantize` ("int8") applies to ONNX sources only."""
    kind = detect_kind(source)
    if quantize and kind != "onnx":
        raise ValueError(f"--quantize applies to .onnx sources; {source} is a {kind} source")
    if kind == "mlflow":
        with _mlflow_version(source, mlflow_tracking_uri, work_dir) as prepared:
            yield prepared
    elif kind == "onnx":
        yield _onnx_file(Path(source), work_dir, quantize, config or {})
    elif kind == "gguf":
        yield _gguf_file(Path(source), work_dir)
    elif kind == "hf_cache":
        yield _hf_cache_snapshot(Path(source))
    else:
        yield _hf_folder(Path(source))


def guess_task(folder: Path) -> str:
    """"generation" or "embedding" when config.json makes it plain, else ""."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return ""
    architectures = config.get("architectures") or []
    if any(isinstance(a, str) and a.endswith(_GENERATION_SUFFIXES) for a in architectures):
        return "generation"
    if config.get("model_type") in _EMBEDDING_MODEL_TYPES and not any("For" in str(a) for a in architectures):
        return "embedding"
    return ""


def _hf_folder(folder: Path) -> PreparedImport:
    folder = folder.resolve()
    config = json.loads((folder / "config.json").read_text())
    details = {key: str(config[key]) for key in ("_name_or_path", "transformers_version") if config.get(key)}
    return PreparedImport(folder, Source("hf_folder", str(folder), details), folder.name, guess_task(folder),
                          probe_folder(folder), scan_folder(folder))


def _snapshot_of(path: Path) -> tuple[Path, str, str] | None:
    """(snapshot folder, "org/name", revision) when `path` is an HF cache snapshot or repo folder."""
    path = path.resolve()
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        repo = path.parent.parent
        return path, _repo_id(repo.name), path.name
    if path.name.startswith("models--") and (path / "snapshots").is_dir():
        ref = path / "refs" / "main"
        if not ref.is_file():
            raise ValueError(f"{path} has no refs/main: name a snapshot, {path}/snapshots/<revision>")
        revision = ref.read_text().strip()
        if not (path / "snapshots" / revision).is_dir():
            raise ValueError(f"{path}: refs/main names snapshot {revision}, which is not in the cache")
        return path / "snapshots" / revision, _repo_id(path.name), revision
    return None


def _repo_id(folder_name: str) -> str:
    # The cache writes "models--org--name" for "org/name" ("--" never occurs in a repo id).
    return folder_name.removeprefix("models--").replace("--", "/")


def _hf_cache_snapshot(path: Path) -> PreparedImport:
    snapshot, repo_id, revision = _snapshot_of(path)
    for link in snapshot.rglob("*"):
        if link.is_symlink() and not link.exists():
            raise ValueError(f"{link} points at a blob missing from the cache (an interrupted download?)")
    files = scan_folder(snapshot)
    if not files:
        raise ValueError(f"snapshot {snapshot} holds no files")
    for file in files:
        blob_name = file.absolute.resolve().name
        if _SHA256_HEX.match(blob_name) and blob_name != file.sha256:
            raise ValueError(f"{file.path}: the cache's blob {blob_name} holds bytes with sha256 {file.sha256}")
    details = {"repo_id": repo_id, "revision": revision, "path": str(snapshot)}
    refs = snapshot.parent.parent / "refs"
    for ref in sorted(refs.glob("*")) if refs.is_dir() else ():
        if ref.is_file() and ref.read_text().strip() == revision:
            details["ref"] = ref.name
            break
    source = Source("hf_cache", f"{repo_id}@{revision}", details)
    return PreparedImport(snapshot, source, repo_id.rsplit("/", 1)[-1], guess_task(snapshot),
                          probe_folder(snapshot), files)


def convert_gguf(gguf_path: Path, out_dir: Path, show_progress: bool = True) -> Path:
    """Convert once: an existing folder (renamed into place only when complete) is reused."""
    if (out_dir / "config.json").is_file():
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if not show_progress:
        return import_gguf(gguf_path, out_dir)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("  importing {task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("tensors"), TimeElapsedColumn())
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(gguf_path.name, total=None)

        def report(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        return import_gguf(gguf_path, out_dir, progress=report)


def _gguf_file(path: Path, work_dir: Path) -> PreparedImport:
    path = path.resolve()
    sha256 = file_sha256(path)
    gguf = probe_gguf(path)
    # Keyed by the file's digest: a different file under the same name never reuses a conversion.
    folder = convert_gguf(path, work_dir / f"{path.stem}-{sha256[:12]}", show_progress=False)
    details = {"sha256": sha256, "file_type": gguf.dtype, "architecture": gguf.architecture,
               "parameter_count": str(gguf.parameter_count)}
    return PreparedImport(folder, Source("gguf", str(path), details), path.stem.split(".")[0], "generation",
                          probe_folder(folder), scan_folder(folder))


def _onnx_file(path: Path, work_dir: Path, quantize: str, user_config: dict) -> PreparedImport:
    # The model and its external-data files (torch.onnx writes "<file>.data"), under their names,
    # pushed from where they are: the file list names them, no staging folder is needed.
    from services.onnx_signature import read_signature, serving_config, weight_summary

    path = path.resolve()
    config = serving_config(read_signature(path), path.name, user_config)
    members = [path, *sorted(path.parent.glob(f"{path.name}.data")), *sorted(path.parent.glob(f"{path.name}_data"))]
    files = [LocalFile(member.name, member, file_sha256(member), member.stat().st_size) for member in members]
    details = {"sha256": files[0].sha256}
    labels = {}
    if quantize:
        if quantize != "int8":
            raise ValueError(f"--quantize {quantize!r}: only int8 (dynamic, onnxruntime.quantization)")
        from services.onnx_convert import QUANTIZATION_INT8, quantize_int8

        # Keyed by the source's digest, like GGUF conversions: reruns reuse it, another file never does.
        quantized = work_dir / f"{path.stem}-int8-{files[0].sha256[:12]}" / path.name
        if not quantized.is_file():
            quantize_int8(path, quantized)
        files = [LocalFile(path.name, quantized, file_sha256(quantized), quantized.stat().st_size)]
        details.update(quantization=QUANTIZATION_INT8, quantized_sha256=files[0].sha256)
        labels["quantization"] = QUANTIZATION_INT8
        path = quantized
    parameter_count, dtype = weight_summary(path)
    metadata = ProbedMetadata(architecture="onnx", dtype=dtype, parameter_count=parameter_count)
    return PreparedImport(path.parent, Source("onnx", str(members[0]), details), members[0].stem, "tensor",
                          metadata, files, config=config, labels=labels)


@contextlib.contextmanager
def _mlflow_version(uri: str, tracking_uri: str, work_dir: Path) -> Iterator[PreparedImport]:
    match = _MLFLOW_URI.match(uri)
    if match is None:
        raise ValueError(f"{uri}: an MLflow model version is models:/NAME/VERSION (VERSION a number)")
    if not tracking_uri:
        raise ValueError("an MLflow source needs --mlflow-tracking-uri (e.g. sqlite:///mlflow.db)")
    import mlflow.artifacts
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name, number = match["name"], match["version"]
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        version = client.get_model_version(name, number)
    except MlflowException as error:
        raise ValueError(f"MLflow at {tracking_uri}: {error.message}") from None
    if version.status != "READY":
        raise ValueError(f"MLflow model version {name}/{number} is {version.status}, not READY")
    work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".mlflow-", dir=work_dir))
    try:
        folder = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=client.get_model_version_download_uri(name, number),
            dst_path=str(staging), tracking_uri=tracking_uri,
        ))
        if folder.is_file():  # a single-file artifact
            folder = folder.parent
        # Not the tracking URI: it may carry credentials.
        details = {"run_id": version.run_id or "", "mlflow_source": version.source or ""}
        yield PreparedImport(folder, Source("mlflow", uri, details), name, guess_task(folder),
                             probe_folder(folder), scan_folder(folder))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
