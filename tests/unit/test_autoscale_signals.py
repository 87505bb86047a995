"""A dynamic batcher's load reaches the policy: an embedding worker reports no seats, KV or
waiting sequences, so its requests in flight (queued for a batch included) and its batcher queue
are what scale it (services/autoscale/signals.py `aggregate`)."""

from __future__ import annotations

import threading

from services.autoscale.policy import Bounds, ScalingPolicy
from services.autoscale.signals import aggregate
from services.common.config import AutoscaleConfig
from services.worker.batcher import BatcherConfig, DynamicBatcher
from services.worker.state import Phase, WorkerState
from tests.conftest import wait_until


class BatcherModel:
    """What WorkerState reads from an embedding model: its batcher's queue and no engine fields."""

    version = "1"
    reports_load = False

    def __init__(self, batcher: DynamicBatcher):
        self.batcher = batcher

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    def load_fields(self) -> dict:
        return {}


def test_a_batchers_queue_and_in_flight_requests_scale_it_up_and_idle_scales_it_down():
    gate = threading.Event()

    def execute(payloads):  # a batch runs until the test lets it finish
        gate.wait(10)
        return payloads

    # A batch leaves at 4 requests (or after 1 s): one batch of 4 runs while the rest queue.
    batcher = DynamicBatcher(BatcherConfig(max_batch_size=4, preferred_batch_sizes=(4,), max_queue_delay_us=1_000_000),
                             execute, "embed")
    state = WorkerState("w1", "m", model=BatcherModel(batcher), phase=Phase.SERVING)

    def request(i: int) -> None:
        with state.track_request():
            batcher.submit(i, 1).result(10)

    clients = [threading.Thread(target=request, args=(i,)) for i in range(12)]
    policy = ScalingPolicy(AutoscaleConfig(scale_down_window_s=0.0, ttft_slo_s=0.0), Bounds(1, 4))
    try:
        for client in clients:
            client.start()
        # One batch of 4 runs, 8 wait for the next: 12 in flight at the worker.
        wait_until(lambda: state.num_in_flight == 12 and batcher.queue_depth == 8, 5, "the batcher to fill")
        signals = aggregate([state.stats_proto()])
        assert (signals.num_ready, signals.num_in_flight, signals.num_waiting) == (1, 12, 8)
        busy = policy.decide(0.0, 1, signals)
        # Over both marks (8 in flight, 5 waiting a replica); midway (5 and 3) needs 3 replicas.
        assert busy.replicas == 3 and "in_flight" in busy.reason and "waiting" in busy.reason, busy
        assert busy.utilisation["in_flight"] == 1.5 and busy.utilisation["waiting"] == 1.6
    finally:
        gate.set()
        for client in clients:
            client.join(10)
        batcher.close(5)
    idle = aggregate([state.stats_proto()], num_requests_done=12)
    assert (idle.num_in_flight, idle.num_waiting) == (0, 0) and state.num_requests_ok == 12
    assert policy.decide(1.0, 3, idle).replicas == 2  # down one step an interval
