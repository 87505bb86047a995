"""A client for the fault tests: native `Generate` streams, run concurrently, with what each saw.

Each call records its status, its tokens, when the first arrived and when it ended, so tests can
ask "did every stream complete with its full token count" or "what was the accepted requests' time
to first token" of one run.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field

import grpc

from protos.tensoryard.v1 import generation_pb2 as gen
from protos.tensoryard.v1 import generation_pb2_grpc as gen_grpc


@dataclass
class Outcome:
    code: str = "OK"
    details: str = ""
    token_ids: list[int] = field(default_factory=list)
    sent_at_s: float = 0.0
    first_token_s: float | None = None  # after sent_at_s
    ended_s: float = 0.0  # after sent_at_s
    pushback_ms: int | None = None  # gRPC's retry pushback, on a refusal

    @property
    def ok(self) -> bool:
        return self.code == "OK"


def request(model: str, prompt: str, max_tokens: int, **sampling) -> gen.GenerateRequest:
    sampling = {"temperature": 0.0, "ignore_eos": True, **sampling}
    return gen.GenerateRequest(
        model_name=model, prompt=prompt, sampling=gen.SamplingParameters(max_tokens=max_tokens, **sampling)
    )


def chat(model: str, content: str, max_tokens: int, system: str | None = None, **sampling) -> gen.GenerateRequest:
    messages = [gen.ChatMessage(role="system", content=system)] if system else []
    messages.append(gen.ChatMessage(role="user", content=content))
    sampling = {"temperature": 0.0, **sampling}
    return gen.GenerateRequest(
        model_name=model, messages=gen.ChatMessages(messages=messages),
        sampling=gen.SamplingParameters(max_tokens=max_tokens, **sampling),
    )


async def generate(stub, message: gen.GenerateRequest, timeout_s: float = 120, metadata=(),
                   on_token=None) -> Outcome:
    outcome = Outcome(sent_at_s=time.monotonic())
    try:
        async for response in stub.Generate(message, timeout=timeout_s, metadata=metadata):
            if response.token_ids and outcome.first_token_s is None:
                outcome.first_token_s = time.monotonic() - outcome.sent_at_s
            outcome.token_ids.extend(response.token_ids)
            if on_token is not None:
                on_token(outcome)
    except grpc.aio.AioRpcError as error:
        outcome.code, outcome.details = error.code().name, error.details() or ""
        pushback = dict(error.trailing_metadata() or ()).get("grpc-retry-pushback-ms")
        outcome.pushback_ms = int(pushback) if pushback is not None else None
    outcome.ended_s = time.monotonic() - outcome.sent_at_s
    return outcome


class Client:
    """One grpc.aio channel to a router, for use inside asyncio.run()."""

    def __init__(self, address: str):
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = gen_grpc.TextGenerationStub(self.channel)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *_) -> None:
        await self.channel.close()

    async def many(self, messages: list[gen.GenerateRequest], concurrency: int | None = None, **kwargs) -> list[Outcome]:
        """All of them at once, or at most `concurrency` in flight; outcomes in the messages' order."""
        limit = asyncio.Semaphore(concurrency or len(messages) or 1)

        async def one(message):
            async with limit:
                return await generate(self.stub, message, **kwargs)

        return list(await asyncio.gather(*(one(m) for m in messages)))

    async def closed_loop(self, make_message, num_clients: int, duration_s: float, **kwargs) -> list[Outcome]:
        """num_clients callers, each sending its next request as soon as the last ends."""
        end_at = time.monotonic() + duration_s
        outcomes: list[Outcome] = []

        async def caller(index: int) -> None:
            n = 0
            while time.monotonic() < end_at:
                outcomes.append(await generate(self.stub, make_message(index, n), **kwargs))
                n += 1

        await asyncio.gather(*(caller(i) for i in range(num_clients)))
        return outcomes

    async def open_loop(self, make_message, rate_per_s: float, duration_s: float, metadata=(), seed: int = 0,
                        **kwargs) -> list[Outcome]:
        """Poisson arrivals at rate_per_s (seeded: the same arrival times each run), whatever
        happens to the earlier requests."""
        arrivals = random.Random(seed)
        tasks = []
        started = time.monotonic()
        at_s = arrivals.expovariate(rate_per_s)
        n = 0
        while at_s < duration_s:
            delay_s = started + at_s - time.monotonic()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(generate(self.stub, make_message(n), metadata=metadata, **kwargs)))
            n += 1
            at_s += arrivals.expovariate(rate_per_s)
        return list(await asyncio.gather(*tasks))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]
