"""The autoscaling policy (services/autoscale/policy.py), driven on its own clock."""

from __future__ import annotations

import dataclasses

import pytest

from services.autoscale.policy import Bounds, DeploymentSignals, ScalingPolicy
from services.common.config import AutoscaleConfig

INTERVAL_S = 10.0


def config(**overrides) -> AutoscaleConfig:
    base = dict(scale_up_window_s=0.0, scale_down_window_s=60.0, ttft_slo_s=0.0,
                max_step_up=100, max_step_down=100, max_step_down_ratio=1.0)
    return AutoscaleConfig(**{**base, **overrides})


def load(replicas: int, in_flight_per_replica: float = 0.0, **totals) -> DeploymentSignals:
    """Embedding-style replicas (no seats, no KV): `in_flight_per_replica` on each of `replicas`."""
    return DeploymentSignals(num_ready=replicas, num_in_flight=in_flight_per_replica * replicas,
                             num_requests_done=1 if in_flight_per_replica else 0, **totals)


class Fleet:
    """Applies each decision at once (every replica ready immediately) and records the actions."""

    def __init__(self, policy: ScalingPolicy, replicas: int):
        self.policy = policy
        self.replicas = replicas
        self.now_s = 0.0
        self.actions: list[tuple[float, int, int]] = []  # (time, from, to)

    def tick(self, signals_for) -> int:
        """`signals_for(replicas)` gives the load as the current fleet would see it."""
        decision = self.policy.decide(self.now_s, self.replicas, signals_for(self.replicas))
        if decision.replicas != self.replicas:
            self.actions.append((self.now_s, self.replicas, decision.replicas))
            self.replicas = decision.replicas
        self.now_s += INTERVAL_S
        return self.replicas

    def reversals(self) -> list[float]:
        times, last_direction = [], 0
        for at_s, before, after in self.actions:
            direction = 1 if after > before else -1
            if last_direction and direction != last_direction:
                times.append(at_s)
            last_direction = direction
        return times


def total_in_flight(total: float):
    """A closed-loop load of `total` requests in flight, spread over whatever replicas run."""
    return lambda replicas: load(replicas, total / max(replicas, 1))


def test_ramp_scales_up_to_carry_the_load_within_max():
    fleet = Fleet(ScalingPolicy(config(), Bounds(1, 10)), replicas=1)
    counts = [fleet.tick(total_in_flight(total)) for total in (4, 8, 16, 32, 48, 64, 200)]
    # 8 in flight per replica saturates; scaling up aims midway between 2 and 8 (5 per replica).
    assert counts == [1, 2, 4, 7, 7, 10, 10]  # 48 over 7 sits inside the band
    assert all(after > before for _, before, after in fleet.actions)


def test_load_inside_the_band_holds_the_count():
    fleet = Fleet(ScalingPolicy(config(), Bounds(1, 10)), replicas=4)
    for per_replica in (2.5, 5.0, 7.9, 3.0, 7.0):  # between down (2) and up (8)
        assert fleet.tick(lambda r: load(r, per_replica)) == 4
    assert fleet.actions == []


def test_scale_down_waits_for_the_whole_down_window_using_its_highest_recommendation():
    policy = ScalingPolicy(config(scale_down_window_s=60.0), Bounds(1, 10))
    fleet = Fleet(policy, replicas=1)
    fleet.tick(total_in_flight(40))  # -> 8 replicas
    assert fleet.replicas == 8
    counts = [fleet.tick(total_in_flight(4)) for _ in range(8)]
    # 4 in flight over 8 replicas is under the down threshold from the next tick on, but the scale-up
    # recommendation (8) stays in the 60 s window: the count holds until it ages out.
    first_down = next(i for i, c in enumerate(counts) if c < 8)
    assert fleet.actions[1][0] - fleet.actions[0][0] >= 60.0
    assert counts[first_down] == 1 and first_down >= 5


def test_a_short_spike_inside_the_up_window_does_not_scale_up():
    fleet = Fleet(ScalingPolicy(config(scale_up_window_s=20.0), Bounds(1, 10)), replicas=2)
    assert fleet.tick(total_in_flight(6)) == 2
    assert fleet.tick(total_in_flight(40)) == 2  # the window still holds the lower recommendation
    assert fleet.tick(total_in_flight(6)) == 2
    assert fleet.actions == []
    for _ in range(3):  # a rise that lasts the window does
        fleet.tick(total_in_flight(40))
    assert fleet.replicas == 8


def test_an_oscillating_load_makes_at_most_one_reversal_per_down_window():
    window_s = 120.0
    fleet = Fleet(ScalingPolicy(config(scale_down_window_s=window_s), Bounds(1, 10)), replicas=1)
    for step in range(200):  # high for 30 s, low for 30 s: a period shorter than the window
        fleet.tick(total_in_flight(40 if (step // 3) % 2 == 0 else 2))
    reversals = fleet.reversals()
    assert len(fleet.actions) == 1  # scaled up once and stayed
    assert all(sum(1 for t in reversals if start <= t < start + window_s) <= 1 for start in reversals)


def test_a_slow_oscillation_reverses_only_after_each_window():
    window_s = 60.0
    fleet = Fleet(ScalingPolicy(config(scale_down_window_s=window_s), Bounds(1, 10)), replicas=1)
    for step in range(300):  # 150 s high, 150 s low: longer than the window
        fleet.tick(total_in_flight(40 if (step // 15) % 2 == 0 else 2))
    ups = [t for t, before, after in fleet.actions if after > before]
    downs = [t for t, before, after in fleet.actions if after < before]
    assert ups and downs
    for down_s in downs:  # a scale-down never comes within the window after a scale-up
        assert all(down_s - up_s >= window_s for up_s in ups if up_s < down_s)


def test_min_and_max_bound_every_decision():
    policy = ScalingPolicy(config(), Bounds(2, 3))
    assert policy.decide(0.0, 2, load(2, 100)).replicas == 3
    policy = ScalingPolicy(config(scale_down_window_s=0.0), Bounds(2, 3))
    assert policy.decide(0.0, 3, load(3, 0.1)).replicas == 2


def test_the_step_limit_caps_each_interval_in_both_directions():
    policy = ScalingPolicy(config(max_step_up=2, max_step_up_ratio=0.5), Bounds(1, 100))
    decision = policy.decide(0.0, 4, load(4, 80))  # wants 64
    assert decision.replicas == 6 and decision.recommendation == 64  # +max(2, ceil(0.5 * 4))
    assert "step" in decision.reason
    policy = ScalingPolicy(config(scale_down_window_s=0.0, max_step_down=1, max_step_down_ratio=0.1),
                           Bounds(1, 100))
    assert policy.decide(0.0, 30, load(30, 0.1)).replicas == 27  # -max(1, floor(0.1 * 30))
    assert policy.decide(0.0, 5, load(5, 0.1)).replicas == 4


def test_scale_down_is_skipped_while_one_replica_is_saturated():
    policy = ScalingPolicy(config(scale_down_window_s=0.0), Bounds(1, 10))
    quiet_but_uneven = dataclasses.replace(load(4, 1.0), max_replica_waiting=6)
    decision = policy.decide(0.0, 4, quiet_but_uneven)
    assert decision.replicas == 4 and "saturated" in decision.reason


def test_scale_down_stops_where_the_rest_could_not_absorb_the_load():
    # Queued tokens are low (under down), but the KV blocks in use would saturate 2 replicas of 100
    # blocks at 0.8: the check keeps enough replicas for them.
    policy = ScalingPolicy(config(scale_down_window_s=0.0, scale_down_kv_fraction=0.79), Bounds(1, 10))
    signals = DeploymentSignals(num_ready=4, num_in_flight=4, num_seats=4 * 32, num_kv_blocks_total=400,
                                num_kv_blocks_used=4 * 40, num_requests_done=5)
    assert policy.decide(0.0, 4, signals).replicas == 3  # 160 blocks: 3 x 80 carries them, 2 x 80 not


def test_kv_use_at_the_saturation_threshold_scales_up():
    policy = ScalingPolicy(config(), Bounds(1, 10))
    signals = DeploymentSignals(num_ready=2, num_in_flight=20, num_seats=64, num_kv_blocks_total=2000,
                                num_kv_blocks_used=1700, num_requests_done=3)  # 0.85 of the blocks
    decision = policy.decide(0.0, 2, signals)
    assert decision.replicas == 3 and "kv" in decision.reason
    assert decision.utilisation["kv"] == pytest.approx(0.85 / 0.8, rel=1e-3)


def test_waiting_requests_per_replica_scale_up_at_five():
    policy = ScalingPolicy(config(), Bounds(1, 10))
    assert policy.decide(0.0, 2, DeploymentSignals(num_ready=2, num_waiting=9, num_requests_done=1)).replicas == 2
    assert policy.decide(10.0, 2, DeploymentSignals(num_ready=2, num_waiting=10, num_requests_done=1)).replicas == 4


def test_ttft_over_the_slo_with_a_load_signal_saturated_grows_in_proportion_and_blocks_scale_down():
    policy = ScalingPolicy(config(ttft_slo_s=1.0, scale_down_window_s=0.0), Bounds(1, 10))
    slow = DeploymentSignals(num_ready=3, num_in_flight=24, queue_wait_s=2.0, num_requests_done=1)  # 8 each: hot
    decision = policy.decide(0.0, 3, slow)
    assert decision.replicas == 6 and "ttft" in decision.reason  # ceil(3 * 2.0)
    half = DeploymentSignals(num_ready=3, num_in_flight=1, ttft_p99_s=0.7, num_requests_done=1)
    assert policy.decide(10.0, 3, half).replicas == 3  # under every other threshold, TTFT not low enough


def test_a_ttft_breach_with_every_load_signal_cool_is_a_burst_and_adds_one_step():
    policy = ScalingPolicy(config(ttft_slo_s=1.0), Bounds(1, 100))
    burst = DeploymentSignals(num_ready=40, num_in_flight=80, queue_wait_s=2.0, num_requests_done=1)  # 2 of 8 each
    decision = policy.decide(0.0, 40, burst)
    assert decision.replicas == 50 and "ttft" in decision.reason  # 40 * 1.25, not 40 * 2
    assert policy.decide(10.0, 50, dataclasses.replace(burst, num_ready=50)).replicas == 63  # it lasts: again


def test_scale_to_zero_only_after_the_idle_window_and_only_with_min_zero():
    cfg = config(scale_down_window_s=0.0, scale_to_zero_idle_s=100.0)
    policy = ScalingPolicy(cfg, Bounds(0, 4))
    assert policy.decide(0.0, 1, load(1, 1.0)).replicas == 1
    assert policy.decide(50.0, 1, load(1)).replicas == 1  # idle for 50 s
    assert policy.decide(99.0, 1, load(1)).replicas == 1
    assert policy.decide(101.0, 1, load(1)).replicas == 0
    kept = ScalingPolicy(cfg, Bounds(1, 4))
    for t in (0.0, 200.0, 400.0):
        assert kept.decide(t, 1, load(1)).replicas == 1


def test_a_request_held_at_zero_brings_one_replica():
    policy = ScalingPolicy(config(), Bounds(0, 4))
    assert policy.decide(0.0, 0, DeploymentSignals(num_ready=0)).replicas == 0
    held = policy.decide(10.0, 0, DeploymentSignals(num_ready=0, num_requests_held=3))
    assert held.replicas == 1 and "first replica" in held.reason


def test_bad_bounds_and_thresholds_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="min <= max"):
        Bounds(3, 2)
    with pytest.raises(ValueError, match="scale_down_kv_fraction"):
        AutoscaleConfig(scale_down_kv_fraction=0.9, scale_up_kv_fraction=0.8)
    with pytest.raises(ValueError, match="autoscale_actuator"):
        AutoscaleConfig(autoscale_actuator="kubernetes")


def test_a_slow_ttft_during_a_cold_start_does_not_compound():
    policy = ScalingPolicy(config(ttft_slo_s=1.0), Bounds(1, 100))
    slow = DeploymentSignals(num_ready=4, num_in_flight=32, queue_wait_s=2.5, num_requests_done=1)
    assert policy.decide(0.0, 4, slow).replicas == 8  # doubles the 4 ready
    # 10 s later the 4 new replicas are still loading and TTFT is still over: nothing more is asked.
    assert policy.decide(10.0, 8, slow).replicas == 8


def test_no_further_scale_up_while_the_last_ones_start_until_the_hold_runs_out():
    policy = ScalingPolicy(config(scale_up_hold_s=120.0), Bounds(1, 100))
    grown = policy.decide(0.0, 4, load(4, 10.0)).replicas
    assert grown > 4
    # The load doubles while the new replicas load their model: the 4 ready ones are saturated.
    starting = DeploymentSignals(num_ready=4, num_in_flight=20.0 * grown, num_requests_done=1)
    held = policy.decide(10.0, grown, starting)
    assert held.replicas == grown and "start" in held.reason
    assert policy.decide(130.0, grown, starting).replicas > grown  # past the hold: they failed to start


def test_scaling_from_zero_does_not_wait_out_the_up_window():
    policy = ScalingPolicy(config(scale_up_window_s=60.0), Bounds(0, 4))
    assert policy.decide(0.0, 0, DeploymentSignals(num_ready=0)).replicas == 0
    assert policy.decide(1.0, 0, DeploymentSignals(num_ready=0, num_requests_held=1)).replicas == 1
