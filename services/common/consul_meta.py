"""An `Instance` as a Consul agent service, and back.

Consul checks service metadata strictly (agent/structs `validateMetaPair`): at most 64 pairs; keys
match `^[a-zA-Z0-9_-]+$`, are at most 128 characters and do not start with `consul-` (reserved);
values are at most 512 bytes. So:
- `model_name` and `model_version` are two keys of their own;
- an instance metadata key that Consul accepts as it is (`metrics_port`, `platform`, `pid`) stays as
  it is, so Consul's UI, its DNS and Prometheus' `__meta_consul_service_metadata_<key>` show it
  plainly; any other key (a dot, a space, non-ASCII, `consul-…`, one of ours, or one that starts
  with our `b64-` marker) travels as `b64-` + its URL-safe base64 without padding (the alphabet is
  `A-Za-z0-9-_`, all allowed);
- values are never rewritten: one over 512 bytes, a key still too long once encoded, or more than
  64 pairs is refused at registration with a ValueError naming it, instead of Consul's 400 later.
"""

from __future__ import annotations

import base64
import re

from protos.tensoryard.v1 import discovery_pb2

SERVICE_PREFIX = "tensoryard-"
MODEL_NAME_KEY = "model_name"
MODEL_VERSION_KEY = "model_version"
ENCODED_KEY_PREFIX = "b64-"
MAX_META_PAIRS = 64
MAX_META_KEY_CHARS = 128
MAX_META_VALUE_BYTES = 512
_RESERVED_PREFIX = "consul-"
_PLAIN_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
_OWN_KEYS = (MODEL_NAME_KEY, MODEL_VERSION_KEY)


def consul_service_name(service: str) -> str:
    """`worker` -> `tensoryard-worker`: one Consul namespace of names for tensoryard's services."""
    if not service:
        raise ValueError("a service name is required with Consul discovery (worker, router, ...)")
    return SERVICE_PREFIX + service


def encode_meta_key(key: str) -> str:
    if (_PLAIN_KEY.match(key) and len(key) <= MAX_META_KEY_CHARS and key not in _OWN_KEYS
            and not key.startswith((_RESERVED_PREFIX, ENCODED_KEY_PREFIX))):
        return key
    encoded = ENCODED_KEY_PREFIX + base64.urlsafe_b64encode(key.encode()).decode().rstrip("=")
    if len(encoded) > MAX_META_KEY_CHARS:
        raise ValueError(f"instance metadata key {key[:40]!r}...: too long for Consul service metadata "
                         f"({len(encoded)} characters encoded, at most {MAX_META_KEY_CHARS})")
    return encoded


def decode_meta_key(key: str) -> str:
    if not key.startswith(ENCODED_KEY_PREFIX):
        return key
    text = key[len(ENCODED_KEY_PREFIX):]
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4)).decode()
    except (ValueError, UnicodeDecodeError):
        return key  # not ours (another tool's key that happens to start so): keep it as it is


def encode_meta(instance: discovery_pb2.Instance) -> dict[str, str]:
    meta = {MODEL_NAME_KEY: instance.model_name, MODEL_VERSION_KEY: instance.model_version}
    for key, value in sorted(instance.metadata.items()):
        meta[encode_meta_key(key)] = value
    for key, value in meta.items():
        if len(value.encode()) > MAX_META_VALUE_BYTES:
            raise ValueError(f"instance metadata {decode_meta_key(key)!r}: its value is "
                             f"{len(value.encode())} bytes, Consul service metadata holds at most "
                             f"{MAX_META_VALUE_BYTES}")
    if len(meta) > MAX_META_PAIRS:
        raise ValueError(f"instance {instance.instance_id}: {len(meta)} metadata pairs (with model_name and "
                         f"model_version), Consul service metadata holds at most {MAX_META_PAIRS}")
    return meta


def split_address(address: str) -> tuple[str, int]:
    """`host:port` or `[v6]:port` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"instance address must be host:port, not {address!r}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def service_definition(instance: discovery_pb2.Instance, check: dict) -> dict:
    """The body of PUT /v1/agent/service/register."""
    host, port = split_address(instance.address)
    return {
        "ID": instance.instance_id,
        "Name": consul_service_name(instance.service),
        "Address": host,
        "Port": port,
        "Meta": encode_meta(instance),
        "Check": check,
    }


def instance_from_entry(entry: dict, service: str) -> discovery_pb2.Instance:
    """One element of GET /v1/health/service/<name> (a Node, its Service, its Checks) as an Instance.
    A service registered without an address has the node's (Consul's documented default)."""
    node = entry.get("Node") or {}
    consul_service = entry.get("Service") or {}
    meta = dict(consul_service.get("Meta") or {})
    host = consul_service.get("Address") or node.get("Address") or ""
    return discovery_pb2.Instance(
        instance_id=consul_service.get("ID", ""),
        service=service,
        address=join_address(host, int(consul_service.get("Port") or 0)),
        model_name=meta.pop(MODEL_NAME_KEY, ""),
        model_version=meta.pop(MODEL_VERSION_KEY, ""),
        metadata={decode_meta_key(key): value for key, value in meta.items()},
    )
