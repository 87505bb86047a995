"""The registry process: model store, blob store and the embedded discovery service."""

from __future__ import annotations

import asyncio

from protos.tensoryard.v1 import discovery_pb2_grpc, registry_pb2_grpc
from services.common.admin_auth import read_admin_token
from services.common.gc_tuning import freeze_startup_objects
from services.common.config import RegistryConfig
from services.common.grpc_server import GrpcHost, install_signal_handlers
from services.common.telemetry import get_logger, start_metrics_server
from services.registry.blobs import BlobStore, LocalBlobStore
from services.registry.database import open_database
from services.registry.discovery import DiscoveryCatalog, new_instance_id
from services.registry.servicer import DiscoveryServicer, ModelRegistryServicer
from services.registry.store import ModelStore
from services.registry.uploads import UploadSpool
from services.rollout.guard import store_guard

log = get_logger(__name__)

LEASE_SWEEP_INTERVAL_S = 0.25


def open_blob_store(config: RegistryConfig) -> BlobStore:
    if not config.blob_store:
        return LocalBlobStore(config.data_dir / "blobs")
    from services.registry.s3_blobs import S3BlobStore

    return S3BlobStore(config.blob_store, config.data_dir / "s3-spool", config.s3_endpoint_url)


def open_store(config: RegistryConfig) -> tuple[ModelStore, BlobStore]:
    config.data_dir.mkdir(parents=True, exist_ok=True)
    blobs = open_blob_store(config)
    database = open_database(config.database_url, config.data_dir / "registry.sqlite3")
    return ModelStore(database, blobs), blobs


def check_store(store: ModelStore) -> None:
    """Sizes only (rehashing every blob would hold up the start by minutes); VerifyStore rehashes."""
    report = store.verify(rehash=False)
    for problem in report.problems:
        log.error("store_problem", problem=problem)
    log.info("store_checked", num_versions=report.num_versions, num_blobs=report.num_blobs,
             num_problems=len(report.problems), database=store.database.url, blobs=store.blobs.describe())


async def _expire_leases(catalog: DiscoveryCatalog) -> None:
    while True:
        await asyncio.sleep(LEASE_SWEEP_INTERVAL_S)
        for instance_id in catalog.expire():
            log.warning("lease_expired", instance_id=instance_id)


def _start_autoscaler(config: RegistryConfig, store: ModelStore, fleet, leader) -> asyncio.Task | None:
    """The autoscaler (services/autoscale/controller.py) when `autoscale_actuator` names one; it
    reads the workers discovery lists and the requests routers hold, publishes its decisions in the
    discovery KV, and acts only while `leader` gives it a fencing token."""
    if not config.autoscale.autoscale_actuator:
        return None
    from services.autoscale.controller import AutoscaleController, make_actuator
    from services.autoscale.signals import SignalReader, catalog_workers, held_reader
    from services.common.grpc_server import aio_channel

    security = config.tls.channel_security()  # workers' ports are TLS when the registry's is
    signals = SignalReader(catalog_workers(fleet), channel_for=lambda address: aio_channel(address, security=security),
                           held=held_reader(fleet))
    controller = AutoscaleController(
        config.autoscale, store.list_deployments, signals,
        make_actuator(config.autoscale, store, config.nomad),
        publish=fleet.kv_put, leader=leader,
    )
    return asyncio.create_task(controller.run())


def _fleet_and_leader(config: RegistryConfig, catalog: DiscoveryCatalog, instance_id: str):
    """The fleet view the controllers read (services/registry/fleet.py) and the autoscaler's leader
    lock: on Consul an elected one (services/autoscale/leader.py), else this registry alone."""
    from services.autoscale.leader import ConsulLeaderLock, SoleLeader
    from services.common.discovery_backends import consul_base_url, discovery_from_url, read_consul_token
    from services.registry.fleet import ConsulFleet, EmbeddedFleet

    url = config.discovery.discovery_url
    if not url or consul_base_url(url) is None:
        return EmbeddedFleet(catalog), SoleLeader()
    discovery = discovery_from_url(url, read_consul_token(config.discovery.consul_token,
                                                          config.discovery.consul_token_file))
    leader = ConsulLeaderLock(discovery.http, instance_id, ttl_s=config.autoscale.leader_ttl_s,
                              lock_delay_s=config.autoscale.leader_lock_delay_s)
    return ConsulFleet(discovery), leader


async def serve(config: RegistryConfig, stop: asyncio.Event | None = None) -> None:
    """Run the registry until SIGINT/SIGTERM (or until `stop` is set, for callers that run it in
    their own event loop)."""
    metrics_port = start_metrics_server(config.telemetry, config.host)
    store, blobs = open_store(config)
    await asyncio.to_thread(check_store, store)
    uploads = UploadSpool(config.data_dir / "uploads", blobs)
    catalog = DiscoveryCatalog()
    admin_token = read_admin_token(config.admin.admin_token, config.admin.admin_token_file)
    host = GrpcHost(role="registry", admin_token=admin_token, admin_tls=config.admin.admin_tls(config.tls),
                    serving_tls=config.tls.serving(config.admin.admin_subject_set))
    host.add_servicer(
        registry_pb2_grpc.add_ModelRegistryServicer_to_server,
        ModelRegistryServicer(store, blobs, uploads, admin_token),
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
    # Watches canaries through the routers' metrics and rolls back breaches (services/rollout/guard.py);
    # idle while no policy gives a canary a share. With several registries on one database each
    # runs one: the policy revision check lets only the first rollback through.
    fleet, leader = _fleet_and_leader(config, catalog, f"registry-{new_instance_id()}@{config.host}:{port}")
    fleet.start()
    guard = asyncio.create_task(store_guard(store, fleet).run())
    autoscaler = _start_autoscaler(config, store, fleet, leader)
    electing = asyncio.create_task(leader.run()) if autoscaler is not None else None
    log.info("registry_ready", address=f"{config.host}:{port}", metrics_port=metrics_port,
             admin_tls_port=host.admin_tls_port, tls_mode=config.tls.tls_mode,
             data_dir=str(config.data_dir))
    if stop is None:
        stop = asyncio.Event()
        install_signal_handlers(stop)
    await stop.wait()
    log.info("registry_stopping")
    sweeper.cancel()
    guard.cancel()
    if autoscaler is not None:
        autoscaler.cancel()
        electing.cancel()
        await leader.close()  # a clean stop hands the lock over at once
    await fleet.close()
    await host.stop(grace_s=2.0)
    store.close()
