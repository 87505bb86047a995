"""The router process: the front door on :8001.

Readiness: health (and ServerReady) is SERVING once the router follows discovery and, for each model
it serves (`--models`), at least one replica is routable; it follows the replicas as they come and
go. SIGTERM drains: NOT_SERVING at once (load balancers stop sending), new calls are refused, those in
flight get `drain_timeout_s` to finish, then the process exits.

The catalog (models, versions, aliases, traffic policies) refreshes every second in the background,
so a policy change applies within about a second. The router registers in discovery as service
`router` with its metrics port (the rollback guard reads what users saw there) and deregisters
first when it drains.
"""

from __future__ import annotations

import asyncio
import uuid

import prometheus_client

# Imported for their descriptors: reflection describes every service the router serves.
from protos.inference import grpc_service_pb2  # noqa: F401
from protos.tensoryard.v1 import discovery_pb2, embeddings_pb2, generation_pb2  # noqa: F401
from services.common.config import RouterConfig
from services.common.discovery_backends import (
    DISCOVERY_ERRORS, Discovery, Registration, discovery_from_url, read_consul_token,
)
from services.common.gc_tuning import freeze_startup_objects
from services.common.grpc_server import GrpcHost, aio_channel, install_signal_handlers
from services.common.telemetry import get_logger, start_metrics_server
from services.router import metrics
from services.router.admission import InFlightLimiter
from services.router.catalog import ModelCatalog
from services.router.cold_start import ColdStartHold, HeldSignals
from services.router.kv_index import KvIndex
from services.router.policies import LoadGuard
from services.router.pool import BackendPool, PoolConfig
from services.router.prompts import PromptTokenizers
from services.router.relay import Relay
from services.router.retry import RetryBudget
from services.router.handlers import inference_handler, native_handlers
from services.router.servicer import SERVICE, RoutingServicer

log = get_logger(__name__)

# The router's lease in discovery, as a worker's default: listed within seconds of a crash.
LEASE_TTL_MS = 5_000
REGISTER_RETRY_S = (0.5, 1.0, 2.0, 5.0)


def pool_config(config: RouterConfig) -> PoolConfig:
    return PoolConfig(
        stale_after_s=config.stale_after_s,
        migrate_after_s=config.migrate_after_s,
        kv_events=config.kv_index == "events",
        routing_policy=config.routing_policy,
        model_policies=config.model_policies,
        kv_overlap_weight=config.kv_overlap_weight,
        kv_temperature=config.kv_temperature,
        guard=LoadGuard(config.load_guard_abs, config.load_guard_ratio),
    )


async def serve(config: RouterConfig, stop: asyncio.Event | None = None) -> None:
    """Run the router until SIGINT/SIGTERM (or until `stop` is set, for callers that run it in
    their own event loop)."""
    metrics_port = start_metrics_server(config.telemetry, config.host)
    security = config.tls.channel_security()  # to the registry and the workers
    registry = aio_channel(config.registry_address, security=security)
    discovery = discovery_from_url(
        config.discovery.discovery_url or config.registry_address,
        read_consul_token(config.discovery.consul_token, config.discovery.consul_token_file),
        security,
    )
    catalog = ModelCatalog(registry)
    prompts = PromptTokenizers(registry)
    host = GrpcHost(config.max_message_bytes, role="router", serving_tls=config.tls.serving())
    readiness = _Readiness(host)
    pool = BackendPool(
        discovery, config.max_message_bytes, pool_config(config), KvIndex(),
        model_task=catalog.task, on_change=readiness.changed, security=security,
    )
    router_id = f"router-{uuid.uuid4().hex[:12]}"
    held = HeldSignals(discovery, router_id)
    hold = ColdStartHold(pool, catalog, held, config.cold_start_hold_s, config.max_held_per_model)
    limiter = InFlightLimiter(config.max_in_flight_per_model)
    # --metrics-port -1 turns Prometheus observation off (for measuring what it costs).
    forwarded = metrics.ForwardedRequests(enabled=metrics_port is not None)
    servicer = RoutingServicer(
        pool, catalog,
        Relay(pool, RetryBudget(config.retry_budget_ratio, config.retry_budget_min_per_s), config.max_migrations),
        limiter, prompts,
        tenant_key=config.tenant_metadata_key, session_key=config.session_metadata_key,
        served_models=config.served_models, forwarded=forwarded, hold=hold,
    )
    collector = metrics.RouterCollector(pool, limiter, forwarded) if forwarded.enabled else None
    if collector is not None:
        prometheus_client.REGISTRY.register(collector)
    readiness.servicer = servicer
    host.add_generic_handler(inference_handler(servicer), SERVICE)
    for handler, name in native_handlers(servicer):
        host.add_generic_handler(handler, name)
    port = await host.start(config.host, config.port)
    try:
        await catalog.refresh(force=True)
    except Exception as error:  # noqa: BLE001 - the registry may come later; lookups retry
        log.warning("router_catalog_unavailable", error=str(error))
    pool.start()
    refresher = asyncio.create_task(catalog.run())
    publishing_held = asyncio.create_task(held.run())
    registering = asyncio.create_task(_register(discovery, router_id, f"{config.host}:{port}", metrics_port,
                                                readiness.serving))
    log.info("router_listening", address=f"{config.host}:{port}", metrics_port=metrics_port,
             models=list(config.served_models), tls_mode=config.tls.tls_mode)
    if stop is None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
    synced = asyncio.create_task(pool.synced.wait())
    await asyncio.wait([synced, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if pool.synced.is_set():
        freeze_startup_objects()
        readiness.changed()
    watcher = asyncio.create_task(_load_tokenizers(pool, catalog, prompts))
    await stop.wait()
    log.info("router_draining", grace_s=config.drain_timeout_s)
    readiness.stopping = True
    await host.set_serving(False)
    await _deregister(registering)
    refresher.cancel()
    watcher.cancel()
    publishing_held.cancel()
    await host.stop(grace_s=config.drain_timeout_s)
    await pool.close()
    await registry.close()
    await discovery.close()
    if collector is not None:  # a caller may run another router in this process
        prometheus_client.REGISTRY.unregister(collector)
    log.info("router_stopped")


async def _register(discovery: Discovery, router_id: str, address: str, metrics_port: int | None,
                    healthy) -> Registration:
    """Register as service `router` (retrying while the registry is away); the registration keeps
    its lease alive from then on. On Consul its TTL check passes while the router is ready
    (`healthy`): not before it follows discovery, nor while it drains."""
    instance = discovery_pb2.Instance(
        instance_id=router_id, service="router", address=address,
        metadata={"metrics_port": str(metrics_port or "")},
    )
    attempt = 0
    while True:
        try:
            registration = await discovery.register(instance, LEASE_TTL_MS, healthy=healthy)
            log.info("router_registered", instance_id=instance.instance_id, address=address)
            return registration
        except DISCOVERY_ERRORS as error:
            if attempt == 0:
                log.warning("router_registration_failed", error=str(error))
            await asyncio.sleep(REGISTER_RETRY_S[min(attempt, len(REGISTER_RETRY_S) - 1)])
            attempt += 1


async def _deregister(registering: asyncio.Task) -> None:
    if not registering.done():
        registering.cancel()
        return
    if registering.exception() is None:
        await registering.result().stop()


class _Readiness:
    """Health follows servicer.ready(), re-checked whenever the routable replicas may have changed."""

    def __init__(self, host: GrpcHost):
        self.host = host
        self.servicer: RoutingServicer | None = None
        self.stopping = False
        self._serving: bool | None = None
        self._pending = False

    def serving(self) -> bool:
        return bool(self._serving)

    def changed(self) -> None:
        if not self._pending:
            self._pending = True
            asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(self._update()))

    async def _update(self) -> None:
        self._pending = False
        serving = not self.stopping and self.servicer is not None and self.servicer.ready()
        if serving != self._serving:
            self._serving = serving
            await self.host.set_serving(serving)
            log.info("router_ready" if serving else "router_not_ready",
                     waiting_for=self.servicer.models_without_replica() if self.servicer else [])


async def _load_tokenizers(pool: BackendPool, catalog: ModelCatalog, prompts: PromptTokenizers) -> None:
    """Load the prompt tokenizer of each generation model version as its replicas appear, so
    KV-aware routing has prompt blocks from the first requests on."""
    while True:
        for backend in pool.backends():
            if catalog.task(backend.model_name) is None:
                try:
                    await catalog.refresh()
                except Exception:  # noqa: BLE001 - the registry is away; next round
                    pass
            if catalog.task(backend.model_name) == "generation":
                prompts.get(backend.model_name, backend.model_version)
        await asyncio.sleep(0.5)
