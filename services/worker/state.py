"""What the worker is doing right now, shared by its servicers and its lifecycle."""

from __future__ import annotations

import contextlib
import enum
import random
import time
from dataclasses import dataclass, field

from protos.tensoryard.v1 import worker_pb2
from services.common.errors import TensoryardError, Unavailable
from services.worker.load_reports import LoadPublisher


class Phase(enum.StrEnum):
    LOADING = "LOADING"  # fetching files, loading weights, warming up: health NOT_SERVING
    SERVING = "SERVING"
    STALLED = "STALLED"  # the engine made no progress within its window: NOT_SERVING until it does
    DRAINING = "DRAINING"  # finishing in-flight work; new requests get UNAVAILABLE
    FAILED = "FAILED"  # the engine died: the process is leaving discovery and exiting


class InjectedFailure(TensoryardError):
    """A request failed on purpose (WorkerControl.InjectFault FAIL_REQUESTS): INTERNAL, as a broken
    model version's requests would end, so routers and the rollback guard count it as an error."""


@dataclass(frozen=True, slots=True)
class FailRequests:
    fraction: float  # share of requests to fail, 0-1
    until_s: float  # time.monotonic() at which the fault ends


@dataclass(slots=True)
class WorkerState:
    worker_id: str
    model_name: str
    # The served model (EmbeddingModel or GenerationModel); None while loading.
    model: object | None = None
    phase: Phase = Phase.LOADING
    num_in_flight: int = 0
    num_requests_ok: int = 0
    num_requests_failed: int = 0
    started_at_s: float = field(default_factory=time.time)
    # Wakes the StreamLoad subscribers (routers) on every change they should hear of at once.
    publisher: LoadPublisher = field(default_factory=LoadPublisher)
    tenant_metadata_key: str = "x-tenant-id"
    fault_injection: bool = False
    # Set by InjectFault FAIL_REQUESTS; None: no request is failed on purpose.
    failing: FailRequests | None = None

    @property
    def serving(self) -> bool:
        return self.phase is Phase.SERVING and self.model is not None

    def set_phase(self, phase: Phase) -> None:
        if phase is not self.phase:
            self.phase = phase
            self.publisher.publish()  # routers hear of a drain or a stall in the next report

    def check_accepting(self) -> None:
        if self.phase is Phase.DRAINING:
            raise Unavailable(f"worker {self.worker_id} is draining; send the request to another replica")
        if self.phase is Phase.FAILED:
            raise Unavailable(f"worker {self.worker_id}'s engine failed; send the request to another replica")
        if self.phase is Phase.STALLED:
            raise Unavailable(f"worker {self.worker_id}'s engine is not making progress; try another replica")
        if self.model is None:
            raise Unavailable(f"worker {self.worker_id} is still loading '{self.model_name}'")

    def fail_if_injected(self) -> None:
        """Fail this request on purpose while an InjectFault FAIL_REQUESTS lasts (its share of them)."""
        failing = self.failing
        if failing is not None and time.monotonic() < failing.until_s and random.random() < failing.fraction:
            self.num_requests_failed += 1
            raise InjectedFailure(f"worker {self.worker_id}: injected request failure (InjectFault FAIL_REQUESTS)")

    @contextlib.contextmanager
    def track_request(self):
        self.num_in_flight += 1
        try:
            yield
        except BaseException:
            self.num_requests_failed += 1
            raise
        else:
            self.num_requests_ok += 1
        finally:
            self.num_in_flight -= 1
            if self.model is not None and not self.model.reports_load:
                self.publisher.publish()  # models without an engine report: each request is the change

    def stats_proto(self) -> worker_pb2.WorkerStats:
        model = self.model
        return worker_pb2.WorkerStats(
            worker_id=self.worker_id,
            model_name=self.model_name,
            model_version=model.version if model else "",
            state=self.phase.value,
            queue_depth=model.queue_depth if model else 0,
            num_in_flight=self.num_in_flight,
            num_requests_ok=self.num_requests_ok,
            num_requests_failed=self.num_requests_failed,
            **(model.load_fields() if model else {}),
        )
