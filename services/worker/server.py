"""The worker process: one model version, from registry to ready, and back out on SIGTERM.

Order matters and is what health reports:
1. the gRPC server starts at once with health NOT_SERVING (so probes get an answer while loading);
2. the model's files are fetched and each sha256 verified (a mismatch ends the process, exit 3);
3. weights load from safetensors and the model warms up;
4. health turns SERVING and only then does the worker register in discovery;
5. on SIGTERM / SIGINT: NOT_SERVING and deregister first (routers stop sending; the load stream tells
   them at once), refuse new work, let in-flight requests finish within the grace period
   (`drain_timeout_s`), then cut off what is left with UNAVAILABLE — a router resumes each such
   generation on another replica — and stop.

Honest health. An LLM worker is SERVING only while its engine makes progress: the engine reports
after each step and every heartbeat when idle; with no report for `progress_timeout_s` the worker
turns NOT_SERVING (state STALLED, and routers route around it) until reports resume. An engine that
fails (its step raised) ends the process: NOT_SERVING, deregistered, in-flight requests end
UNAVAILABLE (routers resume them elsewhere), exit code 5, and the supervisor starts a new one.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import prometheus_client
from protos.inference import grpc_service_pb2_grpc
from protos.tensoryard.v1 import discovery_pb2, embeddings_pb2_grpc, generation_pb2_grpc, worker_pb2_grpc
from services.common.admin_auth import read_admin_token
from services.common.gc_tuning import freeze_startup_objects
from services.common.config import WorkerConfig
from services.common.discovery_backends import Registration, discovery_from_url, read_consul_token
from services.common.errors import IntegrityError
from services.common.grpc_server import GrpcHost, aio_channel, install_signal_handlers
from services.common.telemetry import get_logger, start_metrics_server
from services.worker.generation_model import GenerationModel
from services.worker.gpu_metrics import NvmlCollector
from services.worker.llm_metrics import LLMMetrics
from services.worker.loading import load_model, warm_up
from services.worker.malloc_tuning import keep_freed_memory
from services.worker.metrics import WorkerCollector
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
EXIT_ENGINE_FAILED = 5
# After the drain cut off the generations left, how long they get to end before the server stops.
CUT_OFF_GRACE_S = 0.5


class Worker:
    def __init__(self, config: WorkerConfig):
        self.config = config
        self.state = WorkerState(
            worker_id=uuid.uuid4().hex[:12], model_name=config.model_name,
            tenant_metadata_key=config.tenant_metadata_key, fault_injection=config.enable_fault_injection,
        )
        self.host = GrpcHost(
            config.max_message_bytes, role="worker", instance_id=self.state.worker_id,
            admin_token=read_admin_token(config.admin.admin_token, config.admin.admin_token_file),
            admin_tls=config.admin.admin_tls(config.tls),
            serving_tls=config.tls.serving(config.admin.admin_subject_set),
        )
        self.registration: Registration | None = None
        self.stopped = asyncio.Event()
        self.exit_code = 0

    @property
    def observing(self) -> bool:
        """Prometheus observation is on unless --metrics-port -1 (ModelStatistics counts regardless)."""
        return self.config.telemetry.metrics_port >= 0

    async def run(self) -> int:
        metrics_port = start_metrics_server(self.config.telemetry, self.config.host)
        if self.observing:
            prometheus_client.REGISTRY.register(WorkerCollector(self.state, NvmlCollector.create(self.config.device)))
        self._add_services()
        port = await self.host.start(self.config.host, self.config.port)
        address = f"{self.config.host}:{port}"
        log.info("worker_listening", address=address, metrics_port=metrics_port, model=self.config.model_name,
                 admin_tls_port=self.host.admin_tls_port, tls_mode=self.config.tls.tls_mode)
        install_signal_handlers(self.stopped)
        security = self.config.tls.channel_security()
        registry = aio_channel(self.config.registry_address, security=security)
        discovery_config = self.config.discovery
        discovery = discovery_from_url(
            discovery_config.discovery_url or self.config.registry_address,
            read_consul_token(discovery_config.consul_token, discovery_config.consul_token_file),
            security,
        )
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
        self.registration = await discovery.register(
            discovery_pb2.Instance(
                instance_id=self.state.worker_id,
                service="worker",
                address=address,
                model_name=self.state.model.name,
                model_version=self.state.model.version,
                metadata={"metrics_port": str(metrics_port or ""), "platform": self.state.model.platform,
                          "pid": str(os.getpid())},
            ),
            self.config.lease_ttl_ms,
            # Consul's TTL check passes only while this holds: SERVING, which an engine that stops
            # making progress leaves (STALLED) as its gRPC health turns NOT_SERVING.
            healthy=lambda: self.state.serving,
        )
        log.info("worker_ready", address=address, model=self.state.model.name, version=self.state.model.version)
        watchdog = self._watch_engine()
        await self.stopped.wait()
        if self.exit_code == 0:
            await self.drain(self.config.drain_timeout_s)
        if watchdog is not None:
            watchdog.cancel()
        await self.host.stop(grace_s=CUT_OFF_GRACE_S)
        await registry.close()
        await discovery.close()
        log.info("worker_stopped", exit_code=self.exit_code)
        return self.exit_code

    def _watch_engine(self) -> asyncio.Task | None:
        """For an LLM: follow the engine's progress (health) and its failure (exit)."""
        model = self.state.model
        if not isinstance(model, GenerationModel):
            return None
        event_loop = asyncio.get_running_loop()
        model.start_serving(event_loop)
        model.loop.on_stop(lambda error: event_loop.call_soon_threadsafe(self._engine_stopped, error))
        return asyncio.create_task(self._watch_progress(model))

    async def _watch_progress(self, model: GenerationModel) -> None:
        timeout_s = self.config.progress_timeout_s
        while True:
            await asyncio.sleep(min(0.1, timeout_s / 10))
            silent_s = time.monotonic() - model.loop.last_progress_s
            if silent_s > timeout_s and self.state.phase is Phase.SERVING:
                log.warning("engine_stalled", silent_s=round(silent_s, 2), timeout_s=timeout_s)
                self.state.set_phase(Phase.STALLED)
                await self.host.set_serving(False)
            elif silent_s <= timeout_s and self.state.phase is Phase.STALLED:
                log.info("engine_progressing_again")
                self.state.set_phase(Phase.SERVING)
                await self.host.set_serving(True)

    def _engine_stopped(self, error) -> None:
        if error is None or self.state.phase in (Phase.DRAINING, Phase.FAILED):
            return  # a shutdown we asked for
        log.error("engine_failed", error=error.message)
        self.state.set_phase(Phase.FAILED)
        self.exit_code = EXIT_ENGINE_FAILED
        asyncio.get_running_loop().create_task(self._leave_after_failure())

    async def _leave_after_failure(self) -> None:
        await self.host.set_serving(False)
        if self.registration is not None:
            await self.registration.stop()
        self.stopped.set()

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
            model = await asyncio.to_thread(load_model, fetched, self.config, self.state.publisher)
            await asyncio.to_thread(warm_up, model, self.config.warmup_batches)
            if isinstance(model, GenerationModel) and self.observing:  # after warm-up: it is not traffic
                model.metrics = LLMMetrics(model.name, model.version, self.state.worker_id, model.max_model_len)
        except Exception as error:  # noqa: BLE001 - any load failure ends this worker, loudly
            log.error("model_load_failed", error=str(error), exc_info=error)
            return EXIT_LOAD_FAILED
        self.state.model = model
        self.state.set_phase(Phase.SERVING)
        freeze_startup_objects()
        await self.host.set_serving(True)
        return 0

    async def drain(self, timeout_s: float | None) -> int:
        """NOT_SERVING, deregister, refuse new work, give in-flight requests the grace period, then
        cut off what is left; returns how many finished within the grace period."""
        if self.state.phase in (Phase.DRAINING, Phase.FAILED):
            return 0
        self.state.set_phase(Phase.DRAINING)
        await self.host.set_serving(False)
        if self.registration is not None:
            await self.registration.stop()
        num_in_flight = self.state.num_in_flight
        finished_before = self.state.num_requests_ok + self.state.num_requests_failed
        clock = asyncio.get_running_loop().time
        deadline = clock() + (timeout_s if timeout_s is not None else self.config.drain_timeout_s)
        while self.state.num_in_flight and clock() < deadline:
            await asyncio.sleep(0.01)
        finished = self.state.num_requests_ok + self.state.num_requests_failed - finished_before
        num_cut_off = 0
        model = self.state.model
        if self.state.num_in_flight and isinstance(model, GenerationModel):
            num_cut_off = model.cut_off(f"worker {self.state.worker_id} drained; continue on another replica")
            cut_off_deadline = clock() + CUT_OFF_GRACE_S
            while self.state.num_in_flight and clock() < cut_off_deadline:
                await asyncio.sleep(0.01)
        if model is not None:
            await asyncio.to_thread(model.close)
        log.info("worker_drained", in_flight_at_start=num_in_flight, finished=finished, cut_off=num_cut_off)
        self.stopped.set()
        return finished


async def serve(config: WorkerConfig) -> int:
    keep_freed_memory()  # before the model loads: its allocations follow the new settings
    return await Worker(config).run()
