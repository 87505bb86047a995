"""The Supervisor with tiny real child processes: restarts with backoff, removal, stop order, giving up."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from services.supervisor import EventKind, ProcessEvent, ProcessSpec, RestartPolicy, Supervisor

# Backoffs short enough for a test, in the same shape as the defaults (0.5 s doubling to 30 s).
FAST = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.2, backoff_multiplier=2.0, healthy_run_s=0.6)


class Events:
    """Collects a supervisor's events; waits until a condition on them holds."""

    def __init__(self):
        self.events: list[ProcessEvent] = []
        self._changed = threading.Condition()

    def __call__(self, event: ProcessEvent) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def of(self, kind: EventKind, name: str | None = None) -> list[ProcessEvent]:
        with self._changed:
            return [e for e in self.events if e.kind is kind and (name is None or e.name == name)]

    def wait_for(self, kind: EventKind, count: int = 1, name: str | None = None, timeout_s: float = 10) -> list[ProcessEvent]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.of(kind, name)) < count:
                left_s = deadline - time.monotonic()
                if left_s <= 0:
                    raise AssertionError(f"timed out waiting for {count} {kind.name}; saw {self.events}")
                self._changed.wait(left_s)
            return self.of(kind, name)


def python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-I", "-S", "-c", code)  # -S: no site imports, ~20 ms a start


def spec(tmp_path: Path, name: str, code: str, stop_rank: int = 0, role: str = "worker") -> ProcessSpec:
    return ProcessSpec(name=name, role=role, argv=python(code), log_path=tmp_path / f"{name}.log",
                       stop_rank=stop_rank)


def ready_marker_code(marker: Path, body: str) -> str:
    """Run `body` (which sets up signal handlers), write `marker`, then sleep until signalled."""
    return (f"import signal, sys, time\n{body}\n"
            f"open({str(marker)!r}, 'w').close()\n"
            "while True: time.sleep(1)\n")


def wait_for_file(path: Path, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.fixture
def events():
    return Events()


@pytest.fixture
def supervisors():
    """Supervisors made by a test; whatever they still run is stopped at the end."""
    made: list[Supervisor] = []
    yield made
    for supervisor in made:
        supervisor.stop_all(grace_s=1)


def new_supervisor(supervisors, events, policy=FAST, **kwargs) -> Supervisor:
    supervisor = Supervisor(policy, events, **kwargs)
    supervisors.append(supervisor)
    return supervisor


def test_restarts_a_process_that_exits_with_growing_backoff(tmp_path, events, supervisors):
    supervisor = new_supervisor(supervisors, events)
    supervisor.add(spec(tmp_path, "crasher", "raise SystemExit(1)"))
    exits = events.wait_for(EventKind.EXITED, 4)
    assert [e.restart_in_s for e in exits[:4]] == [0.05, 0.1, 0.2, 0.2]  # doubles, then capped
    assert all(e.exit_code == 1 and e.exit_description == "code 1" for e in exits)
    starts = events.wait_for(EventKind.STARTED, 4)
    assert [s.num_restarts for s in starts[:4]] == [0, 1, 2, 3]
    assert len({s.pid for s in starts}) == len(starts)
    assert len(events.of(EventKind.RESTARTING)) >= 3


def test_waits_the_backoff_before_starting_again(tmp_path, events, supervisors):
    slow = RestartPolicy(initial_backoff_s=0.5, max_backoff_s=0.5, healthy_run_s=10)
    supervisor = new_supervisor(supervisors, events, policy=slow)
    supervisor.add(spec(tmp_path, "crasher", "raise SystemExit(1)"))
    exited = events.wait_for(EventKind.EXITED)[0]
    exited_at_s = time.monotonic()
    events.wait_for(EventKind.STARTED, 2)
    assert exited.restart_in_s == 0.5
    assert time.monotonic() - exited_at_s >= 0.45


def test_backoff_starts_over_after_a_healthy_run(tmp_path, events, supervisors):
    supervisor = new_supervisor(supervisors, events)
    # Each run lasts past healthy_run_s (0.6 s), so no restart waits longer than the first.
    supervisor.add(spec(tmp_path, "long-runner", "import time; time.sleep(0.7); raise SystemExit(1)"))
    exits = events.wait_for(EventKind.EXITED, 3)
    assert [e.restart_in_s for e in exits] == [0.05, 0.05, 0.05]
    assert all(e.run_s >= 0.6 for e in exits)


def test_a_killed_process_is_reported_with_its_signal_and_restarted(tmp_path, events, supervisors):
    supervisor = new_supervisor(supervisors, events)
    pid = supervisor.add(spec(tmp_path, "victim", "import time; time.sleep(60)"))
    os.kill(pid, signal.SIGKILL)
    exited = events.wait_for(EventKind.EXITED)[0]
    assert exited.exit_code == -signal.SIGKILL and exited.exit_description == "signal SIGKILL"
    restarted = events.wait_for(EventKind.STARTED, 2)[1]
    assert restarted.pid != pid and restarted.num_restarts == 1
    assert supervisor.pid("victim") == restarted.pid


def test_remove_sends_sigterm_then_sigkill_after_the_grace_period(tmp_path, events, supervisors):
    supervisor = new_supervisor(supervisors, events)
    marker = tmp_path / "ignoring"
    supervisor.add(spec(tmp_path, "stubborn", ready_marker_code(
        marker, "signal.signal(signal.SIGTERM, signal.SIG_IGN)")))
    wait_for_file(marker)
    started_s = time.monotonic()
    exit_code = supervisor.remove("stubborn", grace_s=0.5)
    took_s = time.monotonic() - started_s
    assert exit_code == -signal.SIGKILL
    assert 0.5 <= took_s < 3
    assert [e.exit_code for e in events.of(EventKind.STOPPED)] == [-signal.SIGKILL]
    assert supervisor.names() == []
    time.sleep(0.2)  # a removed process is not restarted
    assert len(events.of(EventKind.STARTED)) == 1 and not events.of(EventKind.EXITED)


def test_remove_of_a_process_that_honours_sigterm_does_not_wait_the_grace_period(tmp_path, events, supervisors):
    supervisor = new_supervisor(supervisors, events)
    supervisor.add(spec(tmp_path, "polite", "import time; time.sleep(60)"))
    started_s = time.monotonic()
    assert supervisor.remove("polite", grace_s=10) == -signal.SIGTERM
    assert time.monotonic() - started_s < 2


def test_processes_can_be_added_and_removed_while_others_run(tmp_path, events, supervisors):
    supervisor = new_supervisor(supervisors, events)
    supervisor.add(spec(tmp_path, "worker-0", "import time; time.sleep(60)"))
    supervisor.add(spec(tmp_path, "worker-1", "import time; time.sleep(60)"))
    supervisor.add(spec(tmp_path, "router", "import time; time.sleep(60)", role="router"))
    supervisor.remove("worker-0", grace_s=1)
    assert supervisor.names(role="worker") == ["worker-1"]
    assert supervisor.pid("worker-1") is not None
    with pytest.raises(ValueError, match="already supervised"):
        supervisor.add(spec(tmp_path, "router", "pass", role="router"))


def test_stop_all_stops_lower_ranks_first(tmp_path, events, supervisors):
    supervisor = new_supervisor(supervisors, events)
    order_file = tmp_path / "order"
    for name, rank in (("registry", 2), ("worker-a", 0), ("router", 1), ("worker-b", 0)):
        marker = tmp_path / f"{name}.ready"
        # On SIGTERM: record its name, linger a little (as a draining worker does), exit.
        on_term = (f"def on_term(*_):\n    open({str(order_file)!r}, 'a').write({name!r} + '\\n')\n"
                   "    time.sleep(0.1)\n    sys.exit(0)\n"
                   "signal.signal(signal.SIGTERM, on_term)")
        supervisor.add(spec(tmp_path, name, ready_marker_code(marker, on_term), stop_rank=rank))
        wait_for_file(marker)
    supervisor.stop_all(grace_s=5)
    order = order_file.read_text().split()
    assert sorted(order[:2]) == ["worker-a", "worker-b"]
    assert order[2:] == ["router", "registry"]
    assert [e.name for e in events.of(EventKind.STOPPED)][2:] == ["router", "registry"]
    assert all(e.exit_code == 0 for e in events.of(EventKind.STOPPED))
    with pytest.raises(RuntimeError):
        supervisor.add(spec(tmp_path, "late", "pass"))


def test_gives_up_after_repeated_give_up_exit_codes_and_keeps_the_rest(tmp_path, events, supervisors):
    policy = RestartPolicy(initial_backoff_s=0.05, max_backoff_s=0.1, give_up_exit_codes=frozenset({3}),
                           max_give_up_exits_in_a_row=3)
    supervisor = new_supervisor(supervisors, events, policy=policy)
    supervisor.add(spec(tmp_path, "bad-files", "raise SystemExit(3)"))
    supervisor.add(spec(tmp_path, "healthy", "import time; time.sleep(60)"))
    gave_up = events.wait_for(EventKind.GAVE_UP)
    exits = events.of(EventKind.EXITED, "bad-files")
    assert [e.restart_in_s is None for e in exits] == [False, False, True]
    assert gave_up[0].name == "bad-files" and gave_up[0].exit_description == "code 3"
    time.sleep(0.3)  # nothing starts it again
    assert len(events.of(EventKind.STARTED, "bad-files")) == 3
    assert supervisor.pid("bad-files") is None
    assert supervisor.pid("healthy") is not None


def test_other_exit_codes_are_restarted_without_limit(tmp_path, events, supervisors):
    policy = RestartPolicy(initial_backoff_s=0.02, max_backoff_s=0.02, give_up_exit_codes=frozenset({3}),
                           max_give_up_exits_in_a_row=2)
    supervisor = new_supervisor(supervisors, events, policy=policy)
    supervisor.add(spec(tmp_path, "flaky", "raise SystemExit(1)"))
    exits = events.wait_for(EventKind.EXITED, 4)
    assert all(e.restart_in_s is not None for e in exits)
    assert not events.of(EventKind.GAVE_UP)


def test_with_restarts_off_an_exit_ends_the_process(tmp_path, events, supervisors):
    supervisor = new_supervisor(supervisors, events, restarting=False)
    supervisor.add(spec(tmp_path, "once", "raise SystemExit(7)"))
    exited = events.wait_for(EventKind.EXITED)[0]
    assert exited.restart_in_s is None and exited.exit_code == 7
    time.sleep(0.2)
    assert len(events.of(EventKind.STARTED)) == 1 and not events.of(EventKind.GAVE_UP)


def test_the_child_writes_to_its_log_across_restarts(tmp_path, events, supervisors):
    supervisor = new_supervisor(supervisors, events)
    supervisor.add(spec(tmp_path, "talker", "print('hello', flush=True); raise SystemExit(1)"))
    events.wait_for(EventKind.STARTED, 3)
    events.wait_for(EventKind.EXITED, 3)
    assert (tmp_path / "talker.log").read_text().count("hello") >= 3


def test_policy_names_the_bad_field():
    with pytest.raises(ValueError, match="max_backoff_s"):
        RestartPolicy(initial_backoff_s=1.0, max_backoff_s=0.5)
