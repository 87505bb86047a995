"""The block hashes a router computes for a prompt are the ones the worker's cache stores: for a raw
prompt and for chat messages rendered by the model's chat template. Workers stream them as KV events
(a snapshot first, then what changed) together with their load."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from protos.tensoryard.v1 import generation_pb2 as gen
from protos.tensoryard.v1 import generation_pb2_grpc as gen_grpc
from protos.tensoryard.v1 import worker_pb2, worker_pb2_grpc
from services.common.grpc_server import aio_channel
from services.router.prompts import PromptTokenizers, prompt_block_hashes
from tests.e2e.test_generation import LLM
from tests.e2e.test_generation_lifecycle import worker_address

SYSTEM = ("You are a careful assistant for a lighthouse museum. Answer in one sentence, name the "
          "lighthouse when you can, and never invent dates. ") * 3


class KvEventStream:
    """A worker's StreamLoad with KV events, read on a thread: the cached set it describes."""

    def __init__(self, address: str):
        self.cached: set[bytes] = set()
        self.block_size = 0
        self.reports = 0
        self._lock = threading.Lock()
        self._channel = grpc.insecure_channel(address)
        self._call = worker_pb2_grpc.WorkerControlStub(self._channel).StreamLoad(
            worker_pb2.StreamLoadRequest(kv_events=True), timeout=120
        )
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for report in self._call:
                events = report.kv_events
                with self._lock:
                    self.reports += 1
                    self.block_size = events.block_size
                    if events.snapshot:
                        self.cached = set(events.stored)
                    else:
                        self.cached.difference_update(events.removed)
                        self.cached.update(events.stored)
        except grpc.RpcError:
            pass

    def holds(self, hashes: list[bytes]) -> bool:
        with self._lock:
            return set(hashes) <= self.cached

    def close(self) -> None:
        self._call.cancel()
        self._channel.close()


def router_side_hashes(stack, block_size: int, prompt=None, messages=None) -> list[bytes]:
    """What the router computes: its own tokenizer module, loaded from the registry as it loads it."""

    async def compute():
        channel = aio_channel(stack.registry)
        try:
            tokenizer = await PromptTokenizers(channel).ready(LLM, "1")
            return prompt_block_hashes(tokenizer.token_ids(prompt=prompt, messages=messages), block_size)
        finally:
            await channel.close()

    return asyncio.run(compute())


@pytest.fixture(scope="module")
def events(stack):
    stream = KvEventStream(worker_address(stack, LLM))
    deadline = time.monotonic() + 10
    while stream.reports == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    yield stream
    stream.close()


@pytest.mark.parametrize("form", ["prompt", "messages"])
def test_the_router_hashes_a_prompt_as_the_worker_stores_it(stack, events, form):
    assert events.block_size == 16
    if form == "prompt":
        request = gen.GenerateRequest(model_name=LLM, prompt=SYSTEM + "Which light is the oldest?")
        hashes = router_side_hashes(stack, events.block_size, prompt=request.prompt)
    else:
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Which light is oldest?"}]
        request = gen.GenerateRequest(model_name=LLM, messages=gen.ChatMessages(
            messages=[gen.ChatMessage(**m) for m in messages]))
        hashes = router_side_hashes(stack, events.block_size, messages=messages)
    request.sampling.CopyFrom(gen.SamplingParameters(temperature=0, max_tokens=2))
    assert len(hashes) >= 4
    assert not events.holds(hashes)
    with grpc.insecure_channel(stack.router) as channel:
        list(gen_grpc.TextGenerationStub(channel).Generate(request, timeout=60))
    deadline = time.monotonic() + 5
    while not events.holds(hashes) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert events.holds(hashes), "the worker's KV events never named the blocks the router hashed"
