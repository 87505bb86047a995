from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Instance(_message.Message):
    __slots__ = ("instance_id", "service", "address", "model_name", "model_version", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    service: str
    address: str
    model_name: str
    model_version: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, instance_id: _Optional[str] = ..., service: _Optional[str] = ..., address: _Optional[str] = ..., model_name: _Optional[str] = ..., model_version: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class RegisterRequest(_message.Message):
    __slots__ = ("instance", "ttl_ms")
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    instance: Instance
    ttl_ms: int
    def __init__(self, instance: _Optional[_Union[Instance, _Mapping]] = ..., ttl_ms: _Optional[int] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("instance_id",)
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    instance_id: str
    def __init__(self, instance_id: _Optional[str] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("service", "model_name")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    service: str
    model_name: str
    def __init__(self, service: _Optional[str] = ..., model_name: _Optional[str] = ...) -> None: ...

class ListResponse(_message.Message):
    __slots__ = ("instances", "index")
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    instances: _containers.RepeatedCompositeFieldContainer[Instance]
    index: int
    def __init__(self, instances: _Optional[_Iterable[_Union[Instance, _Mapping]]] = ..., index: _Optional[int] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("service", "model_name", "after_index")
    SERVICE_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_INDEX_FIELD_NUMBER: _ClassVar[int]
    service: str
    model_name: str
    after_index: int
    def __init__(self, service: _Optional[str] = ..., model_name: _Optional[str] = ..., after_index: _Optional[int] = ...) -> None: ...

class KVEntry(_message.Message):
    __slots__ = ("key", "value", "modify_index")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    MODIFY_INDEX_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    modify_index: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ..., modify_index: _Optional[int] = ...) -> None: ...

class KVGetRequest(_message.Message):
    __slots__ = ("key", "prefix")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    key: str
    prefix: bool
    def __init__(self, key: _Optional[str] = ..., prefix: _Optional[bool] = ...) -> None: ...

class KVGetResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[KVEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[KVEntry, _Mapping]]] = ...) -> None: ...

class KVPutRequest(_message.Message):
    __slots__ = ("key", "value", "cas_index")
    KEY_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    CAS_INDEX_FIELD_NUMBER: _ClassVar[int]
    key: str
    value: bytes
    cas_index: int
    def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ..., cas_index: _Optional[int] = ...) -> None: ...

class KVPutResponse(_message.Message):
    __slots__ = ("ok", "modify_index")
    OK_FIELD_NUMBER: _ClassVar[int]
    MODIFY_INDEX_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    modify_index: int
    def __init__(self, ok: _Optional[bool] = ..., modify_index: _Optional[int] = ...) -> None: ...

class KVDeleteRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class KVDeleteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
