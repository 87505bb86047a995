from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Model(_message.Message):
    __slots__ = ("name", "task", "description", "created_at_s", "versions", "aliases", "traffic_policy")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    TRAFFIC_POLICY_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    description: str
    created_at_s: float
    versions: _containers.RepeatedScalarFieldContainer[int]
    aliases: _containers.RepeatedCompositeFieldContainer[Alias]
    traffic_policy: TrafficPolicy
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., description: _Optional[str] = ..., created_at_s: _Optional[float] = ..., versions: _Optional[_Iterable[int]] = ..., aliases: _Optional[_Iterable[_Union[Alias, _Mapping]]] = ..., traffic_policy: _Optional[_Union[TrafficPolicy, _Mapping]] = ...) -> None: ...

class Alias(_message.Message):
    __slots__ = ("model_name", "name", "version", "updated_at_s")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    name: str
    version: int
    updated_at_s: float
    def __init__(self, model_name: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., updated_at_s: _Optional[float] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("name", "task", "description")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    name: str
    task: str
    description: str
    def __init__(self, name: _Optional[str] = ..., task: _Optional[str] = ..., description: _Optional[str] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[Model]
    def __init__(self, models: _Optional[_Iterable[_Union[Model, _Mapping]]] = ...) -> None: ...

class BlobChunk(_message.Message):
    __slots__ = ("data", "upload_id", "offset", "last")
    DATA_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    upload_id: str
    offset: int
    last: bool
    def __init__(self, data: _Optional[bytes] = ..., upload_id: _Optional[str] = ..., offset: _Optional[int] = ..., last: _Optional[bool] = ...) -> None: ...

class BlobRef(_message.Message):
    __slots__ = ("sha256", "size_bytes")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    size_bytes: int
    def __init__(self, sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class GetUploadRequest(_message.Message):
    __slots__ = ("upload_id", "sha256")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, upload_id: _Optional[str] = ..., sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class GetUploadResponse(_message.Message):
    __slots__ = ("received_bytes", "stored_sha256")
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STORED_SHA256_FIELD_NUMBER: _ClassVar[int]
    received_bytes: int
    stored_sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, received_bytes: _Optional[int] = ..., stored_sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class ModelFile(_message.Message):
    __slots__ = ("path", "sha256", "size_bytes")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    path: str
    sha256: str
    size_bytes: int
    def __init__(self, path: _Optional[str] = ..., sha256: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class VersionMetadata(_message.Message):
    __slots__ = ("architecture", "dtype", "parameter_count", "tokenizer", "config_digest", "labels")
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_COUNT_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    CONFIG_DIGEST_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    architecture: str
    dtype: str
    parameter_count: int
    tokenizer: str
    config_digest: str
    labels: _containers.ScalarMap[str, str]
    def __init__(self, architecture: _Optional[str] = ..., dtype: _Optional[str] = ..., parameter_count: _Optional[int] = ..., tokenizer: _Optional[str] = ..., config_digest: _Optional[str] = ..., labels: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("source_kind", "source_uri", "parent_version", "created_by", "created_at_s", "details")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SOURCE_KIND_FIELD_NUMBER: _ClassVar[int]
    SOURCE_URI_FIELD_NUMBER: _ClassVar[int]
    PARENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    source_kind: str
    source_uri: str
    parent_version: int
    created_by: str
    created_at_s: float
    details: _containers.ScalarMap[str, str]
    def __init__(self, source_kind: _Optional[str] = ..., source_uri: _Optional[str] = ..., parent_version: _Optional[int] = ..., created_by: _Optional[str] = ..., created_at_s: _Optional[float] = ..., details: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CreateVersionRequest(_message.Message):
    __slots__ = ("model_name", "files", "config_json", "metadata", "lineage", "gate")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    config_json: str
    metadata: VersionMetadata
    lineage: Lineage
    gate: Gate
    def __init__(self, model_name: _Optional[str] = ..., files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., config_json: _Optional[str] = ..., metadata: _Optional[_Union[VersionMetadata, _Mapping]] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., gate: _Optional[_Union[Gate, _Mapping]] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("model_name", "version", "files", "config_json", "created_at_s", "task", "metadata", "lineage", "aliases", "gate")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    files: _containers.RepeatedCompositeFieldContainer[ModelFile]
    config_json: str
    created_at_s: float
    task: str
    metadata: VersionMetadata
    lineage: Lineage
    aliases: _containers.RepeatedScalarFieldContainer[str]
    gate: Gate
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., files: _Optional[_Iterable[_Union[ModelFile, _Mapping]]] = ..., config_json: _Optional[str] = ..., created_at_s: _Optional[float] = ..., task: _Optional[str] = ..., metadata: _Optional[_Union[VersionMetadata, _Mapping]] = ..., lineage: _Optional[_Union[Lineage, _Mapping]] = ..., aliases: _Optional[_Iterable[str]] = ..., gate: _Optional[_Union[Gate, _Mapping]] = ...) -> None: ...

class Gate(_message.Message):
    __slots__ = ("golden_prompts", "golden_embeddings", "latency_budget_s")
    GOLDEN_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    GOLDEN_EMBEDDINGS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_S_FIELD_NUMBER: _ClassVar[int]
    golden_prompts: _containers.RepeatedCompositeFieldContainer[GoldenPrompt]
    golden_embeddings: _containers.RepeatedCompositeFieldContainer[GoldenEmbedding]
    latency_budget_s: float
    def __init__(self, golden_prompts: _Optional[_Iterable[_Union[GoldenPrompt, _Mapping]]] = ..., golden_embeddings: _Optional[_Iterable[_Union[GoldenEmbedding, _Mapping]]] = ..., latency_budget_s: _Optional[float] = ...) -> None: ...

class GoldenPrompt(_message.Message):
    __slots__ = ("prompt", "max_tokens", "expected_text", "min_similarity")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_TEXT_FIELD_NUMBER: _ClassVar[int]
    MIN_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    expected_text: str
    min_similarity: float
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., expected_text: _Optional[str] = ..., min_similarity: _Optional[float] = ...) -> None: ...

class GoldenEmbedding(_message.Message):
    __slots__ = ("text", "expected", "min_cosine")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_FIELD_NUMBER: _ClassVar[int]
    MIN_COSINE_FIELD_NUMBER: _ClassVar[int]
    text: str
    expected: _containers.RepeatedScalarFieldContainer[float]
    min_cosine: float
    def __init__(self, text: _Optional[str] = ..., expected: _Optional[_Iterable[float]] = ..., min_cosine: _Optional[float] = ...) -> None: ...

class GetVersionRequest(_message.Message):
    __slots__ = ("model_name", "version", "ref")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REF_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    ref: str
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., ref: _Optional[str] = ...) -> None: ...

class ListVersionsRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class ListVersionsResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ...) -> None: ...

class DownloadBlobRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class DeleteVersionRequest(_message.Message):
    __slots__ = ("model_name", "version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class DeleteVersionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetAliasRequest(_message.Message):
    __slots__ = ("model_name", "name", "version", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    name: str
    version: int
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., name: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteAliasRequest(_message.Message):
    __slots__ = ("model_name", "name", "reason")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    name: str
    reason: str
    def __init__(self, model_name: _Optional[str] = ..., name: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class DeleteAliasResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrafficSplit(_message.Message):
    __slots__ = ("version", "percent")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PERCENT_FIELD_NUMBER: _ClassVar[int]
    version: int
    percent: float
    def __init__(self, version: _Optional[int] = ..., percent: _Optional[float] = ...) -> None: ...

class AbRoute(_message.Message):
    __slots__ = ("value", "version")
    VALUE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    value: str
    version: int
    def __init__(self, value: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class RollbackPolicy(_message.Message):
    __slots__ = ("window_s", "min_requests", "max_error_rate_increase", "max_latency_ratio")
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_INCREASE_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    window_s: float
    min_requests: int
    max_error_rate_increase: float
    max_latency_ratio: float
    def __init__(self, window_s: _Optional[float] = ..., min_requests: _Optional[int] = ..., max_error_rate_increase: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ...) -> None: ...

class TrafficPolicy(_message.Message):
    __slots__ = ("model_name", "stable_version", "splits", "ab_key", "ab_routes", "sticky_key", "rollback", "revision", "updated_at_s")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    STABLE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    AB_KEY_FIELD_NUMBER: _ClassVar[int]
    AB_ROUTES_FIELD_NUMBER: _ClassVar[int]
    STICKY_KEY_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    REVISION_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    stable_version: int
    splits: _containers.RepeatedCompositeFieldContainer[TrafficSplit]
    ab_key: str
    ab_routes: _containers.RepeatedCompositeFieldContainer[AbRoute]
    sticky_key: str
    rollback: RollbackPolicy
    revision: int
    updated_at_s: float
    def __init__(self, model_name: _Optional[str] = ..., stable_version: _Optional[int] = ..., splits: _Optional[_Iterable[_Union[TrafficSplit, _Mapping]]] = ..., ab_key: _Optional[str] = ..., ab_routes: _Optional[_Iterable[_Union[AbRoute, _Mapping]]] = ..., sticky_key: _Optional[str] = ..., rollback: _Optional[_Union[RollbackPolicy, _Mapping]] = ..., revision: _Optional[int] = ..., updated_at_s: _Optional[float] = ...) -> None: ...

class GetTrafficPolicyRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class SetTrafficPolicyRequest(_message.Message):
    __slots__ = ("policy", "expected_revision", "reason")
    POLICY_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_REVISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    policy: TrafficPolicy
    expected_revision: int
    reason: str
    def __init__(self, policy: _Optional[_Union[TrafficPolicy, _Mapping]] = ..., expected_revision: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Deployment(_message.Message):
    __slots__ = ("model_name", "version", "replicas", "updated_at_s", "min_replicas", "max_replicas", "autoscale")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_S_FIELD_NUMBER: _ClassVar[int]
    MIN_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MAX_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    AUTOSCALE_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    version: int
    replicas: int
    updated_at_s: float
    min_replicas: int
    max_replicas: int
    autoscale: bool
    def __init__(self, model_name: _Optional[str] = ..., version: _Optional[int] = ..., replicas: _Optional[int] = ..., updated_at_s: _Optional[float] = ..., min_replicas: _Optional[int] = ..., max_replicas: _Optional[int] = ..., autoscale: _Optional[bool] = ...) -> None: ...

class SetDeploymentRequest(_message.Message):
    __slots__ = ("deployment", "reason")
    DEPLOYMENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    deployment: Deployment
    reason: str
    def __init__(self, deployment: _Optional[_Union[Deployment, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class ListDeploymentsRequest(_message.Message):
    __slots__ = ("model_name",)
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    def __init__(self, model_name: _Optional[str] = ...) -> None: ...

class ListDeploymentsResponse(_message.Message):
    __slots__ = ("deployments",)
    DEPLOYMENTS_FIELD_NUMBER: _ClassVar[int]
    deployments: _containers.RepeatedCompositeFieldContainer[Deployment]
    def __init__(self, deployments: _Optional[_Iterable[_Union[Deployment, _Mapping]]] = ...) -> None: ...

class AuditEntry(_message.Message):
    __slots__ = ("sequence", "at_s", "actor", "action", "model_name", "version", "details_json")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    AT_S_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    at_s: float
    actor: str
    action: str
    model_name: str
    version: int
    details_json: str
    def __init__(self, sequence: _Optional[int] = ..., at_s: _Optional[float] = ..., actor: _Optional[str] = ..., action: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., details_json: _Optional[str] = ...) -> None: ...

class ListAuditRequest(_message.Message):
    __slots__ = ("model_name", "after_sequence", "limit")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    after_sequence: int
    limit: int
    def __init__(self, model_name: _Optional[str] = ..., after_sequence: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class ListAuditResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[AuditEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[AuditEntry, _Mapping]]] = ...) -> None: ...

class AppendAuditRequest(_message.Message):
    __slots__ = ("action", "model_name", "version", "details_json")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DETAILS_JSON_FIELD_NUMBER: _ClassVar[int]
    action: str
    model_name: str
    version: int
    details_json: str
    def __init__(self, action: _Optional[str] = ..., model_name: _Optional[str] = ..., version: _Optional[int] = ..., details_json: _Optional[str] = ...) -> None: ...

class VerifyStoreRequest(_message.Message):
    __slots__ = ("rehash",)
    REHASH_FIELD_NUMBER: _ClassVar[int]
    rehash: bool
    def __init__(self, rehash: _Optional[bool] = ...) -> None: ...

class VerifyStoreResponse(_message.Message):
    __slots__ = ("num_versions", "num_blobs", "problems")
    NUM_VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOBS_FIELD_NUMBER: _ClassVar[int]
    PROBLEMS_FIELD_NUMBER: _ClassVar[int]
    num_versions: int
    num_blobs: int
    problems: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, num_versions: _Optional[int] = ..., num_blobs: _Optional[int] = ..., problems: _Optional[_Iterable[str]] = ...) -> None: ...
