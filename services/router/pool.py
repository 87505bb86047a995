"""The router's view of the workers: who serves what, how busy each is, and which one takes a request.

The pool follows discovery: a worker appears once it has registered (which it does only when ready)
and disappears when it deregisters (drain) or its lease expires. For each worker it keeps one
channel, a load view (`load.ReplicaLoad`) fed by the worker's `StreamLoad` reports, and — for LLM
workers — its KV events in the shared `KvIndex`. `pick` hands the routable replicas of the model to
the model's routing policy (`policies.py`).

A replica whose reports stop (a stopped process), or that reports STALLED, leaves the candidates at
once; if it stays so for `migrate_after_s`, its open generation streams are interrupted so that the
router continues them elsewhere (`relay.py`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc

from protos.tensoryard.v1 import discovery_pb2, worker_pb2, worker_pb2_grpc
from services.common.discovery import DiscoveryClient
from services.common.grpc_server import aio_channel
from services.common.telemetry import get_logger
from services.common.tls import PLAINTEXT, ChannelSecurity
from services.router import metrics
from services.router.kv_index import KvIndex
from services.router.load import DRAINING, ReplicaLoad
from services.router.policies import LoadGuard, RouteRequest, RoutingPolicy, make_policy
from services.router.prompts import prompt_block_hashes

log = get_logger(__name__)

RECONNECT_BACKOFF_S = (0.05, 0.1, 0.25, 0.5, 1.0)
# How long a removed worker's channel stays open for the streams still running on it.
CLOSE_REMOVED_AFTER_S = 120.0


@dataclass(frozen=True, slots=True)
class PoolConfig:
    report_interval_ms: int = 50
    heartbeat_ms: int = 250
    # A replica with no report for this long takes no new requests.
    stale_after_s: float = 1.0
    # ... and after this long, its open streams move to other replicas.
    migrate_after_s: float = 3.0
    kv_events: bool = True  # ask workers for KV events (False: the approximate index only)
    routing_policy: str = "auto"  # auto: kv_aware for generation models, least_load for the rest
    model_policies: tuple[tuple[str, str], ...] = ()
    kv_overlap_weight: float = 4.0
    kv_temperature: float = 0.0
    guard: LoadGuard = LoadGuard()


class Interruptible:
    """A generation stream open on a backend, which the pool may ask to move elsewhere."""

    __slots__ = ("call", "reason")

    def __init__(self) -> None:
        self.call = None
        self.reason: str | None = None

    def interrupt(self, reason: str) -> None:
        self.reason = reason
        if self.call is not None:
            self.call.cancel()


@dataclass(eq=False, slots=True)
class Backend:
    instance: discovery_pb2.Instance
    channel: grpc.aio.Channel
    load: ReplicaLoad = field(default_factory=ReplicaLoad)
    streams: set[Interruptible] = field(default_factory=set)
    removed: bool = False
    follower: asyncio.Task | None = None
    # Channel call objects by method: creating one per request costs more than the call itself.
    _calls: dict[str, object] = field(default_factory=dict)

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id

    @property
    def model_name(self) -> str:
        return self.instance.model_name

    @property
    def model_version(self) -> str:
        return self.instance.model_version

    def unary(self, method: str):
        """A raw unary call: bytes in, bytes out, nothing (de)serialized."""
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self.channel.unary_unary(method)
        return call

    def unary_stream(self, method: str):
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self.channel.unary_stream(method)
        return call

    def stream_stream(self, method: str):
        call = self._calls.get(method)
        if call is None:
            call = self._calls[method] = self.channel.stream_stream(method)
        return call


class BackendPool:
    def __init__(self, discovery: DiscoveryClient, max_message_bytes: int, config: PoolConfig = PoolConfig(),
                 kv_index: KvIndex | None = None, model_task=lambda name: None, on_change=lambda: None,
                 security: ChannelSecurity = PLAINTEXT):
        self._discovery = discovery
        self._max_message_bytes = max_message_bytes
        self._security = security  # of the channels to the workers
        self.config = config
        self.kv_index = kv_index or KvIndex()
        self._model_task = model_task  # model name -> "generation" / "embedding" / None (unknown yet)
        self._on_change = on_change  # called when the routable set may have changed (readiness)
        self._backends: dict[str, Backend] = {}
        self._policies: dict[str, RoutingPolicy] = {}
        self.synced = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self._kv_mode_series: set[str] = set()  # workers with a KV_INDEX_MODE series
        self._routed_counters: dict[tuple, object] = {}  # metric children by (model, policy) (labels() per call costs)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._watch_replicas())]

    # -- discovery -------------------------------------------------------------------------------

    async def _follow(self) -> None:
        async for instances in self._discovery.watch(service="worker"):
            self._apply(instances)
            self.synced.set()
            self._on_change()

    def _apply(self, instances: list[discovery_pb2.Instance]) -> None:
        current = {i.instance_id: i for i in instances}
        for instance_id in list(self._backends):
            if instance_id not in current or current[instance_id].address != self._backends[instance_id].instance.address:
                self._remove(self._backends.pop(instance_id))
        for instance_id, instance in current.items():
            if instance_id not in self._backends:
                backend = Backend(instance, aio_channel(instance.address, self._max_message_bytes,
                                                        security=self._security))
                self._backends[instance_id] = backend
                backend.follower = asyncio.create_task(self._follow_load(backend))
                log.info("backend_added", worker=instance_id, model=instance.model_name,
                         version=instance.model_version, address=instance.address)

    def _remove(self, backend: Backend) -> None:
        backend.removed = True
        if backend.follower is not None:
            backend.follower.cancel()
        self.kv_index.remove_replica(backend.instance_id)
        if backend.instance_id in self._kv_mode_series:
            self._kv_mode_series.discard(backend.instance_id)
            metrics.KV_INDEX_MODE.remove(backend.instance_id)
        log.info("backend_removed", worker=backend.instance_id, model=backend.model_name,
                 open_streams=len(backend.streams))
        asyncio.get_running_loop().create_task(self._close_when_idle(backend))

    @staticmethod
    async def _close_when_idle(backend: Backend) -> None:
        """Requests already sent finish on the old channel (a draining worker completes them)."""
        deadline = time.monotonic() + CLOSE_REMOVED_AFTER_S
        while backend.streams and time.monotonic() < deadline:
            await asyncio.sleep(1.0)
        await asyncio.sleep(5.0)  # unary calls in flight
        await backend.channel.close()

    # -- load reports ----------------------------------------------------------------------------

    async def _follow_load(self, backend: Backend) -> None:
        stub = worker_pb2_grpc.WorkerControlStub(backend.channel)
        request = worker_pb2.StreamLoadRequest(
            interval_ms=self.config.report_interval_ms, heartbeat_ms=self.config.heartbeat_ms,
            kv_events=self.config.kv_events,
        )
        attempt = 0
        announced_mode: bool | None = None
        while not backend.removed:
            try:
                async for report in stub.StreamLoad(request):
                    attempt = 0
                    was_routable = backend.load.routable(time.monotonic(), self.config.stale_after_s)
                    backend.load.on_report(report.stats, time.monotonic())
                    events = report.kv_events
                    if events.block_size:
                        backend.load.block_size = events.block_size
                        self.kv_index.apply_events(backend.instance_id, events.stored, events.removed, events.snapshot)
                    has_events = self.kv_index.has_events(backend.instance_id)
                    if has_events != announced_mode and report.stats.max_num_seqs:
                        announced_mode = self._announce_kv_mode(backend, has_events)
                    if was_routable != backend.load.routable(time.monotonic(), self.config.stale_after_s):
                        self._on_change()
            except grpc.aio.AioRpcError as error:
                if error.code() is grpc.StatusCode.UNIMPLEMENTED:
                    backend.load.reports = False
                    log.warning("backend_sends_no_load_reports", worker=backend.instance_id)
                    return
                self.kv_index.lose_events(backend.instance_id)
                if announced_mode:
                    announced_mode = self._announce_kv_mode(backend, False)
                log.info("backend_load_stream_lost", worker=backend.instance_id, code=error.code().name)
            await asyncio.sleep(RECONNECT_BACKOFF_S[min(attempt, len(RECONNECT_BACKOFF_S) - 1)])
            attempt += 1

    def _announce_kv_mode(self, backend: Backend, has_events: bool) -> bool:
        metrics.KV_INDEX_MODE.labels(backend.instance_id).set(1 if has_events else 0)
        self._kv_mode_series.add(backend.instance_id)
        if has_events:
            log.info("kv_index_from_events", worker=backend.instance_id, model=backend.model_name)
        else:
            log.warning("kv_index_approximate", worker=backend.instance_id, model=backend.model_name,
                        reason="the worker sends no KV events: routing by the prompts this router sent it")
        return has_events

    async def _watch_replicas(self) -> None:
        """Replicas that went silent or stalled: out of rotation at once (see load.routable), and
        their open streams moved elsewhere once it has lasted migrate_after_s."""
        was_routable: dict[str, bool] = {}
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            changed = False
            for backend in list(self._backends.values()):
                routable = backend.load.routable(now, self.config.stale_after_s)
                changed |= was_routable.get(backend.instance_id, True) != routable
                was_routable[backend.instance_id] = routable
                if routable or not backend.streams or backend.load.state == DRAINING:
                    continue
                silent_s = backend.load.silent_for_s(now)
                if silent_s >= self.config.migrate_after_s or (
                    backend.load.state != "SERVING" and now - backend.load.reported_at_s >= self.config.migrate_after_s
                ):
                    reason = "silent" if silent_s >= self.config.migrate_after_s else backend.load.state.lower()
                    log.warning("backend_streams_moved", worker=backend.instance_id, reason=reason,
                                num_streams=len(backend.streams))
                    for stream in list(backend.streams):
                        stream.interrupt(reason)
            if changed:
                self._on_change()

    # -- choosing --------------------------------------------------------------------------------

    def backends(self, model_name: str = "", model_version: str = "") -> list[Backend]:
        return [
            b
            for b in self._backends.values()
            if (not model_name or b.model_name == model_name)
            and (not model_version or b.model_version == model_version)
        ]

    def all_backends(self) -> list[Backend]:
        """Every backend; safe from another thread (the metrics collector): one C-level copy."""
        return list(self._backends.values())

    def routable(self, model_name: str = "", model_version: str = "") -> list[Backend]:
        now = time.monotonic()
        return [b for b in self.backends(model_name, model_version) if b.load.routable(now, self.config.stale_after_s)]

    def policy_for(self, model_name: str) -> RoutingPolicy:
        policy = self._policies.get(model_name)
        if policy is None:
            name = dict(self.config.model_policies).get(model_name, self.config.routing_policy)
            task = self._model_task(model_name)
            if name == "auto":
                if task is None:  # not known yet: decide once the catalog knows it
                    return make_policy("least_load", self.kv_index, guard=self.config.guard)
                name = "kv_aware" if task == "generation" else "least_load"
            policy = self._policies[model_name] = make_policy(
                name, self.kv_index, self.config.kv_overlap_weight, self.config.kv_temperature, self.config.guard
            )
        return policy

    def pick(self, request: RouteRequest, prompt_token_ids: list[int] | None = None,
             exclude: set[str] = frozenset(), unsaturated: bool = False,
             candidates: list[Backend] | None = None) -> Backend | None:
        """The replica the model's policy chooses among the routable ones (or `candidates`, the
        caller's list of them), not in `exclude` and, when `unsaturated`, only those with room."""
        if candidates is None:
            candidates = self.routable(request.model_name, request.model_version)
        if exclude or unsaturated:
            candidates = [b for b in candidates
                          if b.instance_id not in exclude and not (unsaturated and b.load.saturated)]
        if not candidates:
            return None
        if len(candidates) > 1:
            with_room = [b for b in candidates if not b.load.saturated]
            if with_room:  # a replica that says it would refuse the request is chosen only when all would
                candidates = with_room
        policy = self.policy_for(request.model_name)
        if policy.needs_prompt_blocks and prompt_token_ids:
            # One version's replicas share a tokenizer and a block size (a traffic split between
            # versions chooses the version before this).
            version = min(b.model_version for b in candidates)
            candidates = [b for b in candidates if b.model_version == version]
            request.block_hashes = prompt_block_hashes(prompt_token_ids, candidates[0].load.block_size)
        backend = policy.choose(request, candidates)
        hashes = request.block_hashes or []
        backend.load.on_routed(len(hashes))
        if hashes:
            matched = self.kv_index.matched_blocks(hashes, [backend.instance_id])[backend.instance_id]
            metrics.PREFIX_MATCHED_BLOCKS.labels(request.model_name, "matched").inc(matched)
            metrics.PREFIX_MATCHED_BLOCKS.labels(request.model_name, "prompt").inc(len(hashes))
            self.kv_index.record_routed(backend.instance_id, hashes)
        key = (request.model_name, policy.name)
        counter = self._routed_counters.get(key)
        if counter is None:
            counter = self._routed_counters[key] = metrics.ROUTED.labels(*key)
        counter.inc()
        return backend

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for backend in self._backends.values():
            backend.removed = True
            if backend.follower is not None:
                backend.follower.cancel()
            await backend.channel.close()

