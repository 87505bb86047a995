"""Registry protos as plain dicts (what `--json` prints; numbers stay numbers) and a few text helpers."""

from __future__ import annotations

import json

from google.protobuf import json_format

from protos.tensoryard.v1 import registry_pb2


def file_dict(file: registry_pb2.ModelFile) -> dict:
    return {"path": file.path, "sha256": file.sha256, "size_bytes": file.size_bytes}


def metadata_dict(metadata: registry_pb2.VersionMetadata) -> dict:
    return {
        "architecture": metadata.architecture,
        "dtype": metadata.dtype,
        "parameter_count": metadata.parameter_count,
        "tokenizer": metadata.tokenizer,
        "config_digest": metadata.config_digest,
        "labels": dict(sorted(metadata.labels.items())),
    }


def lineage_dict(lineage: registry_pb2.Lineage) -> dict:
    return {
        "source_kind": lineage.source_kind,
        "source_uri": lineage.source_uri,
        "parent_version": lineage.parent_version,
        "created_by": lineage.created_by,
        "created_at_s": lineage.created_at_s,
        "details": dict(sorted(lineage.details.items())),
    }


def version_dict(version: registry_pb2.ModelVersion) -> dict:
    return {
        "model": version.model_name,
        "version": version.version,
        "task": version.task,
        "created_at_s": version.created_at_s,
        "aliases": sorted(version.aliases),
        "config": json.loads(version.config_json or "{}"),
        "metadata": metadata_dict(version.metadata),
        "lineage": lineage_dict(version.lineage),
        "files": [file_dict(f) for f in version.files],
        "size_bytes": sum(f.size_bytes for f in version.files),
        "gate": json_format.MessageToDict(version.gate, preserving_proto_field_name=True),
    }


def policy_dict(model: registry_pb2.Model) -> dict | None:
    if not model.HasField("traffic_policy"):
        return None
    policy = model.traffic_policy
    return {
        "stable_version": policy.stable_version,
        "splits": [{"version": s.version, "percent": s.percent} for s in policy.splits],
        "ab_key": policy.ab_key,
        "ab_routes": [{"value": r.value, "version": r.version} for r in policy.ab_routes],
        "sticky_key": policy.sticky_key,
        "rollback": {
            "window_s": policy.rollback.window_s,
            "min_requests": policy.rollback.min_requests,
            "max_error_rate_increase": policy.rollback.max_error_rate_increase,
            "max_latency_ratio": policy.rollback.max_latency_ratio,
        },
        "revision": policy.revision,
    }


def policy_summary(model: registry_pb2.Model) -> str:
    policy = policy_dict(model)
    if policy is None:
        return "no traffic policy"
    parts = [f"stable {policy['stable_version']}"]
    if policy["splits"]:
        parts.append("split " + ", ".join(f"v{s['version']} {s['percent']:g}%" for s in policy["splits"]))
    if policy["ab_key"]:
        parts.append(f"A/B on {policy['ab_key']}: " +
                     ", ".join(f"{r['value']}->v{r['version']}" for r in policy["ab_routes"]))
    if policy["sticky_key"]:
        parts.append(f"sticky on {policy['sticky_key']}")
    return "; ".join(parts)


def model_dict(model: registry_pb2.Model) -> dict:
    return {
        "name": model.name,
        "task": model.task,
        "description": model.description,
        "versions": list(model.versions),
        "aliases": {a.name: a.version for a in sorted(model.aliases, key=lambda a: a.name)},
        "traffic_policy": policy_dict(model),
    }


def audit_dict(entry: registry_pb2.AuditEntry) -> dict:
    try:
        details = json.loads(entry.details_json) if entry.details_json else {}
    except json.JSONDecodeError:
        details = entry.details_json
    return {"sequence": entry.sequence, "at_s": entry.at_s, "actor": entry.actor, "action": entry.action,
            "model": entry.model_name, "version": entry.version, "details": details}


def human_bytes(num_bytes: int) -> str:
    value = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(count: int) -> str:
    for threshold, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= threshold:
            return f"{count / threshold:.1f}{suffix}"
    return str(count)
