"""Building the served model from an ONNX version (config "backend": "onnxruntime"): a Triton
tensor model (task "tensor") or a sentence encoder exported by `models export-onnx` (task
"embedding"). The version's `onnxruntime` config sets the session; the worker's --num-threads
overrides its intra-op threads and --max-batch-size its batch limit."""

from __future__ import annotations

from pathlib import Path

from services.common.config import WorkerConfig
from services.common.errors import FailedPrecondition
from services.onnx_signature import BACKEND, check_runtime_options
from services.worker.embedding_model import EmbeddingModel
from services.worker.loading import batcher_config_for
from services.worker.model_files import FetchedVersion
from services.worker.onnx_encoder import OnnxSentenceEncoder
from services.worker.onnx_model import OnnxModel
from services.worker.onnx_session import open_session, session_signature


def is_onnx_version(fetched: FetchedVersion) -> bool:
    return fetched.config.get("backend") == BACKEND


def load_onnx_model(fetched: FetchedVersion, config: WorkerConfig):
    version_config = fetched.config
    try:
        options = check_runtime_options(version_config.get("onnxruntime", {}))
    except ValueError as error:
        raise FailedPrecondition(f"model '{fetched.model_name}' version {fetched.version}: {error}") from None
    if config.num_threads > 0:
        options["intra_op_num_threads"] = config.num_threads
    model_path = _model_path(fetched)
    session = open_session(model_path, options, config.device)
    if fetched.task == "embedding":
        encoder = OnnxSentenceEncoder.from_session(fetched.folder, session)
        model = EmbeddingModel(fetched.model_name, str(fetched.version), encoder,
                               batcher_config_for(version_config, config))
        model.backend = BACKEND  # ModelConfig says which runtime serves it
    elif fetched.task == "tensor":
        signature = session_signature(session)
        max_batch_size = config.max_batch_size or int(version_config.get("max_batch_size", 0))
        if max_batch_size and not signature.has_batch_dim:
            raise FailedPrecondition(
                f"model '{fetched.model_name}': max_batch_size {max_batch_size}, but the graph has no batch "
                "dimension (a dynamic first dimension shared by every input and output)"
            )
        batcher = batcher_config_for({**version_config, "max_batch_size": max_batch_size}, config) \
            if max_batch_size else None
        model = OnnxModel(fetched.model_name, str(fetched.version), session, signature, batcher, options)
    else:
        raise FailedPrecondition(f"model '{fetched.model_name}' has task {fetched.task!r}; ONNX versions "
                                 "serve tasks tensor and embedding")
    model.weight_bytes = sum(p.stat().st_size for p in _model_files(model_path))
    return model


def _model_path(fetched: FetchedVersion) -> Path:
    name = str(fetched.config.get("model_file", "model.onnx"))
    path = fetched.folder / name
    # A plain name inside the version's folder: the config must not point the session elsewhere.
    if Path(name).name != name or not path.exists():
        raise FailedPrecondition(f"model '{fetched.model_name}' version {fetched.version}: model_file {name!r} "
                                 "is not a file of the version")
    return path


def _model_files(path: Path) -> list[Path]:
    return [path, *path.parent.glob(f"{path.name}.data"), *path.parent.glob(f"{path.name}_data")]
