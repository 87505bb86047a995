"""The registry process: model store, blob store and the embedded discovery service."""

from __future__ import annotations

import asyncio

from protos.tensoryard.v1 import discovery_pb2_grpc, registry_pb2_grpc
from services.common.admin_auth import read_admin_token
from services.common.gc_tuning import freeze_startup_objects
from services.common.config import RegistryConfig
from services.common.grpc_server import GrpcHost, install_signal_handlers
from services.common.telemetry import get_logger, start_metrics_server
from services.registry.blobs import BlobStore
from services.registry.discovery import DiscoveryCatalog
from services.registry.servicer import DiscoveryServicer, ModelRegistryServicer
from services.registry.store import ModelStore

log = get_logger(__name__)

LEASE_SWEEP_INTERVAL_S = 0.25


def open_store(config: RegistryConfig) -> tuple[ModelStore, BlobStore]:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    blobs = BlobStore(config.data_dir / "blobs")
    return ModelStore(config.data_dir / "registry.sqlite3", blobs), blobs


async def _expire_leases(catalog: DiscoveryCatalog) -> None:
    while True:
        await asyncio.sleep(LEASE_SWEEP_INTERVAL_S)
        for instance_id in catalog.expire():
            log.warning("lease_expired", instance_id=instance_id)


async def serve(config: RegistryConfig, stop: asyncio.Event | None = None) -> None:
    """Run the registry until SIGINT/SIGTERM (or until `stop` is set, for callers that run it in
    their own event loop)."""
    metrics_port = start_metrics_server(config.telemetry, config.host)
    store, blobs = open_store(config)
    catalog = DiscoveryCatalog()
    host = GrpcHost(role="registry", admin_token=read_admin_token(
        config.admin.admin_token, config.admin.admin_token_file))
    host.add_servicer(
        registry_pb2_grpc.add_ModelRegistryServicer_to_server,
        ModelRegistryServicer(store, blobs),
        "tensoryard.v1.ModelRegistry",
    )
    host.add_servicer(
        discovery_pb2_grpc.add_DiscoveryServicer_to_server,
        DiscoveryServicer(catalog, config.default_lease_ttl_ms),
        "tensoryard.v1.Discovery",
    )
    port = await host.start(config.host, config.port)
    freeze_startup_objects()
    await host.set_serving(True)
    sweeper = asyncio.create_task(_expire_leases(catalog))
    log.info("registry_ready", address=f"{config.host}:{port}", metrics_port=metrics_port,
             data_dir=str(config.data_dir))
    if stop is None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
    await stop.wait()
    log.info("registry_stopping")
    sweeper.cancel()
    await host.stop(grace_s=2.0)
