"""Registry protos to store records and back; every request field is checked on the way in."""

from __future__ import annotations

import json

from google.protobuf import json_format

from protos.tensoryard.v1 import registry_pb2
from services.common.errors import InvalidArgument
from services.registry.records import (
    AliasRecord,
    AuditEntry,
    DeploymentRecord,
    FileRecord,
    Lineage,
    ModelRecord,
    VersionMetadata,
    VersionRecord,
)
from services.registry.store import ModelSummary, VerifyReport
from services.registry.traffic import AbRoute, RollbackPolicy, TrafficPolicy, TrafficSplit


def decode_json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as error:
        raise InvalidArgument(f"{what} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


def files_from_proto(files) -> list[FileRecord]:
    return [FileRecord(f.path, f.sha256, f.size_bytes) for f in files]


def metadata_from_proto(message: registry_pb2.VersionMetadata) -> VersionMetadata:
    # config_digest is the registry's to compute: whatever the client sent is dropped.
    return VersionMetadata(message.architecture, message.dtype, message.parameter_count, message.tokenizer,
                           "", dict(message.labels))


def lineage_from_proto(message: registry_pb2.Lineage) -> Lineage:
    # created_at_s is the registry's clock.
    return Lineage(message.source_kind, message.source_uri, message.parent_version, message.created_by,
                   0.0, dict(message.details))


def gate_from_proto(message: registry_pb2.Gate) -> dict | None:
    if message.ByteSize() == 0:
        return None
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def model_to_proto(model: ModelRecord, versions=(), aliases=(), policy: TrafficPolicy | None = None):
    reply = registry_pb2.Model(
        name=model.name, task=model.task, description=model.description, created_at_s=model.created_at_s,
        versions=list(versions), aliases=[alias_to_proto(a) for a in aliases],
    )
    if policy is not None:
        reply.traffic_policy.CopyFrom(policy_to_proto(policy))
    return reply


def summary_to_proto(summary: ModelSummary) -> registry_pb2.Model:
    return model_to_proto(summary.model, summary.versions, summary.aliases, summary.traffic_policy)


def version_to_proto(version: VersionRecord, task: str = "") -> registry_pb2.ModelVersion:
    metadata, lineage = version.metadata, version.lineage
    reply = registry_pb2.ModelVersion(
        model_name=version.model_name,
        version=version.version,
        files=[registry_pb2.ModelFile(path=f.path, sha256=f.sha256, size_bytes=f.size_bytes) for f in version.files],
        config_json=json.dumps(version.config, sort_keys=True),
        created_at_s=version.created_at_s,
        task=task,
        metadata=registry_pb2.VersionMetadata(
            architecture=metadata.architecture, dtype=metadata.dtype, parameter_count=metadata.parameter_count,
            tokenizer=metadata.tokenizer, config_digest=metadata.config_digest, labels=metadata.labels,
        ),
        lineage=registry_pb2.Lineage(
            source_kind=lineage.source_kind, source_uri=lineage.source_uri, parent_version=lineage.parent_version,
            created_by=lineage.created_by, created_at_s=lineage.created_at_s, details=lineage.details,
        ),
        aliases=list(version.aliases),
    )
    if version.gate is not None:
        json_format.ParseDict(version.gate, reply.gate)
    return reply


def alias_to_proto(alias: AliasRecord) -> registry_pb2.Alias:
    return registry_pb2.Alias(model_name=alias.model_name, name=alias.name, version=alias.version,
                              updated_at_s=alias.updated_at_s)


def policy_from_proto(message: registry_pb2.TrafficPolicy) -> TrafficPolicy:
    r = message.rollback
    return TrafficPolicy(
        model_name=message.model_name,
        stable_version=message.stable_version,
        splits=tuple(TrafficSplit(s.version, s.percent) for s in message.splits),
        ab_key=message.ab_key,
        ab_routes=tuple(AbRoute(route.value, route.version) for route in message.ab_routes),
        sticky_key=message.sticky_key,
        rollback=RollbackPolicy(r.window_s, r.min_requests, r.max_error_rate_increase, r.max_latency_ratio),
    )


def policy_to_proto(policy: TrafficPolicy) -> registry_pb2.TrafficPolicy:
    r = policy.rollback
    return registry_pb2.TrafficPolicy(
        model_name=policy.model_name,
        stable_version=policy.stable_version,
        splits=[registry_pb2.TrafficSplit(version=s.version, percent=s.percent) for s in policy.splits],
        ab_key=policy.ab_key,
        ab_routes=[registry_pb2.AbRoute(value=route.value, version=route.version) for route in policy.ab_routes],
        sticky_key=policy.sticky_key,
        rollback=registry_pb2.RollbackPolicy(
            window_s=r.window_s, min_requests=r.min_requests,
            max_error_rate_increase=r.max_error_rate_increase, max_latency_ratio=r.max_latency_ratio,
        ),
        revision=policy.revision,
        updated_at_s=policy.updated_at_s,
    )


def deployment_to_proto(deployment: DeploymentRecord) -> registry_pb2.Deployment:
    return registry_pb2.Deployment(model_name=deployment.model_name, version=deployment.version,
                                   replicas=deployment.replicas, updated_at_s=deployment.updated_at_s,
                                   min_replicas=deployment.min_replicas, max_replicas=deployment.max_replicas,
                                   autoscale=deployment.autoscale)


def audit_to_proto(entry: AuditEntry) -> registry_pb2.AuditEntry:
    return registry_pb2.AuditEntry(
        sequence=entry.sequence, at_s=entry.at_s, actor=entry.actor, action=entry.action,
        model_name=entry.model_name, version=entry.version,
        details_json=json.dumps(entry.details, sort_keys=True),
    )


def verify_to_proto(report: VerifyReport) -> registry_pb2.VerifyStoreResponse:
    return registry_pb2.VerifyStoreResponse(num_versions=report.num_versions, num_blobs=report.num_blobs,
                                            problems=list(report.problems))
