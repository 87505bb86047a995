"""`models diff MODEL A B`: what changed between two versions (files by sha256, metadata, config)."""

from __future__ import annotations

import argparse
import json

from protos.tensoryard.v1 import registry_pb2
from services.models_cli.context import Context
from services.models_cli.render import metadata_dict


def version_diff(a: registry_pb2.ModelVersion, b: registry_pb2.ModelVersion) -> dict:
    """Files added, removed and changed (same path, other sha256) from a to b; metadata and config
    differences as {key: [a's value, b's value]} (config keys dotted where nested)."""
    files_a = {f.path: f for f in a.files}
    files_b = {f.path: f for f in b.files}
    changed = [
        {"path": path, "sha256": [files_a[path].sha256, files_b[path].sha256],
         "size_bytes": [files_a[path].size_bytes, files_b[path].size_bytes]}
        for path in sorted(files_a.keys() & files_b.keys()) if files_a[path].sha256 != files_b[path].sha256
    ]
    meta_a, meta_b = metadata_dict(a.metadata), metadata_dict(b.metadata)
    return {
        "model": a.model_name,
        "a": a.version,
        "b": b.version,
        "files": {
            "added": [{"path": p, "sha256": files_b[p].sha256, "size_bytes": files_b[p].size_bytes}
                      for p in sorted(files_b.keys() - files_a.keys())],
            "removed": [{"path": p, "sha256": files_a[p].sha256, "size_bytes": files_a[p].size_bytes}
                        for p in sorted(files_a.keys() - files_b.keys())],
            "changed": changed,
            "unchanged": sum(1 for p in files_a.keys() & files_b.keys() if files_a[p].sha256 == files_b[p].sha256),
        },
        "metadata": _differences(meta_a, meta_b),
        "config": _differences(_flatten(json.loads(a.config_json or "{}")), _flatten(json.loads(b.config_json or "{}"))),
        "lineage": _differences({"source_kind": a.lineage.source_kind, "source_uri": a.lineage.source_uri},
                                {"source_kind": b.lineage.source_kind, "source_uri": b.lineage.source_uri}),
    }


def run_diff(args: argparse.Namespace, ctx: Context) -> int:
    stub = ctx.stub
    a = stub.GetVersion(registry_pb2.GetVersionRequest(model_name=args.name, ref=args.a))
    b = stub.GetVersion(registry_pb2.GetVersionRequest(model_name=args.name, ref=args.b))
    diff = version_diff(a, b)
    if ctx.json:
        ctx.emit(diff)
        return 0
    ctx.say(f"{args.name}: version {a.version} -> {b.version}")
    files = diff["files"]
    for entry in files["added"]:
        ctx.say(f"  + {entry['path']}  {entry['sha256'][:12]}")
    for entry in files["removed"]:
        ctx.say(f"  - {entry['path']}  {entry['sha256'][:12]}")
    for entry in files["changed"]:
        ctx.say(f"  ~ {entry['path']}  {entry['sha256'][0][:12]} -> {entry['sha256'][1][:12]}")
    ctx.say(f"  {files['unchanged']} files unchanged")
    for section in ("metadata", "config", "lineage"):
        for key, (old, new) in diff[section].items():
            ctx.say(f"  {section}.{key}: {json.dumps(old)} -> {json.dumps(new)}")
    return 0


def _flatten(value: dict, prefix: str = "") -> dict:
    flat = {}
    for key, item in value.items():
        if isinstance(item, dict) and item:
            flat.update(_flatten(item, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = item
    return flat


_ABSENT = None


def _differences(a: dict, b: dict) -> dict:
    """{key: [a's, b's]} for keys whose values differ (a missing key reads as null)."""
    return {key: [a.get(key, _ABSENT), b.get(key, _ABSENT)]
            for key in sorted(a.keys() | b.keys()) if a.get(key, _ABSENT) != b.get(key, _ABSENT)}
