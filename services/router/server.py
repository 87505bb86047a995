"""The router process: the front door on :8001."""

from __future__ import annotations

import asyncio

# Imported for their descriptors: reflection describes every service the router serves.
from protos.inference import grpc_service_pb2  # noqa: F401
from protos.tensoryard.v1 import embeddings_pb2, generation_pb2  # noqa: F401
from services.common.gc_tuning import freeze_startup_objects
from services.common.config import RouterConfig
from services.common.discovery import DiscoveryClient
from services.common.grpc_server import GrpcHost, aio_channel, install_signal_handlers
from services.common.telemetry import get_logger, start_metrics_server
from services.router.catalog import ModelCatalog
from services.router.pool import BackendPool
from services.router.servicer import SERVICE, RoutingServicer, inference_handler, native_handlers

log = get_logger(__name__)


async def serve(config: RouterConfig) -> None:
    metrics_port = start_metrics_server(config.telemetry, config.host)
    registry = aio_channel(config.registry_address)
    pool = BackendPool(DiscoveryClient(registry), config.max_message_bytes)
    servicer = RoutingServicer(pool, ModelCatalog(registry))
    host = GrpcHost(config.max_message_bytes)
    host.add_generic_handler(inference_handler(servicer), SERVICE)
    for handler, name in native_handlers(servicer):
        host.add_generic_handler(handler, name)
    port = await host.start(config.host, config.port)
    pool.start()
    log.info("router_listening", address=f"{config.host}:{port}", metrics_port=metrics_port)
    stop = asyncio.Event()
    install_signal_handlers(stop)
    synced = asyncio.create_task(pool.synced.wait())
    await asyncio.wait([synced, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if pool.synced.is_set():
        freeze_startup_objects()
        await host.set_serving(True)
        log.info("router_ready", address=f"{config.host}:{port}")
    await stop.wait()
    log.info("router_stopping")
    await host.stop(grace_s=5.0)
    await pool.close()
    await registry.close()
