"""The autoscaling policy: a deployment's live signals in, its desired replica count out. Pure.

Each interval, per deployment:

1. **Demand per signal.** Every additive signal is a total over the ready replicas (requests in
   flight, requests waiting for a seat, queued prompt tokens, KV blocks used) and has a scale-up
   threshold per replica (`up`: saturated there, llm-d's KV 0.8 / queue 5) and a lower scale-down
   one (`down`: Dynamo's KV 0.5). Its utilisation is total / (replicas * up), where replicas is the
   deployment's current count, starting replicas included (Kubernetes' HPA counts a pod not yet
   ready as idle when it scales up: capacity on its way is not asked for twice). Time to first token
   is compared with the SLO instead: it does not add up over replicas.
2. **Raw recommendation.** Any signal at or over its `up` (or TTFT at or over the SLO): enough
   replicas that every signal sits midway between its thresholds, at least one more. Every signal
   at or under its `down` (TTFT under its fraction of the SLO): the same midway count, which is
   fewer. In between: the current count (hysteresis: the band holds). No traffic at all for
   `scale_to_zero_idle_s` with a min of 0: zero. Requests held for a deployment at zero: one.
   Then the deployment's min and max. While the replicas of the last scale-up are still starting,
   no further scale-up (for at most `scale_up_hold_s`).
3. **Stabilisation**, Kubernetes HPA's behaviour: the raw recommendations of the last
   `scale_up_window_s` / `scale_down_window_s` are kept; scaling up goes to the lowest of the up
   window (a rise must last the window), scaling down to the highest of the down window (a fall
   must last it). So after a scale-up nothing scales down for the down window: capacity added is
   never taken away within it, and an oscillating load shorter than the window holds the count.
   Scaling from zero skips the up window: requests are held until a replica is ready.
4. **Step limit**: at most max(max_step_up, ceil(ratio * current)) added, max(max_step_down,
   floor(ratio * current)) removed per interval.
5. **Absorb check** before any scale-down: the replicas left must carry today's load below every
   scale-up threshold (projected utilisation < 1), and no single replica may be saturated now (the
   load is not spread evenly, so averages would mislead). Otherwise the smallest count that
   absorbs it, or no change.

`ScalingPolicy` keeps one deployment's recommendation history; time is passed in, so the
simulation (bench/sim_fleet.py) and the tests drive it on their own clocks.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from services.common.config import AutoscaleConfig


@dataclass(frozen=True, slots=True)
class DeploymentSignals:
    """One deployment's load at one moment: totals over its ready replicas (services/autoscale/signals.py
    reads them from the workers' WorkerStats; the simulation computes them)."""

    num_ready: int  # replicas that answered
    num_in_flight: float = 0.0
    num_waiting: float = 0.0
    num_queued_prompt_tokens: float = 0.0
    num_kv_blocks_used: float = 0.0
    num_kv_blocks_total: float = 0.0  # 0: the model has no KV cache (embeddings)
    num_seats: float = 0.0  # sum of max_num_seqs; 0: the replicas report none
    # The replicas' own estimate of the wait before a new request's first token (mean), seconds.
    queue_wait_s: float = 0.0
    # An observed TTFT p99 (router or worker metrics) over the last interval; 0: unknown.
    ttft_p99_s: float = 0.0
    # The busiest replica: no scale-down while one is saturated.
    max_replica_kv_fraction: float = 0.0
    max_replica_waiting: float = 0.0
    # Requests finished since the previous reading (traffic, even when nothing is in flight now).
    num_requests_done: int = 0
    # Requests a router holds for this deployment because no replica is ready (scale from zero).
    num_requests_held: int = 0

    @property
    def idle(self) -> bool:
        return not (self.num_in_flight or self.num_waiting or self.num_requests_done or self.num_requests_held)


@dataclass(frozen=True, slots=True)
class Bounds:
    min_replicas: int
    max_replicas: int

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas or self.max_replicas < 1:
            raise ValueError(f"replica bounds need 0 <= min <= max and max >= 1, not "
                             f"{self.min_replicas}..{self.max_replicas}")

    def clamp(self, replicas: int) -> int:
        return min(max(replicas, self.min_replicas), self.max_replicas)


@dataclass(frozen=True, slots=True)
class SignalLoad:
    """One signal's view: its total, its per-replica thresholds and what it asks for."""

    name: str
    total: float
    up: float  # per replica
    down: float  # per replica

    def utilisation(self, replicas: int) -> float:
        return self.total / (max(replicas, 1) * self.up)

    @property
    def replicas_at_midpoint(self) -> int:
        """Replicas that put this signal midway between its thresholds."""
        return math.ceil(self.total / ((self.up + self.down) / 2) - 1e-9)


@dataclass(frozen=True, slots=True)
class Decision:
    replicas: int  # what to run now (within the bounds and the step limit)
    recommendation: int  # the raw recommendation of this interval, before stabilisation
    reason: str  # one sentence
    utilisation: dict[str, float] = field(default_factory=dict)  # by signal, at the current count

    def changes(self, current: int) -> bool:
        return self.replicas != current


class ScalingPolicy:
    """One deployment's policy state: its bounds and its recent raw recommendations."""

    def __init__(self, config: AutoscaleConfig, bounds: Bounds):
        self.config = config
        self.bounds = bounds
        self._history: deque[tuple[float, int]] = deque()  # (time, raw recommendation)
        self._last_traffic_s: float | None = None
        self._last_scale_up_s: float | None = None

    def decide(self, now_s: float, current: int, signals: DeploymentSignals) -> Decision:
        if not signals.idle or self._last_traffic_s is None:
            self._last_traffic_s = now_s  # the first reading counts as traffic: no zero at start-up
        loads = self.loads(signals)
        utilisation = {s.name: round(s.utilisation(current), 4) for s in loads}
        ttft_s = max(signals.queue_wait_s, signals.ttft_p99_s)
        if self.config.ttft_slo_s > 0 and signals.num_ready:
            utilisation["ttft"] = round(ttft_s / self.config.ttft_slo_s, 4)
        raw, why = self._recommend(now_s, current, signals, loads, ttft_s)
        raw, why = self._hold_while_starting(now_s, current, signals, raw, why)
        raw = self.bounds.clamp(raw)
        stabilised = self._stabilise(now_s, current, raw)
        if current == 0 and raw > 0:
            stabilised = raw  # requests wait for a first replica: no window is worth their wait
        limited = self._limit_step(current, stabilised)
        replicas, absorb_note = self._absorb(current, limited, signals, loads)
        reason = why if replicas == limited else absorb_note
        if replicas == current and raw != current and not absorb_note:
            reason = f"{why}; held by the {'scale-up' if raw > current else 'scale-down'} stabilisation window"
        elif replicas != current and replicas != raw and replicas == limited and stabilised == raw:
            reason = f"{why}; limited to a step of {abs(replicas - current)}"
        if replicas > current:
            self._last_scale_up_s = now_s
        return Decision(replicas, raw, reason, utilisation)

    # -- the steps ----------------------------------------------------------------------------------

    def loads(self, signals: DeploymentSignals) -> list[SignalLoad]:
        c = self.config
        loads = [
            SignalLoad("waiting", signals.num_waiting, c.scale_up_waiting_per_replica, c.scale_down_waiting_per_replica),
            SignalLoad("queued_tokens", signals.num_queued_prompt_tokens, c.scale_up_queued_tokens_per_replica,
                       c.scale_down_queued_tokens_per_replica),
        ]
        if signals.num_seats and signals.num_ready:
            seats = signals.num_seats / signals.num_ready  # an LLM replica's seats are its in-flight capacity
            ratio = c.scale_down_in_flight_per_replica / c.scale_up_in_flight_per_replica
            loads.append(SignalLoad("in_flight", signals.num_in_flight, seats, seats * ratio))
        else:
            loads.append(SignalLoad("in_flight", signals.num_in_flight, c.scale_up_in_flight_per_replica,
                                    c.scale_down_in_flight_per_replica))
        if signals.num_kv_blocks_total and signals.num_ready:
            blocks = signals.num_kv_blocks_total / signals.num_ready
            loads.append(SignalLoad("kv", signals.num_kv_blocks_used, c.scale_up_kv_fraction * blocks,
                                    c.scale_down_kv_fraction * blocks))
        return loads

    def _recommend(self, now_s: float, current: int, signals: DeploymentSignals, loads: list[SignalLoad],
                   ttft_s: float) -> tuple[int, str]:
        c = self.config
        if current == 0 or not signals.num_ready:
            if signals.num_requests_held or not signals.idle:
                return max(current, 1), f"{signals.num_requests_held} request(s) wait for a first replica"
            return current, "no replica ready to read load from"
        if self.bounds.min_replicas == 0 and signals.idle and now_s - self._last_traffic_s >= c.scale_to_zero_idle_s:
            return 0, f"no traffic for {now_s - self._last_traffic_s:.0f} s: scale to zero"
        midpoint = max([s.replicas_at_midpoint for s in loads] + [1])
        hot = [s for s in loads if s.utilisation(current) >= 1]
        ttft_hot = c.ttft_slo_s > 0 and ttft_s >= c.ttft_slo_s
        if hot or ttft_hot:
            wanted = max(midpoint, current + 1) if hot else midpoint
            if ttft_hot:
                # TTFT does not divide by replicas: grow the *ready* count (replicas still starting
                # count against it, so a slow TTFT during a cold start does not compound). With a
                # load signal saturated too, in proportion to the breach, at most double; with every
                # load signal under its threshold the breach is a burst the fleet's size could
                # absorb, and sizing for it (the simulation's first version did) ran the fleet at
                # twice its peak size: one step of `scale_up_ttft_step_ratio`, again next interval
                # if the breach lasts.
                ratio = min(ttft_s / c.ttft_slo_s, 2.0) if hot else 1 + c.scale_up_ttft_step_ratio
                wanted = max(wanted, math.ceil(signals.num_ready * ratio), signals.num_ready + 1)
            names = [s.name for s in hot] + (["ttft"] if ttft_hot else [])
            return wanted, f"saturated ({', '.join(names)}): {wanted} replicas wanted"
        ttft_cool = c.ttft_slo_s <= 0 or ttft_s <= c.scale_down_ttft_fraction * c.ttft_slo_s
        if ttft_cool and all(s.total <= current * s.down for s in loads):
            return min(midpoint, current), f"under every scale-down threshold: {min(midpoint, current)} replicas carry it"
        return current, "within the band between scale-down and scale-up thresholds"

    def _hold_while_starting(self, now_s: float, current: int, signals: DeploymentSignals, raw: int,
                             why: str) -> tuple[int, str]:
        """No further scale-up while the replicas of the last one are still starting (Dynamo's
        hold after scaling), for at most `scale_up_hold_s`. The queue that builds up during a cold
        start is what those replicas come to drain; sized for again at every interval, it would
        double the fleet once per interval of the cold start (the simulation saw 2x the peak
        fleet). Past the hold they count as failed to start, and scaling goes on."""
        if raw <= current or current == 0 or signals.num_ready >= current or self._last_scale_up_s is None:
            return raw, why
        if now_s - self._last_scale_up_s >= self.config.scale_up_hold_s:
            return raw, why
        return current, f"{why}; held while {current - signals.num_ready} replica(s) start"

    def _stabilise(self, now_s: float, current: int, raw: int) -> int:
        """Kubernetes HPA: up to the lowest recommendation of the up window, down to the highest of
        the down window (both include this one)."""
        c = self.config
        self._history.append((now_s, raw))
        horizon_s = max(c.scale_up_window_s, c.scale_down_window_s)
        while self._history and self._history[0][0] < now_s - horizon_s:
            self._history.popleft()
        up = min(r for t, r in self._history if t >= now_s - c.scale_up_window_s)
        down = max(r for t, r in self._history if t >= now_s - c.scale_down_window_s)
        replicas = current
        if replicas < up:
            replicas = up
        if replicas > down:
            replicas = down
        return replicas

    def _limit_step(self, current: int, target: int) -> int:
        c = self.config
        if target > current:
            return min(target, current + max(c.max_step_up, math.ceil(c.max_step_up_ratio * current)))
        if target < current:
            return max(target, current - max(c.max_step_down, math.floor(c.max_step_down_ratio * current)))
        return current

    def _absorb(self, current: int, target: int, signals: DeploymentSignals,
                loads: list[SignalLoad]) -> tuple[int, str]:
        """A scale-down only to a count that carries the present load below every scale-up threshold."""
        if target >= current or target == 0:  # zero only after a whole idle window: nothing to carry
            return target, ""
        c = self.config
        if signals.max_replica_kv_fraction >= c.scale_up_kv_fraction or \
                signals.max_replica_waiting >= c.scale_up_waiting_per_replica:
            return current, "scale-down skipped: a replica is saturated now"
        needed = max([math.floor(s.total / s.up + 1e-9) + 1 if s.total else 1 for s in loads] + [1])
        if needed <= target:
            return target, ""
        if needed >= current:
            return current, f"scale-down skipped: {current - 1} replicas could not absorb the load"
        return needed, f"scale-down to {needed}: fewer could not absorb the load"
