"""The worker process: one model version, from registry to ready, and back out on SIGTERM.

Order matters and is what health reports:
1. the gRPC server starts at once with health NOT_SERVING (so probes get an answer while loading);
2. the model's files are fetched and each sha256 verified (a mismatch ends the process, exit 3);
3. weights load from safetensors and the model warms up;
4. health turns SERVING and only then does the worker register in discovery;
5. on SIGTERM / SIGINT: deregister first (routers stop sending), refuse new work, finish what is in
   flight, stop.
"""

from __future__ import annotations

import asyncio
import uuid

from protos.inference import grpc_service_pb2_grpc
from protos.tensoryard.v1 import discovery_pb2, embeddings_pb2_grpc, generation_pb2_grpc, worker_pb2_grpc
from services.common.gc_tuning import freeze_startup_objects
from services.common.config import WorkerConfig
from services.common.discovery import DiscoveryClient, Registration
from services.common.errors import IntegrityError
from services.common.grpc_server import GrpcHost, aio_channel, install_signal_handlers
from services.common.telemetry import get_logger, start_metrics_server
from services.worker.loading import load_model, warm_up
from services.worker.malloc_tuning import keep_freed_memory
from services.worker.model_files import fetch_version
from services.worker.servicer import (
    EmbeddingsServicer,
    InferenceServicer,
    TextGenerationServicer,
    WorkerControlServicer,
)
from services.worker.state import Phase, WorkerState

log = get_logger(__name__)

EXIT_INTEGRITY = 3
EXIT_LOAD_FAILED = 4


class Worker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.state = WorkerState(worker_id=uuid.uuid4().hex[:12], model_name=config.model_name)
        self.host = GrpcHost()
        self.registration: Registration | None = None
        self.stopped = asyncio.Event()

    async def run(self) -> int:
        metrics_port = start_metrics_server(self.config.telemetry, self.config.host)
        self._add_services()
        port = await self.host.start(self.config.host, self.config.port)
        address = f"{self.config.host}:{port}"
        log.info("worker_listening", address=address, metrics_port=metrics_port, model=self.config.model_name)
        install_signal_handlers(self.stopped)
        registry = aio_channel(self.config.registry_address)
        loading = asyncio.create_task(self._load(registry))
        await asyncio.wait([loading, asyncio.create_task(self.stopped.wait())], return_when=asyncio.FIRST_COMPLETED)
        if not loading.done():  # stopped while loading
            loading.cancel()
            await self.host.stop(grace_s=0)
            return 0
        exit_code = loading.result()
        if exit_code:
            await self.host.stop(grace_s=0)
            return exit_code
        self.registration = await DiscoveryClient(registry).register(
            discovery_pb2.Instance(
                instance_id=self.state.worker_id,
                service="worker",
                address=address,
                model_name=self.state.model.name,
                model_version=self.state.model.version,
                metadata={"metrics_port": str(metrics_port or ""), "platform": self.state.model.platform},
            ),
            self.config.lease_ttl_ms,
        )
        log.info("worker_ready", address=address, model=self.state.model.name, version=self.state.model.version)
        await self.stopped.wait()
        await self.drain(self.config.drain_timeout_s)
        await self.host.stop(grace_s=1.0)
        await registry.close()
        log.info("worker_stopped")
        return 0

    def _add_services(self) -> None:
        self.host.add_servicer(
            grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server,
            InferenceServicer(self.state),
            "inference.GRPCInferenceService",
        )
        self.host.add_servicer(
            embeddings_pb2_grpc.add_EmbeddingsServicer_to_server,
            EmbeddingsServicer(self.state),
            "tensoryard.v1.Embeddings",
        )
        self.host.add_servicer(
            generation_pb2_grpc.add_TextGenerationServicer_to_server,
            TextGenerationServicer(self.state),
            "tensoryard.v1.TextGeneration",
        )
        self.host.add_servicer(
            worker_pb2_grpc.add_WorkerControlServicer_to_server,
            WorkerControlServicer(self.state, self.drain),
            "tensoryard.v1.WorkerControl",
        )

    async def _load(self, registry) -> int:
        try:
            fetched = await fetch_version(
                registry, self.config.model_name, self.config.model_version, self.config.cache_dir
            )
        except IntegrityError as error:
            log.error("model_files_rejected", error=error.message)
            return EXIT_INTEGRITY
        try:
            model = await asyncio.to_thread(load_model, fetched, self.config)
            await asyncio.to_thread(warm_up, model, self.config.warmup_batches)
        except Exception as error:  # noqa: BLE001 - any load failure ends this worker, loudly
            log.error("model_load_failed", error=str(error), exc_info=error)
            return EXIT_LOAD_FAILED
        self.state.model = model
        self.state.phase = Phase.SERVING
        freeze_startup_objects()
        await self.host.set_serving(True)
        return 0

    async def drain(self, timeout_s: float | None) -> int:
        """Deregister, refuse new work, wait for in-flight requests; returns how many finished."""
        if self.state.phase is Phase.DRAINING:
            return 0
        self.state.phase = Phase.DRAINING
        await self.host.set_serving(False)
        if self.registration is not None:
            await self.registration.stop()
        num_in_flight = self.state.num_in_flight
        finished_before = self.state.num_requests_ok + self.state.num_requests_failed
        deadline = asyncio.get_running_loop().time() + (timeout_s or self.config.drain_timeout_s)
        while self.state.num_in_flight and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        if self.state.model is not None:
            await asyncio.to_thread(self.state.model.close)
        finished = self.state.num_requests_ok + self.state.num_requests_failed - finished_before
        log.info("worker_drained", in_flight_at_start=num_in_flight, finished=finished)
        self.stopped.set()
        return finished


async def serve(config: WorkerConfig) -> int:
    keep_freed_memory()  # before the model loads: its allocations follow the new settings
    return await Worker(config).run()
