"""The simulated fleet for bench/sim_fleet.py: a day-long trace and LLM replicas in simulated time.

**Replicas.** Each has `seats` (max_num_seqs) and the engine's fitted step-cost model
(services/worker/engine/step_cost.py): step_s = base + per_seq * running + per_prefill_token *
prompt tokens in the step. The defaults are the figures docs/ENGINE.md reports for SmolLM2 float32
on the 2-core box (60 ms, 3.5 ms a sequence, 1.9 ms a prompt token), with the benchmark's prompts
(167 tokens on average) and 64 output tokens. At n running sequences a replica makes
k(n) = 1 / (base + per_seq n + per_token P n / O) steps a second and finishes k(n) n / O requests
a second (the prompt tokens of the requests admitted meanwhile share the steps): 1.51 requests/s
at 32 seats.

**The fleet is one pool.** The router balances by load, so the simulation keeps one FIFO queue and
one count of running sequences over the ready replicas, in ticks of `dt_s`, with fractional counts
(a fluid model: fast enough for a day at 1,000 replicas in seconds). Requests are cohorts per tick;
a cohort admitted k ticks after it arrived has waited k * dt_s, and its time to first token is
that wait plus one step with its prompt. Admission refuses (as the worker's admission control does)
what would wait more than `queue_wait_bound_s`. Replicas start `cold_start_s` after they are asked
for; a replica removed drains: it takes no new requests and finishes its share of the running
sequences, which is counted in replica-hours. At zero ready replicas arrivals are held (up to
`hold_s`; then refused): the router change that holds first requests is assumed.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

DAY_S = 86_400.0


@dataclass(frozen=True, slots=True)
class ReplicaModel:
    seats: int = 32
    step_base_s: float = 0.060
    step_per_seq_s: float = 0.0035
    step_per_prefill_token_s: float = 0.0019
    prompt_tokens: float = 167.0
    output_tokens: float = 64.0
    kv_blocks: int = 640
    block_size: int = 16
    cold_start_s: float = 30.0

    def steps_per_s(self, running: float) -> float:
        n = max(running, 0.0)
        return 1.0 / (self.step_base_s + self.step_per_seq_s * n
                      + self.step_per_prefill_token_s * self.prompt_tokens * n / self.output_tokens)

    def completions_per_s(self, running: float) -> float:
        return self.steps_per_s(running) * running / self.output_tokens

    def first_token_step_s(self, running: float) -> float:
        return self.step_base_s + self.step_per_seq_s * running + self.step_per_prefill_token_s * self.prompt_tokens

    @property
    def kv_blocks_per_sequence(self) -> float:
        return math.ceil((self.prompt_tokens + self.output_tokens / 2) / self.block_size)

    @property
    def max_rate_per_replica(self) -> float:
        return self.completions_per_s(self.seats)


def day_trace(peak_rate: float, dt_s: float, seed: int = 0) -> np.ndarray:
    """Arrival rate (requests/s) per tick over a day: a diurnal curve (trough 15% of its peak at
    04:00, peak at 16:00), bursts (+20-60% for 2-8 min, about one an hour, 30 s ramps) and a flash
    crowd (2.2x the curve at 19:30, reached in 60 s, 15 min, 5 min decay). Scaled so the highest
    point is `peak_rate`."""
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, DAY_S, dt_s)
    phase = (t / DAY_S - 4 / 24) * 2 * np.pi
    diurnal = 0.15 + 0.85 * ((1 - np.cos(phase)) / 2) ** 1.5
    shape = np.ones_like(t)
    burst_at = 0.0
    while True:
        burst_at += rng.exponential(3600.0)
        if burst_at > DAY_S:
            break
        length_s, height = rng.uniform(120, 480), rng.uniform(0.2, 0.6)
        shape += height * _plateau(t, burst_at, length_s, ramp_s=30.0)
    flash_at = 19.5 * 3600
    flash = _plateau(t, flash_at, 15 * 60, ramp_s=60.0, decay_s=300.0)
    rate = diurnal * shape * (1 + 1.2 * flash)
    return rate * (peak_rate / rate.max())


def _plateau(t: np.ndarray, start_s: float, length_s: float, ramp_s: float, decay_s: float | None = None) -> np.ndarray:
    decay_s = ramp_s if decay_s is None else decay_s
    rise = np.clip((t - start_s) / ramp_s, 0, 1)
    fall = np.clip(1 - (t - start_s - length_s) / decay_s, 0, 1)
    return np.minimum(rise, fall)


@dataclass(slots=True)
class FleetState:
    """The pool: replicas by lifecycle, the queue and the running sequences (fractional counts)."""

    model: ReplicaModel
    ready: int = 0
    starting: list[float] = field(default_factory=list)  # ready-at times, oldest first
    draining: list[float] = field(default_factory=list)  # sequences each draining replica has left
    running: float = 0.0
    waiting: deque = field(default_factory=deque)  # [arrival_s, count]
    num_waiting: float = 0.0

    @property
    def desired(self) -> int:
        return self.ready + len(self.starting)

    def set_desired(self, replicas: int, now_s: float) -> None:
        while self.desired < replicas:
            self.starting.append(now_s + self.model.cold_start_s)
        while self.desired > replicas and self.starting:
            self.starting.pop()  # the newest start is cancelled first: it serves nobody yet
        while self.desired > replicas and self.ready:
            share = self.running / self.ready
            self.running -= share
            self.draining.append(share)
            self.ready -= 1


@dataclass(slots=True)
class Tally:
    """What users saw and what the fleet cost."""

    slo_s: float
    ttft_bins_s: np.ndarray = field(default_factory=lambda: np.concatenate(
        [np.arange(0, 10, 0.01), np.arange(10, 600, 1.0)]))
    ttft_counts: np.ndarray = None
    num_arrived: float = 0.0
    num_refused: float = 0.0
    num_held: float = 0.0
    replica_s: float = 0.0

    def __post_init__(self) -> None:
        self.ttft_counts = np.zeros(len(self.ttft_bins_s))

    def served(self, count: float, ttft_s: float) -> None:
        index = min(int(np.searchsorted(self.ttft_bins_s, ttft_s, side="right")) - 1, len(self.ttft_bins_s) - 1)
        self.ttft_counts[index] += count

    def percentile_s(self, q: float) -> float:
        cumulative = np.cumsum(self.ttft_counts)
        if not cumulative[-1]:
            return 0.0
        index = int(np.searchsorted(cumulative, q * cumulative[-1]))
        return float(self.ttft_bins_s[min(index + 1, len(self.ttft_bins_s) - 1)])  # the bin's upper edge

    @property
    def num_served(self) -> float:
        return float(self.ttft_counts.sum())

    @property
    def num_within_slo(self) -> float:
        return float(self.ttft_counts[self.ttft_bins_s < self.slo_s - 1e-9].sum())
