"""bench/openai_stream.py against a local aiohttp server streaming canned server-sent events."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

from bench.llm_load import RequestTrace, summarize
from bench.openai_stream import ChatServer, add_chunk, parse_event, session, traced_chat


def _chunk(delta: dict, finish_reason: str | None = None, usage: dict | None = None) -> dict:
    chunk = {"object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}
    return chunk if usage is None else {**chunk, "usage": usage}


# What vLLM sends with include_usage and no continuous usage: a role-only chunk, content, a ping
# comment, the finish reason, then a usage-only chunk and [DONE].
CANNED_EVENTS = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Hello"}),
    _chunk({"content": ","}),
    ": ping",
    _chunk({"content": " world"}, finish_reason="length"),
    {"object": "chat.completion.chunk", "choices": [],
     "usage": {"prompt_tokens": 37, "completion_tokens": 3, "prompt_tokens_details": {"cached_tokens": 32}}},
    "[DONE]",
]


def _sse(event) -> bytes:
    if isinstance(event, str) and event.startswith(":"):
        return f"{event}\n\n".encode()
    return f"data: {event if isinstance(event, str) else json.dumps(event)}\n\n".encode()


async def _serve_and_stream(body: dict) -> tuple[RequestTrace, dict]:
    received = {}

    async def chat(request: web.Request) -> web.StreamResponse:
        received.update(await request.json())
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in CANNED_EVENTS:
            await response.write(_sse(event))
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        traces: list[RequestTrace] = []
        async with session() as http:
            await traced_chat(http, f"http://127.0.0.1:{port}/v1/chat/completions", body, traces)
        return traces[0], received
    finally:
        await runner.cleanup()


def test_stream_fills_the_trace():
    server = ChatServer("http://unused", "tiny", {"ignore_eos": True})
    trace, received = asyncio.run(_serve_and_stream(server.body("hi", max_tokens=3)))
    assert received["stream"] is True and received["ignore_eos"] is True and received["max_tokens"] == 3
    assert received["messages"] == [{"role": "user", "content": "hi"}]
    assert not trace.error and trace.finished_at_s is not None
    assert trace.text == "Hello, world"
    assert [n for _, n in trace.chunks] == [1, 1, 1]  # the role-only and usage-only chunks carry no token
    assert trace.num_output_tokens == 3 and trace.finish_reason == "length"
    assert (trace.num_prompt_tokens, trace.num_cached_prompt_tokens) == (37, 32)
    summary = summarize([trace], trace.sent_at_s, trace.finished_at_s, num_output_tokens=3)
    assert summary["num_wrong_length"] == 0 and summary["ttft_p50_ms"] is not None


def test_usage_counts_tokens_the_chunks_did_not_show():
    trace = RequestTrace(sent_at_s=0.0)
    add_chunk(trace, _chunk({"role": "assistant"}, usage={"prompt_tokens": 5, "completion_tokens": 0}), 1.0)
    add_chunk(trace, _chunk({"content": "é"}, usage={"prompt_tokens": 5, "completion_tokens": 2}), 2.0)
    add_chunk(trace, _chunk({"content": "!"}), 3.0)
    assert trace.chunks == [(2.0, 2), (3.0, 1)] and trace.num_output_tokens == 3


def test_parse_event_skips_what_is_not_data():
    assert parse_event(b"\n") is None and parse_event(b": ping\n") is None and parse_event(b"data: [DONE]\n") is None
    assert parse_event(b'data: {"a": 1}\r\n') == {"a": 1}
