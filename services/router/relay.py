"""Sending a request to a replica and its answer back: retries before anything was sent back,
migration of generation streams after.

- **Unary** calls and streams that have sent nothing yet are retried once on another replica when
  the first answers UNAVAILABLE (unreachable, draining: it has not run the request) or
  RESOURCE_EXHAUSTED (full: another may have room), within the router's retry budget.
- **Generation streams** (native `Generate`, and LLM requests on `ModelStreamInfer`) whose replica
  goes away mid-generation — killed (UNAVAILABLE), drained past its grace period (it ends the
  stream UNAVAILABLE), or silent or stalled for `migrate_after_s` (the pool interrupts the stream) —
  continue on another replica from the prompt plus the tokens already sent, as Dynamo's request
  migration does. The new replica resumes the sampling state (greedy and seeded requests produce the
  tokens the uninterrupted run would have) and sends only what follows, so the client sees one
  unbroken stream. At most `max_migrations` moves per request.

A stream kind says how to open a call, read progress (tokens, final flag) out of each response, and
build the resumed request: field 9 of `GenerateRequest` (here), or the `tensoryard_resume_token_ids`
parameter of a `ModelInferRequest` (`triton_stream.py`), appended as serialized bytes: a protobuf
message followed by another is their merge, so the original request is never decoded and encoded
again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from protos.tensoryard.v1 import generation_pb2
from services.common.access_log import current_request
from services.common.errors import Unavailable
from services.common.telemetry import get_logger
from services.router import metrics
from services.router.pool import Backend, BackendPool, Interruptible
from services.router.policies import RouteRequest
from services.router.retry import RetryBudget

log = get_logger(__name__)

GENERATE = "/tensoryard.v1.TextGeneration/Generate"
PUSHBACK_HEADER = "grpc-retry-pushback-ms"
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class RelayError(Exception):
    """The request failed at the replica(s); the caller answers with this status."""

    def __init__(self, code: grpc.StatusCode, details: str, pushback_ms: str | None = None):
        super().__init__(details)
        self.code = code
        self.details = details
        self.pushback_ms = pushback_ms

    @classmethod
    def from_rpc(cls, error: grpc.aio.AioRpcError) -> RelayError:
        pushback = next((v for k, v in (error.trailing_metadata() or ()) if k == PUSHBACK_HEADER), None)
        return cls(error.code(), error.details() or "", pushback)

    async def abort(self, context: grpc.aio.ServicerContext) -> None:
        if self.pushback_ms is not None:
            context.set_trailing_metadata(((PUSHBACK_HEADER, self.pushback_ms),))
        await context.abort(self.code, self.details)


class NativeGenerate:
    """tensoryard.v1.TextGeneration/Generate: response bytes pass through untouched."""

    def open(self, backend: Backend, request: bytes, timeout_s, metadata):
        return backend.unary_stream(GENERATE)(request, timeout=timeout_s, metadata=metadata)

    def read(self, response: bytes) -> tuple[bytes, list[int], bool]:
        progress = generation_pb2.GenerateResponse.FromString(response)
        return response, list(progress.token_ids), bool(progress.finish_reason)

    def resumed(self, request: bytes, sent_token_ids: list[int]) -> bytes:
        return request + generation_pb2.GenerateRequest(resume_token_ids=sent_token_ids).SerializeToString()


class Relay:
    def __init__(self, pool: BackendPool, budget: RetryBudget, max_migrations: int = 3):
        self.pool = pool
        self.budget = budget
        self.max_migrations = max_migrations

    async def unary(self, method: str, route: RouteRequest, request: bytes, context, metadata,
                    first: Backend, prompt_token_ids=None, forwarded: metrics.Forwarded | None = None) -> bytes:
        """One call, retried once elsewhere when the replica had no room or could not run it.
        `forwarded` (the request's metrics) learns each attempt's replica and upstream time."""
        self.budget.on_request()
        record = current_request()  # its access line names the replica that answered
        backend = first
        tried: set[str] = set()
        while True:
            tried.add(backend.instance_id)
            if record is not None:
                record.worker = backend.instance_id
            backend.load.on_sent()
            called_s = time.perf_counter()
            try:
                return await backend.unary(method)(request, timeout=context.time_remaining(), metadata=metadata)
            except grpc.aio.AioRpcError as error:
                failure = RelayError.from_rpc(error)
            finally:
                backend.load.on_ended()
                if forwarded is not None:
                    forwarded.answered(backend, time.perf_counter() - called_s)
            backend = self._retry_target(route, failure, backend, tried, prompt_token_ids)
            if backend is None:
                raise failure

    async def stream(self, kind, route: RouteRequest, request: bytes, context, metadata,
                     first: Backend, prompt_token_ids=None,
                     forwarded: metrics.Forwarded | None = None) -> AsyncIterator[bytes]:
        """The stream's responses; on a lost replica, the rest of them from another. An attempt's
        upstream time (for `forwarded`) runs from opening the call to its end."""
        self.budget.on_request()
        record = current_request()  # its access line names the replica and the token counts
        if record is not None and prompt_token_ids:
            record.num_prompt_tokens = len(prompt_token_ids)
        backend = first
        tried: set[str] = set()
        sent: list[int] = []
        num_migrations = 0
        while True:
            tried.add(backend.instance_id)
            if record is not None:
                record.worker = backend.instance_id
            handle = Interruptible()
            backend.streams.add(handle)
            backend.load.on_sent()
            called_s = time.perf_counter()
            call = handle.call = kind.open(backend, kind.resumed(request, sent) if sent else request,
                                           context.time_remaining(), metadata)
            completed = False
            try:
                async for response in call:
                    out, token_ids, final = kind.read(response)
                    sent.extend(token_ids)
                    if record is not None and token_ids:
                        record.num_output_tokens = len(sent)
                    yield out
                    if final:
                        break
                completed = True
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if handle.reason is None or (task is not None and task.cancelling()):
                    raise  # the caller went away: so does the call (cancelled in finally)
                failure = RelayError(grpc.StatusCode.UNAVAILABLE, f"replica {handle.reason}")
            except grpc.aio.AioRpcError as error:
                failure = RelayError.from_rpc(error)
            finally:
                backend.streams.discard(handle)
                backend.load.on_ended()
                if forwarded is not None:
                    forwarded.answered(backend, time.perf_counter() - called_s)
                if not completed:  # the caller went away, or the replica did: stop the call
                    call.cancel()
            if not sent:
                backend = self._retry_target(route, failure, backend, tried, prompt_token_ids)
            else:
                backend = self._migration_target(route, failure, tried, num_migrations, len(sent), prompt_token_ids)
                num_migrations += 1
            if backend is None:
                raise failure

    def _retry_target(self, route, failure: RelayError, failed: Backend, tried: set[str],
                      prompt_token_ids) -> Backend | None:
        full = failure.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        if full:  # whatever seat its last report left has been taken: full until it reports again
            failed.load.on_refused()
        if failure.code not in _RETRYABLE:
            return None
        # A full replica's refusal is worth a retry only where its load report says there is room.
        other = self.pool.pick(route, prompt_token_ids, exclude=tried, unsaturated=full)
        if other is None or not self.budget.try_spend():
            return None
        metrics.RETRIES.labels(route.model_name, failure.code.name).inc()
        return other

    def _migration_target(self, route, failure: RelayError, tried: set[str], num_migrations: int,
                          num_sent: int, prompt_token_ids) -> Backend | None:
        if failure.code is not grpc.StatusCode.UNAVAILABLE or num_migrations >= self.max_migrations:
            return None
        other = self.pool.pick(route, prompt_token_ids, exclude=tried)
        if other is None:
            return None
        metrics.MIGRATIONS.labels(route.model_name, "unavailable").inc()
        log.info("stream_migrated", to_worker=other.instance_id, num_tokens_sent=num_sent, reason=failure.details)
        return other


def no_replica(route: RouteRequest) -> Unavailable:
    version = f" version {route.model_version}" if route.model_version else ""
    return Unavailable(f"no ready replica of model '{route.model_name}'{version}; retry shortly")
