"""`models push` (alias `register`) and `models import`: a folder, or an imported source, becomes a version."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from google.protobuf import json_format

from protos.tensoryard.v1 import registry_pb2

from services.model_import import prepared_import
from services.models_cli.context import Context
from services.models_cli.progress import upload_progress
from services.models_cli.render import version_dict
from services.registry.client import PushOptions, PushResult, Source, push_folder


def run_push(args: argparse.Namespace, ctx: Context) -> int:
    folder = args.folder.resolve()
    if not folder.is_dir():
        raise ValueError(f"{args.folder} is not a folder")
    source = Source("push", str(folder), parent_version=args.parent, created_by=ctx.user)
    options = PushOptions(chunk_bytes=args.chunk_bytes, max_bytes_per_s=args.max_bytes_per_s)
    result = _push(ctx, args, args.name, args.task, folder, source, options=options)
    return _report(ctx, args.name, result)


def run_import(args: argparse.Namespace, ctx: Context) -> int:
    user_config = _config(args.config_json)
    with prepared_import(args.source, args.work_dir, args.mlflow_tracking_uri, quantize=args.quantize,
                         config=user_config) as prepared:
        task = args.task or prepared.task
        if not task:
            raise ValueError(f"cannot tell the task of {args.source} from its config: pass --task")
        name = args.name or prepared.name
        source = Source(prepared.source.kind, prepared.source.uri, prepared.source.details,
                        parent_version=args.parent, created_by=ctx.user)
        config = prepared.config if prepared.config is not None else user_config
        result = _push(ctx, args, name, task, prepared.folder, source, metadata=prepared.metadata,
                       files=prepared.files, config=config, extra_labels=prepared.labels)
    return _report(ctx, name, result)


def _push(ctx: Context, args, name, task, folder, source, config: dict | None = None,
          extra_labels: dict[str, str] | None = None, gate: registry_pb2.Gate | None = None,
          **kwargs) -> PushResult:
    progress = upload_progress(ctx.err)
    config = _config(args.config_json) if config is None else config
    try:
        return push_folder(ctx.channel, name, task, folder, config, source,
                           description=args.description, labels={**(extra_labels or {}), **_labels(args.label)},
                           progress=progress,
                           gate=read_gate(args.gate_file) or gate, **kwargs)
    finally:
        progress.close()


def _report(ctx: Context, name: str, result: PushResult) -> int:
    version = result.version
    if ctx.json:
        uploads = [{"path": u.path, "sha256": u.sha256, "size_bytes": u.size_bytes, "outcome": u.outcome,
                    "resumed_at_bytes": u.resumed_at_bytes} for u in result.uploads]
        ctx.emit({"created": result.created, "version": version_dict(version), "uploads": uploads})
        return 0
    state = "registered" if result.created else "unchanged, already registered as"
    ctx.say(f"{name}: {state} version {version.version} ({len(version.files)} files)")
    resumed = [u for u in result.uploads if u.outcome == "resumed"]
    stored = [u for u in result.uploads if u.outcome == "stored"]
    if stored:
        ctx.say(f"  already stored, not sent again: {', '.join(u.path for u in stored)}")
    for upload in resumed:
        ctx.say(f"  resumed {upload.path} at byte {upload.resumed_at_bytes} of {upload.size_bytes}")
    return 0


def _config(text: str) -> dict:
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--config is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError("--config must be a JSON object")
    return config


def read_gate(path: Path | None) -> registry_pb2.Gate | None:
    """The gate a version must pass before promotion, from a JSON file in the Gate message's JSON
    form: {"golden_prompts": [{"prompt", "max_tokens", "expected_text", "min_similarity"}],
    "golden_embeddings": [{"text", "expected", "min_cosine"}], "latency_budget_s"}."""
    if path is None:
        return None
    try:
        return json_format.Parse(path.read_text(), registry_pb2.Gate())
    except json_format.ParseError as error:
        raise ValueError(f"--gate {path}: not a gate: {error}") from None


def _labels(pairs: list[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--label {pair!r}: expected KEY=VALUE")
        labels[key] = value
    return labels
