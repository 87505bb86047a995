"""`models list` and `models show`: what the registry holds, read-only."""

from __future__ import annotations

import argparse
import json
import time

from protos.tensoryard.v1 import registry_pb2
from services.models_cli.context import Context
from services.models_cli.render import (audit_dict, human_bytes, human_count, model_dict, policy_summary,
                                        version_dict)


def run_list(args: argparse.Namespace, ctx: Context) -> int:
    models = ctx.stub.ListModels(registry_pb2.ListModelsRequest()).models
    if ctx.json:
        ctx.emit({"models": [model_dict(m) for m in models]})
        return 0
    if not models:
        ctx.say("no models")
    for model in models:
        versions = ", ".join(str(v) for v in model.versions) or "none"
        aliases = ", ".join(f"{a.name}->{a.version}" for a in sorted(model.aliases, key=lambda a: a.name)) or "none"
        ctx.say(f"{model.name}\t{model.task}\tversions: {versions}\taliases: {aliases}\t{policy_summary(model)}")
    return 0


def parse_target(target: str) -> tuple[str, str]:
    """"MODEL[:REF]" -> (model, ref); ref "" means the latest version."""
    name, _, ref = target.partition(":")
    if not name:
        raise ValueError(f"{target!r}: expected MODEL or MODEL:REF")
    return name, ref


def run_show(args: argparse.Namespace, ctx: Context) -> int:
    name, ref = parse_target(args.target)
    stub = ctx.stub
    model = stub.GetModel(registry_pb2.GetModelRequest(name=name))
    version = stub.GetVersion(registry_pb2.GetVersionRequest(model_name=name, ref=ref))
    audit = stub.ListAudit(registry_pb2.ListAuditRequest(model_name=name)).entries
    if ctx.json:
        ctx.emit({"model": model_dict(model), "version": version_dict(version),
                  "audit": [audit_dict(e) for e in audit]})
        return 0
    _show_version(ctx, model, version)
    ctx.say(f"audit ({len(audit)} entries)")
    for entry in audit:
        where = f" v{entry.version}" if entry.version else ""
        ctx.say(f"  #{entry.sequence} {_when(entry.at_s)} {entry.actor or '-'} {entry.action}{where} {entry.details_json}")
    return 0


def _show_version(ctx: Context, model: registry_pb2.Model, version: registry_pb2.ModelVersion) -> None:
    aliases = ", ".join(sorted(version.aliases)) or "none"
    ctx.say(f"{version.model_name} version {version.version} ({version.task})  aliases: {aliases}")
    lineage = version.lineage
    ctx.say(f"  created    {_when(version.created_at_s)}" + (f" by {lineage.created_by}" if lineage.created_by else ""))
    parent = f" (parent version {lineage.parent_version})" if lineage.parent_version else ""
    ctx.say(f"  source     {lineage.source_kind or '-'} {lineage.source_uri}{parent}")
    for key, value in sorted(lineage.details.items()):
        ctx.say(f"             {key}: {value}")
    m = version.metadata
    ctx.say(f"  metadata   architecture {m.architecture or '-'}, dtype {m.dtype or '-'}, "
            f"{human_count(m.parameter_count)} parameters, tokenizer {m.tokenizer or '-'}")
    if m.labels:
        ctx.say("  labels     " + ", ".join(f"{k}={v}" for k, v in sorted(m.labels.items())))
    config = json.loads(version.config_json or "{}")
    ctx.say(f"  config     {json.dumps(config, sort_keys=True)}" + (f"  (digest {m.config_digest[:12]})" if m.config_digest else ""))
    ctx.say(f"  traffic    {policy_summary(model)}")
    total = sum(f.size_bytes for f in version.files)
    ctx.say(f"files ({len(version.files)}, {human_bytes(total)})")
    for file in version.files:
        ctx.say(f"  {file.sha256[:12]}  {human_bytes(file.size_bytes):>10}  {file.path}")


def _when(at_s: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at_s)) if at_s else "-"
