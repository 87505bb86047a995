"""The local deployment controller: `tensoryard up`'s workers follow the registry's deployments.

Every second it reads the desired replicas per (model, version) (ListDeployments) and compares
them with the workers running under up's supervisor: `plan` (pure, unit-tested) says which to
start and which to stop, and the launcher's callbacks do it. Workers `up` started for its demo
models count as replicas of their version (the launcher records their deployment first, and
runs no controller when it cannot). A (model, version) the registry lists no deployment for wants
0 replicas (the registry deletes a deployment set to 0). A registry that does not answer changes
nothing: workers are never stopped because the registry is away.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc

from protos.tensoryard.v1 import registry_pb2, registry_pb2_grpc
from services.common.telemetry import get_logger

log = get_logger(__name__)

Key = tuple[str, int]  # (model, version)
POLL_INTERVAL_S = 1.0


@dataclass(frozen=True, slots=True)
class Plan:
    start: list[Key]  # one entry per replica to add
    stop: list[str]  # worker names

    @property
    def empty(self) -> bool:
        return not self.start and not self.stop


def plan(desired: Mapping[Key, int], running: Mapping[Key, list[str]]) -> Plan:
    """What makes `running` (worker names per version, oldest first) match `desired`. Scaling
    down stops the newest workers first, so up's own demo workers are the last to go."""
    start: list[Key] = []
    stop: list[str] = []
    for key in sorted(set(desired) | set(running)):
        replicas = desired.get(key, 0)
        names = list(running.get(key, ()))
        if len(names) < replicas:
            start += [key] * (replicas - len(names))
        elif len(names) > replicas:
            stop += list(reversed(names))[: len(names) - replicas]
    return Plan(start, stop)


class LocalDeploymentController:
    """A daemon thread: poll, plan, act. `running()` and the callbacks are the launcher's."""

    def __init__(self, registry: grpc.Channel, running: Callable[[], dict[Key, list[str]]],
                 start_worker: Callable[[str, int], None], stop_worker: Callable[[str], None],
                 interval_s: float = POLL_INTERVAL_S):
        self._stub = registry_pb2_grpc.ModelRegistryStub(registry)
        self._running = running
        self._start_worker = start_worker
        self._stop_worker = stop_worker
        self._interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="deployment-controller", daemon=True)
        self._warned: str | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    def desired(self) -> dict[Key, int] | None:
        """The registry's deployments, or None when it does not answer."""
        try:
            reply = self._stub.ListDeployments(registry_pb2.ListDeploymentsRequest(), timeout=5)
        except grpc.RpcError as error:
            if self._warned != error.code().name:  # once per kind of failure, not every second
                self._warned = error.code().name
                log.warning("deployments_unreadable", code=error.code().name, details=error.details())
            return None
        self._warned = None
        return {(d.model_name, d.version): d.replicas for d in reply.deployments}

    def step(self) -> Plan:
        desired = self.desired()
        if desired is None:
            return Plan([], [])
        actions = plan(desired, self._running())
        for model_name, version in actions.start:
            if self._stopped.is_set():
                break
            log.info("deployment_start_worker", model=model_name, version=version)
            self._start_worker(model_name, version)
        for name in actions.stop:
            if self._stopped.is_set():
                break
            log.info("deployment_stop_worker", worker=name)
            self._stop_worker(name)
        return actions

    def report_worker_exit(self, model_name: str, version: int, worker: str, how: str, log_path: str) -> None:
        """A worker of a deployment exited (while loading, or later): on the audit log as
        `deployment.failed`, where a promote waiting for the version's replica reads it and stops
        waiting. Best effort: a registry that does not answer misses the entry, and the promote
        falls back to its timeout."""
        details = {"worker": worker, "exit": how, "log": log_path}
        try:
            self._stub.AppendAudit(registry_pb2.AppendAuditRequest(
                action="deployment.failed", model_name=model_name, version=version,
                details_json=json.dumps(details, sort_keys=True)), timeout=5)
        except grpc.RpcError as error:
            log.warning("deployment_failure_unreported", model=model_name, version=version, code=error.code().name)

    def _loop(self) -> None:
        while not self._stopped.wait(self._interval_s):
            try:
                self.step()
            except Exception:
                log.exception("deployment_controller_failed")
