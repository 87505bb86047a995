"""`tensoryard models export-onnx --model NAME[:REF] [--name NEW] [--quantize int8]`: a served
BERT-family encoder version becomes an ONNX version of its own, checked against it first.

The source version is fetched (verified) into the work folder, exported with torch.onnx
(services/onnx_convert.py), optionally quantized to int8, and run on the quality texts next to
the source on the torch path (services/encoder_quality.py). Below the bound for its kind nothing
is pushed; otherwise the new version holds model.onnx plus the source's tokenizer and
sentence-transformers files (not its safetensors weights), task "embedding", config backend
"onnxruntime", the agreement in its metadata labels, the source in its lineage, and (unless --gate
names one) a gate of golden embeddings: the quality texts with the torch path's vectors, at the
same bound.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import tempfile
from pathlib import Path

from services.models_cli.context import Context
from services.onnx_signature import BACKEND, DEFAULT_RUNTIME_OPTIONS, PLATFORM, check_runtime_options

MODEL_FILE = "model.onnx"
# The source's serving keys that an ONNX version must not inherit: they describe its own files.
_SOURCE_ONLY_KEYS = ("backend", "platform", "model_file", "onnxruntime", "dtype")


def add_export_onnx_command(sub, common, add_version_flags) -> None:
    export = sub.add_parser(
        "export-onnx", parents=[common],
        help="export a served BERT-family encoder version to ONNX (optionally int8) as a new version",
    )
    export.add_argument("--model", required=True, metavar="NAME[:REF]", help="REF: version or alias (default: latest)")
    export.add_argument("--name", help="the new model's name (default: NAME-onnx, or NAME-onnx-int8)")
    export.add_argument("--quantize", choices=("int8",), default="", help="int8 dynamic quantization")
    export.add_argument("--min-cosine", type=float, default=None,
                        help="refuse to push below this cosine similarity with float32 torch "
                             "(default: 0.999 float32, 0.97 int8; services/encoder_quality.py)")
    export.add_argument("--work-dir", type=Path, default=Path(".tensoryard/imports"),
                        help="where the source version is fetched and the export is written")
    add_version_flags(export)


def run_export_onnx(args: argparse.Namespace, ctx: Context) -> int:
    # Imported here: the parser (loaded by `tensoryard --help`) imports this module.
    from protos.tensoryard.v1 import registry_pb2
    from services.common.config import TelemetryConfig
    from services.common.telemetry import configure_logging
    from services.models_cli.listing import parse_target
    from services.models_cli.push import _config, _push, _report
    from services.onnx_convert import OPSET_VERSION, QUANTIZATION_INT8
    from services.registry.client import Source

    # The worker code it reuses logs as it goes: to stderr, warnings only, so --json's stdout stays one object.
    configure_logging("tensoryard-models", TelemetryConfig(log_level="warning"))
    name, ref = parse_target(args.model)
    source_version = ctx.stub.GetVersion(registry_pb2.GetVersionRequest(model_name=name, ref=ref))
    source_config = json.loads(source_version.config_json or "{}")
    if source_version.task != "embedding" or source_config.get("backend") == BACKEND:
        raise ValueError(f"{name}:{source_version.version} is a {source_version.task} version"
                         f"{' served by onnxruntime' if source_config.get('backend') == BACKEND else ''}; "
                         "export-onnx takes an embedding version on the torch path")
    config = _onnx_config(source_config, _config(args.config_json))
    source_ref = f"{name}:{source_version.version}"
    new_name = args.name or f"{name}-onnx{'-int8' if args.quantize else ''}"
    fetched = asyncio.run(_fetch(args, name, source_version.version, args.work_dir / "cache"))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".export-onnx-", dir=args.work_dir))
    try:
        folder = _export(fetched.folder, staging, args.quantize)
        agreement, min_cosine = _check_quality(ctx, args, fetched.folder, folder, f"{source_ref} float32 torch",
                                               new_name)
        quantization = {"quantization": QUANTIZATION_INT8} if args.quantize else {}
        details = {"exported_from": source_ref, "exporter": "torch.onnx (TorchScript)",
                   "opset": str(OPSET_VERSION), **quantization}
        source = Source("onnx", source_ref, details, parent_version=args.parent, created_by=ctx.user)
        result = _push(ctx, args, new_name, "embedding", folder, source, config=config,
                       extra_labels={**agreement.labels(), **quantization},
                       metadata=_metadata(source_version, folder, bool(args.quantize)),
                       gate=_golden_gate(agreement, min_cosine))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return _report(ctx, new_name, result)


def _export(source_folder: Path, staging: Path, quantize: str) -> Path:
    """The new version's folder: the pipeline files and model.onnx (float32, or int8 from it)."""
    from services.onnx_convert import export_sentence_encoder, quantize_int8

    folder = staging / "version"
    _copy_pipeline_files(source_folder, folder)
    if quantize:
        quantize_int8(export_sentence_encoder(source_folder, staging / "float32" / MODEL_FILE), folder / MODEL_FILE)
    else:
        export_sentence_encoder(source_folder, folder / MODEL_FILE)
    return folder


def _check_quality(ctx: Context, args, source_folder: Path, folder: Path, reference_name: str, new_name: str):
    """The export against the source on the torch path; ValueError (nothing pushed) below the bound."""
    from services.encoder_quality import MIN_COSINE, encoder_agreement
    from services.onnx_convert import QUANTIZATION_INT8
    from services.worker.models.sentence_encoder import SentenceEncoder
    from services.worker.onnx_encoder import OnnxSentenceEncoder
    from services.worker.onnx_session import open_session

    kind = QUANTIZATION_INT8 if args.quantize else "float32"
    min_cosine = MIN_COSINE[kind] if args.min_cosine is None else args.min_cosine
    candidate = OnnxSentenceEncoder.from_session(folder, open_session(folder / MODEL_FILE, DEFAULT_RUNTIME_OPTIONS))
    agreement = encoder_agreement(SentenceEncoder.from_folder(source_folder), candidate, reference_name)
    ctx.err.write(f"{new_name} ({kind}) vs {reference_name}: cosine min {agreement.min_cosine:.6f}, "
                  f"mean {agreement.mean_cosine:.6f} over {agreement.num_texts} texts (bound {min_cosine})\n")
    if agreement.min_cosine < min_cosine:
        raise ValueError(f"not pushed: cosine similarity {agreement.min_cosine:.6f} with float32 torch is below "
                         f"{min_cosine} (--min-cosine)")
    return agreement, min_cosine


def _metadata(source_version, folder: Path, quantized: bool):
    from services.onnx_signature import weight_summary
    from services.registry.metadata_probe import ProbedMetadata

    parameter_count, dtype = weight_summary(folder / MODEL_FILE)
    return ProbedMetadata(architecture=f"onnx:{source_version.metadata.architecture or 'BertModel'}",
                          dtype="int8" if quantized else dtype, parameter_count=parameter_count,
                          tokenizer=source_version.metadata.tokenizer or "tokenizer.json")


def _golden_gate(agreement, min_cosine: float):
    """The quality texts with the reference's embeddings: what the version's replicas must match."""
    from protos.tensoryard.v1 import registry_pb2

    return registry_pb2.Gate(golden_embeddings=[
        registry_pb2.GoldenEmbedding(text=text, expected=vector.tolist(), min_cosine=min_cosine)
        for text, vector in zip(agreement.texts, agreement.expected)
    ])


async def _fetch(args: argparse.Namespace, name: str, version: int, cache_dir: Path):
    """Through the worker's own fetch: each file verified against its sha256, cached by content."""
    from services.common.tls import client_security
    from services.worker.model_files import fetch_version

    async with client_security(args, os.environ).aio_channel(args.registry) as channel:
        return await fetch_version(channel, name, version, cache_dir)


def _copy_pipeline_files(source: Path, target: Path) -> None:
    """Every file but the torch weights: tokenizer, config.json, modules.json, pooling configs."""
    for path in sorted(source.rglob("*")):
        if path.is_file() and path.suffix != ".safetensors" and not path.name.startswith("."):
            destination = target / path.relative_to(source)
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, destination)  # follows the cache's links to the blobs


def _onnx_config(source_config: dict, user_config: dict) -> dict:
    """The source's serving keys (batching, queue) carried over, the ONNX ones set, the user's last."""
    config = {key: value for key, value in source_config.items() if key not in _SOURCE_ONLY_KEYS}
    runtime = check_runtime_options({**DEFAULT_RUNTIME_OPTIONS, **user_config.get("onnxruntime", {})})
    return {**config, **{k: v for k, v in user_config.items() if k != "onnxruntime"},
            "backend": BACKEND, "platform": PLATFORM, "model_file": MODEL_FILE, "onnxruntime": runtime}
