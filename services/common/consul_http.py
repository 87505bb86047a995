"""A small asyncio client of Consul's HTTP API (https://developer.hashicorp.com/consul/api-docs).

Only the transport: the ACL token (`X-Consul-Token`, the header Consul documents in preference to a
`?token=` parameter), JSON in and out, blocking reads that return `X-Consul-Index`, and two errors
callers can act on: `ConsulUnavailable` (nothing answered, or a 5xx: try again later) and
`ConsulError` (Consul answered and refused: a bad request, an ACL denial, an unknown check).

Why aiohttp and not py-consul: py-consul is synchronous (requests). A blocking query holds its call
for up to `wait`; run in `asyncio.to_thread` it would hold one of the default executor's few threads
(the worker loads and warms its model in that pool) and could not be cancelled on drain, so shutdown
would wait out the query. aiohttp requests are tasks: cancelled at once, none holds a thread.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

# Consul adds up to wait/16 of jitter to a blocking query; the HTTP timeout leaves room for it.
BLOCKING_SLACK_S = 5.0
REQUEST_TIMEOUT_S = 5.0


class ConsulError(Exception):
    """Consul answered with a 4xx (or a 5xx it explains): the request itself was refused."""

    def __init__(self, status: int, method: str, path: str, body: str):
        self.status = status
        self.body = body.strip()
        super().__init__(f"Consul {method} {path}: HTTP {status}: {self.body or '(no body)'}")


class ConsulUnavailable(Exception):
    """Consul did not answer (refused, reset, timed out) or answered 5xx: try again later."""


class ConsulHttp:
    def __init__(self, base_url: str, token: str = ""):
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"Consul base URL must start with http:// or https://, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self._headers = {"X-Consul-Token": token} if token else {}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        # Created on first use: a ClientSession belongs to the event loop that is running then.
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(headers=self._headers)
        return self._session

    async def request(self, method: str, path: str, params: dict[str, str] | None = None,
                      body: Any = None, timeout_s: float = REQUEST_TIMEOUT_S, raw_body: bytes | None = None
                      ) -> tuple[Any, int]:
        """The decoded JSON body (None when empty) and X-Consul-Index (0 when absent). `raw_body` is
        sent as it is (a KV value), `body` as JSON."""
        url = self.base_url + path
        data = raw_body if raw_body is not None else (None if body is None else json.dumps(body))
        try:
            async with self._client().request(
                method, url, params=params, data=data,
                timeout=aiohttp.ClientTimeout(total=timeout_s),
            ) as response:
                text = await response.text()
                index = _index_header(response.headers.get("X-Consul-Index"))
                if response.status >= 500 and not _explains_refusal(text):
                    raise ConsulUnavailable(f"Consul {method} {path}: HTTP {response.status}: {text.strip()}")
                if response.status >= 400:
                    raise ConsulError(response.status, method, path, text)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            raise ConsulUnavailable(f"Consul {method} {url}: {type(error).__name__}: {error}") from None
        return (json.loads(text) if text.strip() else None), index

    async def get(self, path: str, params: dict[str, str] | None = None) -> tuple[Any, int]:
        return await self.request("GET", path, params)

    async def blocking_get(self, path: str, params: dict[str, str], index: int, wait_s: float) -> tuple[Any, int]:
        """A blocking query: returns when the result's index passes `index` or after about `wait_s`.
        Index 0 is a plain read that returns at once."""
        params = dict(params)
        if index > 0:
            params["index"] = str(index)
            params["wait"] = f"{wait_s:g}s"
        return await self.request("GET", path, params, timeout_s=wait_s * 17 / 16 + BLOCKING_SLACK_S)

    async def put(self, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        result, _ = await self.request("PUT", path, params, body)
        return result

    async def put_raw(self, path: str, value: bytes, params: dict[str, str] | None = None) -> Any:
        result, _ = await self.request("PUT", path, params, raw_body=value)
        return result

    async def delete(self, path: str, params: dict[str, str] | None = None) -> Any:
        result, _ = await self.request("DELETE", path, params)
        return result

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _index_header(value: str | None) -> int:
    try:
        return int(value) if value else 0
    except ValueError:
        return 0


def _explains_refusal(text: str) -> bool:
    """Older Consul agents answer a TTL update for an unknown check with HTTP 500 and this text."""
    return "Unknown check" in text or "does not have associated TTL" in text
