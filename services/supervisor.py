"""Run a set of child processes and keep them running.

Each process has a unique name, a role and a stop rank. A process that ends by itself (a crash,
`kill -9`, the OOM killer, any exit code) is started again after a backoff: `initial_backoff_s`,
multiplied by `backoff_multiplier` at each restart up to `max_backoff_s`; a run that lasted
`healthy_run_s` or more starts the next backoff from the beginning again, so a process that
served for hours and then crashed comes back at once rather than after its old backoff.

Giving up: exit codes listed in `give_up_exit_codes` say "starting again will fail the same way"
(the launcher lists 2: bad flags or config, 3: the model's files failed verification, 4: the model
failed to load: a restart fetches and loads the very same bytes). After
`max_give_up_exits_in_a_row` such exits in a row (any other exit resets the count) the process is
given up: reported with GAVE_UP and left stopped, while everything else keeps running. Every
other exit is restarted without limit: those causes usually pass (a registry that was down, an
operator's kill, memory pressure), and at one try per `max_backoff_s` at most a crash loop costs
little while it lasts.

Events (STARTED, EXITED, GAVE_UP, RESTARTING, STOPPED) go to one callback, from the supervisor's
monitor thread or from the thread that called `add` / `remove` / `stop_all`; it is never called
with the supervisor's lock held, so it may call back into the supervisor.

`remove` and `stop_all` send SIGTERM (the process drains and deregisters), wait up to a grace
period, then SIGKILL its whole process group. `stop_all` stops lower ranks first and waits for a
rank to be gone before the next (`tensoryard up`: workers, then the router, then the registry).
"""

from __future__ import annotations

import enum
import os
import signal
import subprocess
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_GRACE_S = 20.0


@dataclass(frozen=True, slots=True)
class ProcessSpec:
    name: str  # unique within one supervisor, e.g. "worker-all-MiniLM-L6-v2-1"
    role: str  # what it is, e.g. "worker", "router", "registry"
    argv: tuple[str, ...]
    log_path: Path  # stdout and stderr, appended to across restarts
    stop_rank: int = 0  # stop_all stops lower ranks first
    env: Mapping[str, str] | None = None  # None: the supervisor's own environment
    cwd: Path | None = None


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 30.0
    backoff_multiplier: float = 2.0
    # A run at least this long resets the backoff to initial_backoff_s.
    healthy_run_s: float = 10.0
    # Exit codes that mean a restart would fail the same way; see the module docstring.
    give_up_exit_codes: frozenset[int] = frozenset()
    max_give_up_exits_in_a_row: int = 3

    def __post_init__(self) -> None:
        if self.initial_backoff_s <= 0:
            raise ValueError(f"initial_backoff_s must be > 0, not {self.initial_backoff_s}")
        if self.max_backoff_s < self.initial_backoff_s:
            raise ValueError(f"max_backoff_s must be >= initial_backoff_s, not {self.max_backoff_s}")
        if self.backoff_multiplier < 1:
            raise ValueError(f"backoff_multiplier must be >= 1, not {self.backoff_multiplier}")
        if self.max_give_up_exits_in_a_row < 1:
            raise ValueError(f"max_give_up_exits_in_a_row must be >= 1, not {self.max_give_up_exits_in_a_row}")

    def next_backoff_s(self, previous_backoff_s: float | None, run_s: float) -> float:
        if previous_backoff_s is None or run_s >= self.healthy_run_s:
            return self.initial_backoff_s
        return min(previous_backoff_s * self.backoff_multiplier, self.max_backoff_s)


class EventKind(enum.Enum):
    STARTED = "started"  # a process started (the first time, or again after RESTARTING)
    EXITED = "exited"  # it ended by itself; restart_in_s says when it starts again (None: never)
    GAVE_UP = "gave_up"  # follows EXITED: the policy will not start it again
    RESTARTING = "restarting"  # its backoff is over; STARTED follows
    STOPPED = "stopped"  # ended because remove() or stop_all() asked it to


@dataclass(frozen=True, slots=True)
class ProcessEvent:
    kind: EventKind
    name: str
    role: str
    log_path: Path
    pid: int | None = None
    # Popen's convention: negative means killed by that signal (-9: SIGKILL).
    exit_code: int | None = None
    run_s: float | None = None  # how long the run that just ended lasted
    restart_in_s: float | None = None  # EXITED only; None when it will not be restarted
    num_restarts: int = 0

    @property
    def exit_description(self) -> str:
        """'code 3' or 'signal SIGKILL', as an operator would say it."""
        if self.exit_code is None:
            return "no exit code"
        if self.exit_code < 0:
            try:
                return f"signal {signal.Signals(-self.exit_code).name}"
            except ValueError:
                return f"signal {-self.exit_code}"
        return f"code {self.exit_code}"


class _State(enum.Enum):
    RUNNING = "running"
    BACKING_OFF = "backing_off"  # exited; starts again at restart_at_s
    ENDED = "ended"  # exited and will not be restarted (given up, or restarts off)
    STOPPING = "stopping"  # remove() / stop_all() owns it now; the monitor leaves it alone


@dataclass(slots=True)
class _Managed:
    spec: ProcessSpec
    process: subprocess.Popen
    state: _State = _State.RUNNING
    started_at_s: float = field(default_factory=time.monotonic)
    backoff_s: float | None = None  # the last backoff used; None before the first restart
    restart_at_s: float = 0.0
    num_give_up_exits_in_a_row: int = 0
    num_restarts: int = 0


class Supervisor:
    """Starts processes, restarts those that end by themselves, stops them in rank order."""

    def __init__(
        self,
        policy: RestartPolicy = RestartPolicy(),
        on_event: Callable[[ProcessEvent], None] = lambda event: None,
        restarting: bool = True,
        poll_interval_s: float = 0.1,
    ):
        self.policy = policy
        self._on_event = on_event
        self._restarting = restarting
        self._poll_interval_s = poll_interval_s
        self._managed: dict[str, _Managed] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._monitor = threading.Thread(target=self._monitor_loop, name="supervisor", daemon=True)
        self._monitor.start()

    def add(self, spec: ProcessSpec) -> int:
        """Start `spec` and keep it running; returns its pid. OSError if it cannot start at all."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the supervisor has been stopped")
            if spec.name in self._managed:
                raise ValueError(f"a process named {spec.name!r} is already supervised")
            managed = _Managed(spec, _spawn(spec))
            self._managed[spec.name] = managed
            event = self._event(EventKind.STARTED, managed, pid=managed.process.pid)
        self._emit([event])
        return managed.process.pid

    def remove(self, name: str, grace_s: float = DEFAULT_GRACE_S) -> int | None:
        """SIGTERM, up to `grace_s` to exit, then SIGKILL; returns its exit code (None if it
        never ran). KeyError for an unknown name."""
        with self._lock:
            managed = self._managed[name]
            was_running = managed.state is _State.RUNNING
            managed.state = _State.STOPPING
        if was_running:
            _terminate([managed.process], grace_s)
        with self._lock:
            self._managed.pop(name, None)
            event = self._event(EventKind.STOPPED, managed, exit_code=managed.process.returncode)
        self._emit([event])
        return managed.process.returncode

    def stop_all(self, grace_s: float = DEFAULT_GRACE_S) -> None:
        """Stop every process, lower ranks first, each rank given `grace_s`; the supervisor
        takes no new processes after this."""
        with self._lock:
            self._closed = True
            managed = list(self._managed.values())
            running = {m.spec.name for m in managed if m.state is _State.RUNNING}
            for m in managed:
                m.state = _State.STOPPING
        self._wake.set()
        if self._monitor is not threading.current_thread():
            self._monitor.join()
        for rank in sorted({m.spec.stop_rank for m in managed}):
            group = [m for m in managed if m.spec.stop_rank == rank]
            _terminate([m.process for m in group if m.spec.name in running], grace_s)
            with self._lock:
                events = [self._event(EventKind.STOPPED, m, exit_code=m.process.returncode) for m in group]
                for m in group:
                    self._managed.pop(m.spec.name, None)
            self._emit(events)

    def set_restarting(self, enabled: bool) -> None:
        """Off: a process that ends stays ended (EXITED with restart_in_s None). Turning it on
        does not revive those."""
        with self._lock:
            self._restarting = enabled

    def names(self, role: str | None = None) -> list[str]:
        with self._lock:
            return [name for name, m in self._managed.items() if role is None or m.spec.role == role]

    def pid(self, name: str) -> int | None:
        """The pid of its current run, None while it is not running."""
        with self._lock:
            managed = self._managed[name]
            return managed.process.pid if managed.state is _State.RUNNING else None

    def _monitor_loop(self) -> None:
        while True:
            with self._lock:
                if self._closed:
                    return
                now_s = time.monotonic()
                events = []
                for managed in self._managed.values():
                    if managed.state is _State.RUNNING and managed.process.poll() is not None:
                        events += self._exited(managed, now_s)
                    elif managed.state is _State.BACKING_OFF and now_s >= managed.restart_at_s:
                        events += self._restart(managed, now_s)
                wait_s = min(
                    [self._poll_interval_s]
                    + [m.restart_at_s - now_s for m in self._managed.values() if m.state is _State.BACKING_OFF]
                )
            self._emit(events)
            self._wake.wait(max(wait_s, 0.001))
            self._wake.clear()

    def _exited(self, managed: _Managed, now_s: float) -> list[ProcessEvent]:
        run_s = now_s - managed.started_at_s
        exit_code = managed.process.returncode
        if exit_code in self.policy.give_up_exit_codes:
            managed.num_give_up_exits_in_a_row += 1
        else:
            managed.num_give_up_exits_in_a_row = 0
        given_up = managed.num_give_up_exits_in_a_row >= self.policy.max_give_up_exits_in_a_row
        if given_up or not self._restarting:
            managed.state = _State.ENDED
            exited = self._event(EventKind.EXITED, managed, exit_code=exit_code, run_s=run_s)
            return [exited, self._event(EventKind.GAVE_UP, managed, exit_code=exit_code)] if given_up else [exited]
        managed.backoff_s = self.policy.next_backoff_s(managed.backoff_s, run_s)
        managed.restart_at_s = now_s + managed.backoff_s
        managed.state = _State.BACKING_OFF
        return [self._event(EventKind.EXITED, managed, exit_code=exit_code, run_s=run_s,
                            restart_in_s=managed.backoff_s)]

    def _restart(self, managed: _Managed, now_s: float) -> list[ProcessEvent]:
        events = [self._event(EventKind.RESTARTING, managed)]
        try:
            process = _spawn(managed.spec)
        except OSError:  # fork or exec failed (no memory, no file descriptors): try again later
            traceback.print_exc()
            managed.backoff_s = self.policy.next_backoff_s(managed.backoff_s, 0.0)
            managed.restart_at_s = now_s + managed.backoff_s
            return events
        managed.process = process
        managed.state = _State.RUNNING
        managed.started_at_s = now_s
        managed.num_restarts += 1
        return events + [self._event(EventKind.STARTED, managed, pid=process.pid)]

    def _event(self, kind: EventKind, managed: _Managed, **fields) -> ProcessEvent:
        return ProcessEvent(kind, managed.spec.name, managed.spec.role, managed.spec.log_path,
                            num_restarts=managed.num_restarts, **fields)

    def _emit(self, events: list[ProcessEvent]) -> None:
        for event in events:
            try:
                self._on_event(event)
            except Exception:  # noqa: BLE001 - a faulty callback must not end supervision
                traceback.print_exc()


def _spawn(spec: ProcessSpec) -> subprocess.Popen:
    spec.log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(spec.log_path, "ab") as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            spec.argv,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(spec.env) if spec.env is not None else None,
            cwd=spec.cwd,
            # Own process group: a Ctrl-C at the terminal reaches the supervising process only,
            # which stops children in rank order; and SIGKILL can take the child's whole group.
            start_new_session=True,
        )


def _terminate(processes: list[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to all at once, then wait for them together: one grace period for the group."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline_s = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(deadline_s - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
