from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class GetStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StreamLoadRequest(_message.Message):
    __slots__ = ("interval_ms",)
    INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    interval_ms: int
    def __init__(self, interval_ms: _Optional[int] = ...) -> None: ...

class WorkerStats(_message.Message):
    __slots__ = ("worker_id", "model_name", "model_version", "state", "queue_depth", "num_in_flight", "num_requests_ok", "num_requests_failed", "num_kv_blocks_total", "num_kv_blocks_used", "num_running", "num_waiting", "last_step_unix_ms")
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
    def __init__(self, worker_id: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., state: _Optional[str] = ..., queue_depth: _Optional[int] = ..., num_in_flight: _Optional[int] = ..., num_requests_ok: _Optional[int] = ..., num_requests_failed: _Optional[int] = ..., num_kv_blocks_total: _Optional[int] = ..., num_kv_blocks_used: _Optional[int] = ..., num_running: _Optional[int] = ..., num_waiting: _Optional[int] = ..., last_step_unix_ms: _Optional[int] = ...) -> None: ...

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
