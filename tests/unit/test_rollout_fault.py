"""InjectFault FAIL_REQUESTS as the worker applies it: that share of requests fails with INTERNAL,
until the fault's time is up."""

from __future__ import annotations

import time

import grpc
import pytest

from services.common.errors import status_for
from services.worker.state import FailRequests, InjectedFailure, WorkerState


def state_failing(fraction: float, duration_s: float) -> WorkerState:
    state = WorkerState(worker_id="w", model_name="m")
    state.failing = FailRequests(fraction, time.monotonic() + duration_s)
    return state


def test_every_request_fails_with_internal_at_fraction_one():
    state = state_failing(1.0, 60)
    with pytest.raises(InjectedFailure) as failure:
        state.fail_if_injected()
    assert status_for(failure.value)[0] is grpc.StatusCode.INTERNAL
    assert state.num_requests_failed == 1


def test_about_the_fraction_fails():
    state = state_failing(0.3, 60)
    failed = 0
    for _ in range(2000):
        try:
            state.fail_if_injected()
        except InjectedFailure:
            failed += 1
    assert 480 <= failed <= 720  # 600 expected; over 5 standard deviations either side


def test_nothing_fails_once_the_duration_is_over():
    state = state_failing(1.0, -0.001)
    state.fail_if_injected()
    assert state.num_requests_failed == 0


def test_nothing_fails_without_the_fault():
    WorkerState(worker_id="w", model_name="m").fail_if_injected()
