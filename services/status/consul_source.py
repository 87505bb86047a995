"""`tensoryard status --discovery consul://host:port`: the workers and routers Consul lists as
passing, read with one plain (non-blocking) health query per service each round, standard library
HTTP as the rest of the status command (it is synchronous)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import quote

from services.common.consul_meta import consul_service_name, instance_from_entry
from services.common.discovery_backends import consul_base_url


@dataclass(frozen=True, slots=True)
class ConsulSource:
    base_url: str  # http(s)://host:port of a Consul agent
    token: str = ""

    @classmethod
    def from_url(cls, discovery_url: str, token: str = "") -> ConsulSource:
        base_url = consul_base_url(discovery_url)
        if base_url is None:
            raise ValueError(f"discovery: {discovery_url!r} is not consul://host:port")
        return cls(base_url, token)

    @property
    def host(self) -> str:
        return self.base_url.split("://", 1)[1].rsplit(":", 1)[0]

    def passing(self, service: str, timeout_s: float) -> list:
        """The service's passing instances (discovery_pb2.Instance); raises OSError with Consul's
        answer when it refuses or cannot be reached."""
        path = f"/v1/health/service/{quote(consul_service_name(service), safe='')}?passing=true"
        request = urllib.request.Request(self.base_url + path,
                                         headers={"X-Consul-Token": self.token} if self.token else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                entries = json.loads(reply.read() or b"[]")
        except urllib.error.HTTPError as error:
            raise OSError(f"HTTP {error.code}: {error.read().decode('utf-8', 'replace').strip()}") from None
        return [instance_from_entry(entry, service) for entry in entries or []]
