from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamLoadRequest(_message.Message):
    __slots__ = ("interval_ms", "heartbeat_ms", "kv_events")
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_MS_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    heartbeat_ms: int
    kv_events: bool
    def __init__(self, interval_ms: _Optional[int] = ..., heartbeat_ms: _Optional[int] = ..., kv_events: _Optional[bool] = ...) -> None: ...

class LoadReport(_message.Message):
    __slots__ = ("stats", "kv_events")
    STATS_FIELD_NUMBER: _ClassVar[int]
    KV_EVENTS_FIELD_NUMBER: _ClassVar[int]
    stats: WorkerStats
    kv_events: KvEvents
    def __init__(self, stats: _Optional[_Union[WorkerStats, _Mapping]] = ..., kv_events: _Optional[_Union[KvEvents, _Mapping]] = ...) -> None: ...

class KvEvents(_message.Message):
    __slots__ = ("block_size", "snapshot", "stored", "removed")
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SNAPSHOT_FIELD_NUMBER: _ClassVar[int]
    STORED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    block_size: int
    snapshot: bool
    stored: _containers.RepeatedScalarFieldContainer[bytes]
    removed: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, block_size: _Optional[int] = ..., snapshot: _Optional[bool] = ..., stored: _Optional[_Iterable[bytes]] = ..., removed: _Optional[_Iterable[bytes]] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "model_name", "model_version", "state", "queue_depth", "num_in_flight", "num_requests_ok", "num_requests_failed", "num_kv_blocks_total", "num_kv_blocks_used", "num_running", "num_waiting", "last_step_unix_ms", "num_kv_blocks_free", "num_queued_prompt_tokens", "num_prefix_query_tokens", "num_prefix_hit_tokens", "num_generated_tokens", "estimated_queue_wait_s", "max_num_seqs", "num_rejected", "queue_wait_bound_s", "step_base_s", "step_per_seq_s", "step_per_prefill_token_s", "num_context_tokens")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    NUM_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_OK_FIELD_NUMBER: _ClassVar[int]
    NUM_REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNNING_FIELD_NUMBER: _ClassVar[int]
    NUM_WAITING_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_KV_BLOCKS_FREE_FIELD_NUMBER: _ClassVar[int]
    NUM_QUEUED_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_QUERY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_PREFIX_HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATED_QUEUE_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SEQS_FIELD_NUMBER: _ClassVar[int]
    NUM_REJECTED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_WAIT_BOUND_S_FIELD_NUMBER: _ClassVar[int]
    STEP_BASE_S_FIELD_NUMBER: _ClassVar[int]
    STEP_PER_SEQ_S_FIELD_NUMBER: _ClassVar[int]
    STEP_PER_PREFILL_TOKEN_S_FIELD_NUMBER: _ClassVar[int]
    NUM_CONTEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    model_name: str
    model_version: str
    state: str
    queue_depth: int
    num_in_flight: int
    num_requests_ok: int
    num_requests_failed: int
    num_kv_blocks_total: int
    num_kv_blocks_used: int
    num_running: int
    num_waiting: int
    last_step_unix_ms: int
    num_kv_blocks_free: int
    num_queued_prompt_tokens: int
    num_prefix_query_tokens: int
    num_prefix_hit_tokens: int
    num_generated_tokens: int
    estimated_queue_wait_s: float
    max_num_seqs: int
    num_rejected: int
    queue_wait_bound_s: float
    step_base_s: float
    step_per_seq_s: float
    step_per_prefill_token_s: float
    num_context_tokens: int
    def __init__(self, worker_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., state: _Optional[str] = ..., queue_depth: _Optional[int] = ..., num_in_flight: _Optional[int] = ..., num_requests_ok: _Optional[int] = ..., num_requests_failed: _Optional[int] = ..., num_kv_blocks_total: _Optional[int] = ..., num_kv_blocks_used: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., last_step_unix_ms: _Optional[int] = ..., num_kv_blocks_free: _Optional[int] = ..., num_queued_prompt_tokens: _Optional[int] = ..., num_prefix_query_tokens: _Optional[int] = ..., num_prefix_hit_tokens: _Optional[int] = ..., num_generated_tokens: _Optional[int] = ..., estimated_queue_wait_s: _Optional[float] = ..., max_num_seqs: _Optional[int] = ..., num_rejected: _Optional[int] = ..., queue_wait_bound_s: _Optional[float] = ..., step_base_s: _Optional[float] = ..., step_per_seq_s: _Optional[float] = ..., step_per_prefill_token_s: _Optional[float] = ..., num_context_tokens: _Optional[int] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout_s",)
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: int
    def __init__(self, timeout_s: _Optional[int] = ...) -> None: ...

class DrainResponse(_message.Message):
    __slots__ = ("num_finished",)
    NUM_FINISHED_FIELD_NUMBER: _ClassVar[int]
    num_finished: int
    def __init__(self, num_finished: _Optional[int] = ...) -> None: ...

class InjectFaultRequest(_message.Message):
    __slots__ = ("fault", "duration_s", "fraction")
    class Fault(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        FAULT_UNSPECIFIED: _ClassVar[InjectFaultRequest.Fault]
        HANG_ENGINE: _ClassVar[InjectFaultRequest.Fault]
        CRASH_ENGINE: _ClassVar[InjectFaultRequest.Fault]
        FAIL_REQUESTS: _ClassVar[InjectFaultRequest.Fault]
    FAULT_UNSPECIFIED: InjectFaultRequest.Fault
    HANG_ENGINE: InjectFaultRequest.Fault
    CRASH_ENGINE: InjectFaultRequest.Fault
    FAIL_REQUESTS: InjectFaultRequest.Fault
    FAULT_FIELD_NUMBER: _ClassVar[int]
    DURATION_S_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    fault: InjectFaultRequest.Fault
    duration_s: float
    fraction: float
    def __init__(self, fault: _Optional[_Union[InjectFaultRequest.Fault, str]] = ..., duration_s: _Optional[float] = ..., fraction: _Optional[float] = ...) -> None: ...

class InjectFaultResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
