"""The autoscaler over a simulated day, at 10 to 1,000 replicas, beside KServe's KPA and a fixed fleet.

    .venv/bin/python -m bench.sim_fleet [--scales 10,100,1000] [--slo-s 1.5]

Runs the REAL policy (services/autoscale/policy.py, the one the registry's controller runs, with
AutoscaleConfig's defaults but for the SLO) against the simulated fleet of bench/fleet_model.py
(its docstring: the replica model and what is simplified). Side by side:
- `kpa`: a concurrency target like Knative's KPA, which KServe uses: desired = ceil(mean in-flight
  over the 60 s stable window / target per pod), the target 70% of the seats; panic mode when the
  6 s panic window asks for 2x the ready pods (then it only scales up, until 60 s without panic);
  scale-down at most halves per 2 s tick;
- `fixed`: a fleet sized for the trace's peak at 85% of a replica's throughput, all day.
Reports per run: requests within the TTFT SLO (refused ones count as missed), TTFT p50/p99 of the
served, replica-hours (starting and draining included), scaling actions, direction reversals and
the most in any scale-down window, requests refused and held. JSON + PNG in bench/results/.
"""

from __future__ import annotations

import argparse
import math
import time
from collections import deque
from dataclasses import replace
from datetime import datetime, timezone

import numpy as np

from bench.fleet_model import DAY_S, FleetState, ReplicaModel, Tally, day_trace
from bench.result_files import result_path, write_json
from services.autoscale.policy import Bounds, DeploymentSignals, ScalingPolicy
from services.common.config import AutoscaleConfig

DT_S = 0.5
PEAK_UTILISATION = 0.8  # the trace's peak asks for this share of `scale` replicas' throughput
QUEUE_WAIT_BOUND_S = 4.0  # admission refuses what would wait longer (the worker's bound)
HOLD_S = 30.0  # a request held at zero replicas is refused after this


class PolicyDriver:
    """tensoryard's policy: decides every interval from the fleet's signals."""

    name = "tensoryard"

    def __init__(self, config: AutoscaleConfig, bounds: Bounds):
        self.policy = ScalingPolicy(config, bounds)
        self.interval_s = config.autoscale_interval_s
        self.window_s = config.scale_down_window_s

    def decide(self, now_s: float, fleet: FleetState, recent: dict) -> int:
        m = fleet.model
        r = fleet.ready
        signals = DeploymentSignals(
            num_ready=r, num_in_flight=fleet.running + fleet.num_waiting, num_waiting=fleet.num_waiting,
            num_queued_prompt_tokens=fleet.num_waiting * m.prompt_tokens,
            num_kv_blocks_used=fleet.running * m.kv_blocks_per_sequence, num_kv_blocks_total=r * m.kv_blocks,
            num_seats=r * m.seats, queue_wait_s=recent["queue_wait_s"], ttft_p99_s=recent["ttft_p99_s"],
            max_replica_kv_fraction=fleet.running * m.kv_blocks_per_sequence / (r * m.kv_blocks) if r else 0.0,
            max_replica_waiting=fleet.num_waiting / r if r else fleet.num_waiting,
            num_requests_done=int(recent["done"]), num_requests_held=int(recent["held"]),
        )
        return self.policy.decide(now_s, fleet.desired, signals).replicas


class KpaDriver:
    """Knative's KPA, as KServe runs it: concurrency per pod against a target."""

    name = "kpa"

    def __init__(self, model: ReplicaModel, bounds: Bounds, target_utilisation: float = 0.7):
        self.target = model.seats * target_utilisation
        self.bounds = bounds
        self.interval_s = 2.0
        self.window_s = 60.0
        self._samples: deque[tuple[float, float]] = deque()
        self._panic_until_s = -1.0

    def decide(self, now_s: float, fleet: FleetState, recent: dict) -> int:
        self._samples.append((now_s, fleet.running + fleet.num_waiting + recent["held_now"]))
        while self._samples[0][0] < now_s - 60.0:
            self._samples.popleft()
        stable = np.mean([c for _, c in self._samples])
        panic = np.mean([c for t, c in self._samples if t >= now_s - 6.0])
        desired_stable = math.ceil(stable / self.target)
        desired_panic = math.ceil(panic / self.target)
        ready = max(fleet.ready, 1)
        if desired_panic / ready >= 2.0:
            self._panic_until_s = now_s + 60.0
        current = fleet.desired
        if now_s < self._panic_until_s:
            desired = max(desired_panic, current)  # panic: never scale down
        else:
            desired = max(desired_stable, math.ceil(current / 2))  # at most halve per tick
        return self.bounds.clamp(desired)


class FixedDriver:
    name = "fixed"

    def __init__(self, replicas: int):
        self.replicas = replicas
        self.interval_s = 60.0
        self.window_s = 300.0

    def decide(self, now_s: float, fleet: FleetState, recent: dict) -> int:
        return self.replicas


def simulate(driver, model: ReplicaModel, rates: np.ndarray, slo_s: float, initial: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    arrivals = rng.poisson(rates * DT_S).astype(float)
    fleet = FleetState(model)
    fleet.set_desired(initial, -model.cold_start_s)  # ready at t = 0
    tally = Tally(slo_s)
    held: deque = deque()  # [arrival_s, count] while no replica is ready
    recent = _fresh_recent()
    interval_ticks = max(int(round(driver.interval_s / DT_S)), 1)
    replicas_series = np.zeros(len(rates) // interval_ticks + 1)
    actions: list[tuple[float, int, int]] = []
    started = time.perf_counter()
    for tick, count in enumerate(arrivals):
        now_s = tick * DT_S
        while fleet.starting and fleet.starting[0] <= now_s:
            fleet.starting.pop(0)
            fleet.ready += 1
        tally.num_arrived += count
        _admit_arrivals(fleet, tally, held, now_s, count, recent)
        _serve(fleet, tally, now_s, recent)
        tally.replica_s += (fleet.desired + len(fleet.draining)) * DT_S
        if tick % interval_ticks == 0:
            replicas_series[tick // interval_ticks] = fleet.desired
            recent["queue_wait_s"] = fleet.num_waiting / max(fleet.ready * model.completions_per_s(model.seats), 1e-9)
            recent["ttft_p99_s"] = _p99(recent["ttft"])
            recent["held_now"] = sum(c for _, c in held)
            before = fleet.desired
            after = driver.decide(now_s, fleet, recent)
            if after != before:
                actions.append((now_s, before, after))
                fleet.set_desired(after, now_s)
            recent = _fresh_recent()
    tally.num_refused += sum(c for _, c in held)
    return _report(driver, tally, actions, replicas_series, interval_ticks, time.perf_counter() - started)


def _fresh_recent() -> dict:
    return {"done": 0.0, "held": 0.0, "held_now": 0.0, "ttft": [], "queue_wait_s": 0.0, "ttft_p99_s": 0.0}


def _admit_arrivals(fleet: FleetState, tally: Tally, held: deque, now_s: float, count: float, recent: dict) -> None:
    model = fleet.model
    if not fleet.ready:
        if count:
            held.append([now_s, count])
            tally.num_held += count
            recent["held"] += count
        while held and held[0][0] < now_s - HOLD_S:
            tally.num_refused += held.popleft()[1]
        return
    while held:  # a replica is ready: the held requests go first, in order
        arrived_s, held_count = held.popleft()
        fleet.waiting.append([arrived_s, held_count])
        fleet.num_waiting += held_count
    bound = QUEUE_WAIT_BOUND_S * fleet.ready * model.max_rate_per_replica  # waiting that still meets the bound
    room = max(bound - fleet.num_waiting, 0.0)
    accepted = min(count, room)
    tally.num_refused += count - accepted
    if accepted:
        fleet.waiting.append([now_s, accepted])
        fleet.num_waiting += accepted


def _serve(fleet: FleetState, tally: Tally, now_s: float, recent: dict) -> None:
    model = fleet.model
    if fleet.ready:
        per_replica = fleet.running / fleet.ready
        done = min(fleet.ready * model.completions_per_s(per_replica) * DT_S, fleet.running)
        fleet.running -= done
        recent["done"] += done
        free = fleet.ready * model.seats - fleet.running
        first_step_s = model.first_token_step_s(per_replica)
        while free > 1e-9 and fleet.waiting:
            cohort = fleet.waiting[0]
            admitted = min(cohort[1], free)
            ttft_s = now_s - cohort[0] + first_step_s
            tally.served(admitted, ttft_s)
            recent["ttft"].append((ttft_s, admitted))
            cohort[1] -= admitted
            free -= admitted
            fleet.running += admitted
            fleet.num_waiting -= admitted
            if cohort[1] <= 1e-9:
                fleet.waiting.popleft()
    still = []
    for left in fleet.draining:  # a draining replica finishes its own sequences, then goes
        left -= min(model.completions_per_s(left) * DT_S, left)
        if left > 0.01:
            still.append(left)
    fleet.draining = still


def _p99(samples: list[tuple[float, float]]) -> float:
    if not samples:
        return 0.0
    samples.sort()
    total = sum(c for _, c in samples)
    seen = 0.0
    for value, count in samples:
        seen += count
        if seen >= 0.99 * total:
            return value
    return samples[-1][0]


def _report(driver, tally: Tally, actions, replicas_series, interval_ticks, wall_s: float) -> dict:
    window_s = driver.window_s
    reversal_times, last = [], 0
    for at_s, before, after in actions:
        direction = 1 if after > before else -1
        if last and direction != last:
            reversal_times.append(at_s)
        last = direction
    most_in_window = max((sum(1 for t in reversal_times if start <= t < start + window_s) for start in reversal_times),
                         default=0)
    up_then_down_within = sum(1 for (t0, b0, a0), (t1, b1, a1) in zip(actions, actions[1:])
                              if a0 > b0 and a1 < b1 and t1 - t0 < window_s)
    return {
        "policy": driver.name,
        "requests": round(tally.num_arrived),
        "within_slo_fraction": round(tally.num_within_slo / max(tally.num_arrived, 1), 5),
        "ttft_p50_s": tally.percentile_s(0.50),
        "ttft_p99_s": tally.percentile_s(0.99),
        "refused": round(tally.num_refused),
        "held": round(tally.num_held),
        "replica_hours": round(tally.replica_s / 3600, 1),
        "peak_replicas": int(replicas_series.max()),
        "scaling_actions": len(actions),
        "reversals": len(reversal_times),
        "window_s": window_s,
        "most_reversals_in_one_window": most_in_window,
        "scale_downs_within_a_window_of_a_scale_up": up_then_down_within,
        "sim_wall_s": round(wall_s, 2),
        "replicas_every_interval": replicas_series.astype(int).tolist()[::max(1, int(60 / (interval_ticks * DT_S)))],
    }


def run_scale(scale: int, slo_s: float, seed: int, model: ReplicaModel, config: AutoscaleConfig) -> dict:
    peak_rate = scale * PEAK_UTILISATION * model.max_rate_per_replica
    rates = day_trace(peak_rate, DT_S, seed)
    bounds = Bounds(1, scale * 2)
    fixed = math.ceil(peak_rate / (0.85 * model.max_rate_per_replica))
    initial = max(1, math.ceil(rates[0] / (0.6 * model.max_rate_per_replica)))
    runs = {}
    for driver in (PolicyDriver(config, bounds), KpaDriver(model, bounds), FixedDriver(fixed)):
        start = fixed if driver.name == "fixed" else initial
        runs[driver.name] = simulate(driver, model, rates, slo_s, start, seed)
    return {"scale": scale, "peak_rate_per_s": round(peak_rate, 1), "mean_rate_per_s": round(float(rates.mean()), 1),
            "fixed_replicas": fixed, "runs": runs}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scales", default="10,100,1000")
    parser.add_argument("--slo-s", type=float, default=1.5, help="TTFT SLO (the policy's ttft_slo_s too)")
    parser.add_argument("--cold-start-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    model = replace(ReplicaModel(), cold_start_s=args.cold_start_s)
    config = AutoscaleConfig(ttft_slo_s=args.slo_s)
    created = datetime.now(timezone.utc)
    results = [run_scale(int(s), args.slo_s, args.seed, model, config) for s in args.scales.split(",")]
    report = {
        "benchmark": "sim-fleet", "created_utc": created.isoformat(), "slo_s": args.slo_s, "dt_s": DT_S,
        "replica_model": {f: getattr(model, f) for f in model.__dataclass_fields__},
        "max_rate_per_replica": round(model.max_rate_per_replica, 3),
        "policy_config": {f: getattr(config, f) for f in config.__dataclass_fields__},
        "queue_wait_bound_s": QUEUE_WAIT_BOUND_S, "hold_s": HOLD_S, "results": results,
    }
    path = write_json(report, created, "sim-fleet")
    _print_table(results)
    png = _plot(results[-1], created, args.slo_s)
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


def _print_table(results: list[dict]) -> None:
    print(f"{'scale':>6} {'policy':>11} {'in SLO':>8} {'p99 s':>6} {'refused':>8} {'rep-h':>8} {'peak':>5} "
          f"{'actions':>7} {'revs':>5} {'max/win':>7} {'wall s':>6}")
    for result in results:
        for run in result["runs"].values():
            print(f"{result['scale']:>6} {run['policy']:>11} {100 * run['within_slo_fraction']:>7.2f}% "
                  f"{run['ttft_p99_s']:>6.2f} {run['refused']:>8} {run['replica_hours']:>8.1f} "
                  f"{run['peak_replicas']:>5} {run['scaling_actions']:>7} {run['reversals']:>5} "
                  f"{run['most_reversals_in_one_window']:>7} {run['sim_wall_s']:>6.1f}")


def _plot(result: dict, created: datetime, slo_s: float):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(11, 4.5))
    for run in result["runs"].values():
        series = run["replicas_every_interval"]
        hours = np.arange(len(series)) * DAY_S / 3600 / len(series)
        ax.plot(hours, series, label=f"{run['policy']}: {100 * run['within_slo_fraction']:.2f}% in SLO, "
                                     f"{run['replica_hours']:.0f} replica-h, {run['reversals']} reversals")
    ax.set_xlabel("hour of the simulated day")
    ax.set_ylabel("replicas")
    ax.set_title(f"{result['scale']} replicas at the peak: TTFT SLO {slo_s} s")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = result_path("sim-fleet", created, "png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
