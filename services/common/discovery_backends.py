"""Which discovery backend a process uses, chosen in one line from `--discovery`.

- `consul://host:port` (or `consul+https://host:port`): Consul's HTTP API on that agent
  (`discovery_consul.ConsulDiscovery`), with the ACL token from `CONSUL_HTTP_TOKEN` or
  `--consul-token-file`;
- anything else is a registry's address, `host:port` (what `--registry` names by default): its
  embedded catalog (`discovery.DiscoveryClient`).

Both have the same interface: `register(instance, ttl_ms, healthy=None)` returning a registration
with `stop()`, `list(service, model_name)`, `watch(service, model_name)` yielding the full instance
list on each change, and `close()`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Protocol

import grpc

from protos.tensoryard.v1 import discovery_pb2
from services.common.consul_http import ConsulError, ConsulUnavailable

CONSUL_SCHEMES = {"consul": "http", "consul+https": "https"}

# What a failed register, list or deregister raises, whichever the backend.
DISCOVERY_ERRORS = (grpc.aio.AioRpcError, ConsulError, ConsulUnavailable)


class Registration(Protocol):
    async def stop(self) -> None: ...


class Discovery(Protocol):
    async def register(self, instance: discovery_pb2.Instance, ttl_ms: int,
                       healthy: Callable[[], bool] | None = None) -> Registration: ...

    async def list(self, service: str = "", model_name: str = "") -> list[discovery_pb2.Instance]: ...

    def watch(self, service: str = "", model_name: str = "") -> AsyncIterator[list[discovery_pb2.Instance]]: ...

    async def close(self) -> None: ...


def consul_base_url(url: str) -> str | None:
    """`consul://host:port` -> `http://host:port`; None for a registry address."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return None
    if scheme not in CONSUL_SCHEMES:
        raise ValueError(f"discovery: {url!r}: the scheme must be consul:// or consul+https:// "
                         "(or give a registry's host:port for the embedded catalog)")
    host, colon, port = rest.rstrip("/").rpartition(":")
    if not colon or not host or not port.isdigit() or "/" in rest.rstrip("/"):
        raise ValueError(f"discovery: {url!r}: expected {scheme}://host:port")
    return f"{CONSUL_SCHEMES[scheme]}://{rest.rstrip('/')}"


def discovery_from_url(url: str, token: str = "", security=None) -> Discovery:
    """`security` (services.common.tls.ChannelSecurity) secures the channel to a registry's catalog;
    Consul's HTTPS is its own (consul+https://)."""
    base_url = consul_base_url(url)
    if base_url is not None:
        from services.common.discovery_consul import ConsulDiscovery

        return ConsulDiscovery(base_url, token)
    from services.common.discovery import DiscoveryClient
    from services.common.grpc_server import aio_channel

    if not url:
        raise ValueError("discovery: give a registry's host:port or consul://host:port")
    from services.common.tls import PLAINTEXT

    return DiscoveryClient(aio_channel(url, security=security or PLAINTEXT), owns_channel=True)


def read_consul_token(consul_token: str = "", consul_token_file: Path | None = None) -> str:
    """The ACL token: the file's first line when a file is named, else `consul_token` ("" : none)."""
    if consul_token_file is None:
        return consul_token
    try:
        token = consul_token_file.read_text().strip()
    except OSError as error:
        raise ValueError(f"consul_token_file: cannot read {consul_token_file}: {error.strerror}") from None
    if not token:
        raise ValueError(f"consul_token_file: {consul_token_file} is empty")
    return token
