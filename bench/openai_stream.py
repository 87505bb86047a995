"""Streaming chat completions over the OpenAI API (aiohttp), timed into bench/llm_load.py's
RequestTrace, so OpenAI servers run under the same loops and metrics as tensoryard's gRPC stream.

A response is server-sent events: `data: {chunk}` lines, then `data: [DONE]`. A chunk counts
`usage.completion_tokens` minus the tokens already counted when it carries usage (vLLM with
`continuous_usage_stats` puts it on every chunk, so each chunk's count is exact), else one token
per chunk with text (llama.cpp sends no usage in a stream and one token per chunk, two or more
only when a character spans tokens). So a role-only first chunk or a closing usage-only chunk
carries no token, and a closing usage that counts more than the chunks did puts the rest on it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import aiohttp

from bench.llm_load import RequestTrace, tracing

DONE = "[DONE]"


@dataclass(frozen=True, slots=True)
class ChatServer:
    """Where to send chat completions, and what this server needs on top of the common body."""

    base_url: str  # http://host:port, without /v1
    model: str
    extra_body: dict = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"{self.base_url}/v1/chat/completions"

    def body(self, content: str, max_tokens: int, stream: bool = True) -> dict:
        """One user message, greedy, at most max_tokens; usage with every chunk where supported."""
        body = {"model": self.model, "messages": [{"role": "user", "content": content}],
                "temperature": 0, "max_tokens": max_tokens, "stream": stream, **self.extra_body}
        if stream:
            body["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        return body


def session() -> aiohttp.ClientSession:
    """No client-side cap on connections or time: a request queued at the server waits there, as a
    gRPC one does, and the loops cancel what is left."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                 timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))


async def traced_chat(http: aiohttp.ClientSession, url: str, body: dict, traces: list[RequestTrace]) -> RequestTrace:
    """One streaming chat completion, timed (bind http and url with functools.partial for a TracedCall)."""
    async with tracing(traces) as trace:
        async with http.post(url, json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
            async for line in response.content:
                if (chunk := parse_event(line)) is not None:
                    add_chunk(trace, chunk, time.perf_counter())
    return trace


def parse_event(line: bytes) -> dict | None:
    """The JSON of a `data:` line; None for blank lines, comments (pings) and the closing [DONE]."""
    text = line.decode().strip()
    if not text.startswith("data:"):
        return None
    data = text[len("data:"):].strip()
    return None if data == DONE else json.loads(data)


def add_chunk(trace: RequestTrace, chunk: dict, arrived_s: float) -> None:
    choices = chunk.get("choices") or []
    content = "".join((choice.get("delta") or {}).get("content") or "" for choice in choices)
    trace.text += content
    if usage := chunk.get("usage"):
        num_tokens = usage["completion_tokens"] - trace.num_output_tokens
        trace.num_prompt_tokens = usage.get("prompt_tokens") or 0
        trace.num_cached_prompt_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    else:
        num_tokens = 1 if content else 0
    if num_tokens > 0:
        trace.chunks.append((arrived_s, num_tokens))
    if finish_reason := next((c["finish_reason"] for c in choices if c.get("finish_reason")), None):
        trace.finish_reason = finish_reason


async def complete(http: aiohttp.ClientSession, server: ChatServer, content: str, max_tokens: int) -> dict:
    """One chat completion without streaming: its text, finish reason and the server's own token counts."""
    async with http.post(server.url, json=server.body(content, max_tokens, stream=False)) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:300]}")
        reply = await response.json()
    choice = reply["choices"][0]
    return {"text": choice["message"]["content"], "finish_reason": choice["finish_reason"],
            "prompt_tokens": reply["usage"]["prompt_tokens"], "output_tokens": reply["usage"]["completion_tokens"]}
