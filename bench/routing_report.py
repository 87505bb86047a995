"""The report of bench/bench_routing.py: the issue's targets as measured ratios, the tables and the
plot (the benchmark measures; this module only turns its numbers into a report)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from bench.llm_report import _table, format_ms, format_pct

BASELINE = "least_load"
KV_POLICIES = ("kv_aware_events", "kv_aware_approx")  # the first is the headline
COLORS = {"round_robin": "tab:gray", "least_load": "tab:orange", "kv_aware_approx": "tab:green",
          "kv_aware_events": "tab:blue"}
CODE_NAMES = {"RESOURCE_EXHAUSTED": "exhausted", "UNAVAILABLE": "unavailable", "DEADLINE_EXCEEDED": "deadline"}
SCENARIO_TITLES = {"multi_tenant": "(a) multi-tenant", "unique": "(b) unique prompts", "hot_prefix": "(c) one hot prefix"}


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0 or (math.isinf(a) and math.isinf(b)):
        return None
    return a / b


# ------------------------------------------------------------------------------------------ targets

def target_rows(report: dict) -> list[dict]:
    """One row per target and kv_aware variant: what was measured, the bound, met or not; for the
    ratios of per-request figures (TTFT percentiles, the responses' cached share), a 90% bootstrap
    interval (requests resampled within each run), and `clear` when the whole interval is on the
    same side of the bound as the measured value."""
    rows = []
    scenarios = report["scenarios"]

    def add(scenario: str, target: str, policy: str, value, bound: str, met, interval=None) -> None:
        row = {"scenario": scenario, "target": target, "policy": policy, "measured": value, "bound": bound,
               "met": None if value is None else bool(met(value)), "interval_90": interval, "clear": None}
        if value is not None and interval is not None and None not in interval:
            row["clear"] = met(interval[0]) == met(interval[1]) == met(value)
        rows.append(row)

    for scenario in scenarios:
        runs = scenarios[scenario].get("runs", {})
        base = runs.get(BASELINE)
        for policy in (p for p in (*KV_POLICIES, *runs) if p.startswith("kv_aware") and p in runs):
            if base is None or any(r["policy"] == policy and r["scenario"] == scenario for r in rows):
                continue
            kv = runs[policy]
            if scenario == "multi_tenant":
                add(scenario, "TTFT p90 / least_load's", policy, _ratio(kv["ttft_p90_ms"], base["ttft_p90_ms"]),
                    "<= 0.5", lambda v: v <= 0.5, _ttft_interval(kv, base, 90))
                add(scenario, "prefix hit rate / least_load's", policy,
                    _ratio(kv["prefix_hit_rate"], base["prefix_hit_rate"]), ">= 2", lambda v: v >= 2,
                    _cached_interval(kv, base))
                add(scenario, "output tok/s / least_load's", policy,
                    _ratio(kv["output_tokens_per_s"], base["output_tokens_per_s"]), ">= 1.2", lambda v: v >= 1.2)
            elif scenario == "unique":
                add(scenario, "in-flight max/median across workers", policy, kv["in_flight_balance"], "<= 1.3",
                    lambda v: v <= 1.3)
                add(scenario, "output tok/s / least_load's", policy,
                    _ratio(kv["output_tokens_per_s"], base["output_tokens_per_s"]), "0.95..1.05",
                    lambda v: abs(v - 1) <= 0.05)
            elif scenario == "hot_prefix":
                add(scenario, "TTFT p99 / least_load's", policy, _ratio(kv["ttft_p99_ms"], base["ttft_p99_ms"]),
                    "<= 1.0", lambda v: v <= 1.0, _ttft_interval(kv, base, 99))
        saturated = scenarios[scenario].get("saturated", {})
        if "kv_aware_events" in saturated and BASELINE in saturated and scenario in ("multi_tenant", "unique"):
            ratio = _ratio(saturated["kv_aware_events"]["output_tokens_per_s"], saturated[BASELINE]["output_tokens_per_s"])
            if scenario == "multi_tenant":
                add(scenario, "closed-loop (saturated) tok/s / least_load's", "kv_aware_events", ratio, ">= 1.2",
                    lambda v: v >= 1.2)
            else:
                add(scenario, "closed-loop (saturated) tok/s / least_load's", "kv_aware_events", ratio, "0.95..1.05",
                    lambda v: abs(v - 1) <= 0.05)
    if cost := report.get("router_cost"):
        add("router", "added p50 latency at c=1 (ms)", "one router", cost["single"]["added_p50_ms_at_1"],
            "< 0.5", lambda v: v < 0.5)
        for label, figure in (("one router (c=1 and c=32, one channel)", cost["single"]["forwarded_per_router_core_s"]),
                              ("one router (c=32, 16 channels)", cost["spread_one_router"]["forwarded_per_router_core_s"]),
                              ("two routers, one port (c=32, 16 channels)",
                               cost["spread_two_routers_one_port"]["forwarded_per_router_core_s"])):
            add("router", "forwarded requests/s per router core", label, figure, ">= 3000", lambda v: v >= 3000)
    return rows


BOOTSTRAP_SAMPLES = 2000
CENSORED_MS = 1e12  # a request without a first token, for the resampling


def _ttft_interval(run: dict, base: dict, percentile: float) -> list[float | None]:
    def samples(r: dict) -> np.ndarray:
        return np.array([CENSORED_MS if v is None else v for v in r["measured_requests"]["ttft_ms"]])

    def statistic(values: np.ndarray) -> np.ndarray:  # [num_samples, num_requests] -> [num_samples]
        return np.percentile(values, percentile, axis=1)

    return _bootstrap_ratio(samples(run), samples(base), statistic)


def _cached_interval(run: dict, base: dict) -> list[float | None]:
    """Of the responses' cached share of prompt tokens (per request), the stand-in for the workers'
    hit rate, which has no per-request breakdown."""
    def samples(r: dict) -> np.ndarray:  # [num_requests, 2]: cached, prompt
        m = r["measured_requests"]
        return np.stack([m["cached_prompt_tokens"], m["prompt_tokens"]], axis=1).astype(float)

    def statistic(values: np.ndarray) -> np.ndarray:  # [num_samples, num_requests, 2]
        return values[..., 0].sum(axis=1) / np.maximum(values[..., 1].sum(axis=1), 1)

    return _bootstrap_ratio(samples(run), samples(base), statistic)


def _bootstrap_ratio(a: np.ndarray, b: np.ndarray, statistic) -> list[float | None]:
    if len(a) < 2 or len(b) < 2:
        return [None, None]
    rng = np.random.default_rng(0)
    a_stats = statistic(a[rng.integers(0, len(a), (BOOTSTRAP_SAMPLES, len(a)))])
    b_stats = statistic(b[rng.integers(0, len(b), (BOOTSTRAP_SAMPLES, len(b)))])
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(b_stats > 0, a_stats / b_stats, np.inf)
    low, high = np.percentile(ratios, [5, 95])
    return [float(low), float(high)]


# ------------------------------------------------------------------------------------------- tables

def print_tables(report: dict) -> None:
    console = Console(width=None if sys.stdout.isatty() else 190)
    fleet = report["fleet"]
    headers = ("policy", "sent", "TTFT p50", "TTFT p90", "TTFT p99", "out tok/s", "hit (workers)", "hit (usage)",
               "in-flight max/med per worker", "balance", "served per worker", "refused", "no 1st token")
    for scenario, result in report["scenarios"].items():
        arrivals, capacity = result["arrivals"], result["capacity"]["requests_per_s"]
        load = (f"{report['options']['load_fraction']:g} x capacity {capacity:.2f}/s" if capacity is not None
                else "rate given, not calibrated")
        title = (f"{SCENARIO_TITLES[scenario]}: {result['prompts']['num_system_prompts']} system prompt(s), "
                 f"{result['prompts']['mean_tokens']:.0f} prompt tokens on average, {report['options']['max_tokens']} "
                 f"output tokens; Poisson {result['rate_per_s']:.2f}/s ({load}); {arrivals['num_measured']} requests "
                 f"measured over {arrivals['duration_s']:g}s after {arrivals['num_arrivals'] - arrivals['num_measured']} "
                 f"in a {arrivals['warmup_s']:g}s warm-up; {fleet['num_workers']} workers x "
                 f"{fleet['version_config']['max_num_seqs']} seats, {fleet['num_kv_blocks']} KV blocks each (ms)")
        console.print(_table(title, headers, [_run_cells(policy, run) for policy, run in result["runs"].items()]))
        if saturated := result.get("saturated"):
            console.print(_table(f"{SCENARIO_TITLES[scenario]}, closed loop of {next(iter(saturated.values()))['concurrency']} "
                                 f"clients (saturated; the first is the calibration) (ms)",
                                 ("policy", "out tok/s", "requests/s (tokens)", "finished/s", "hit (workers)",
                                  "TTFT p50", "TTFT p90", "balance", "refused"),
                                 [(policy, f"{p['output_tokens_per_s']:.1f}", f"{p['capacity_per_s']:.2f}",
                                   f"{p['requests_per_s']:.2f}", format_pct(p["prefix_hit_rate"]),
                                   format_ms(p["ttft_p50_ms"]), format_ms(p["ttft_p90_ms"]),
                                   _value(p["in_flight_balance"]), str(sum(p["errors_by_code"].values())))
                                  for policy, p in saturated.items()]))
    rows = report["targets"]
    console.print(_table("Targets (kv_aware_events is the headline, at the router's defaults; ratios are the kv_aware "
                         "policy's over least_load's; 90% bootstrap interval where per-request)",
                         ("scenario", "target", "policy", "measured", "90% interval", "bound", "met"),
                         [(r["scenario"], r["target"], r["policy"], _value(r["measured"]), _interval(r), r["bound"],
                           _verdict(r)) for r in rows]))
    if cost := report.get("router_cost"):
        console.print(_cost_table(cost))


def _run_cells(policy: str, run: dict) -> tuple[str, ...]:
    per_worker = ", ".join(f"{w['in_flight_max']}/{_num(w['in_flight_median'])}" for w in run["workers"])
    refused = ", ".join(f"{n} {CODE_NAMES.get(code, code)}" for code, n in run["errors_by_code"].items()) or "0"
    return (policy, str(run["num_requests_sent"]), format_ms(run["ttft_p50_ms"]), format_ms(run["ttft_p90_ms"]),
            format_ms(run["ttft_p99_ms"]), f"{run['output_tokens_per_s']:.1f}", format_pct(run["prefix_hit_rate"]),
            format_pct(run["prefix_cached_fraction"]), per_worker, _value(run["in_flight_balance"]),
            ", ".join(str(w["num_requests_ok"]) for w in run["workers"]), refused, str(run["num_without_first_token"]))


def _cost_table(cost: dict):
    rows = []
    for point in cost["single"]["points"]:
        router = point["target"] == "router"
        rows.append((f"{point['target']} (one channel)", str(point["concurrency"]), f"{point['requests_per_s']:.0f}",
                     f"{point['p50_ms']:.3f}", "-" if not router else f"{1000 * point['process_cpu_s'] / point['num_requests']:.3f}",
                     "-" if not router else f"{point['num_requests'] / point['process_cpu_s']:.0f}", "-"))
    for key, label in (("spread_one_router", "one router, 16 channels"),
                       ("spread_two_routers_one_port", "two routers on one port, 16 channels")):
        point = cost[key]
        rows.append((label, str(point["concurrency"]), f"{point['requests_per_s']:.0f}", f"{point['p50_ms']:.3f}",
                     _value(point["router_cpu_ms_per_request"]), f"{point['forwarded_per_router_core_s']:.0f}",
                     " / ".join(f"{s:.0%}" for s in point["router_cpu_share"] if s is not None)))
    single = cost["single"]
    title = (f"Router cost: ModelMetadata through a kv_aware router; added p50 at c=1 "
             f"{single['added_p50_ms_at_1']:.3f} ms, router/direct throughput at c=32 "
             f"{single['router_over_direct_throughput']:.2f}x")
    return _table(title, ("target", "clients", "requests/s", "p50 ms", "router CPU ms/request", "per router core/s",
                          "CPU split"), rows)


def _interval(row: dict) -> str:
    interval = row["interval_90"]
    return "-" if not interval or None in interval else f"{_value(interval[0])}..{_value(interval[1])}"


def _verdict(row: dict) -> str:
    if row["met"] is None:
        return "-"
    verdict = "yes" if row["met"] else "NO"
    return verdict if row["clear"] is not False else f"{verdict} (within noise)"


def _value(value: float | None) -> str:
    if value is None:
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.3f}" if abs(value) < 1 else f"{value:.2f}"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


# --------------------------------------------------------------------------------------------- plot

def plot(report: dict, path: Path) -> Path:
    """Per scenario: the TTFT CDF of each policy (top), and output tok/s and hit rate (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogFormatter, ScalarFormatter

    scenarios = report["scenarios"]
    figure, axes = plt.subplots(2, max(len(scenarios), 1), figsize=(5.5 * max(len(scenarios), 1), 8.5), squeeze=False)
    for column, (scenario, result) in enumerate(scenarios.items()):
        cdf_axis, bar_axis = axes[0][column], axes[1][column]
        policies = list(result["runs"])
        for policy in policies:
            values = result["runs"][policy]["measured_requests"]["ttft_ms"]
            finite = np.array([v for v in values if v is not None])
            if not len(finite):
                continue
            # Censored requests (no first token) keep the CDF below 1.
            cdf_axis.step(np.sort(finite), np.arange(1, len(finite) + 1) / len(values), where="post",
                          color=COLORS.get(policy, "tab:purple"), linestyle="-" if policy in COLORS else "--",
                          label=policy)
        cdf_axis.set(title=f"{SCENARIO_TITLES[scenario]}: TTFT, {result['rate_per_s']:.2f} req/s", xscale="log",
                     xlabel="time to first token (ms)", ylabel="share of requests", ylim=(0, 1.02))
        cdf_axis.xaxis.set_major_formatter(ScalarFormatter())  # plain milliseconds
        cdf_axis.xaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
        cdf_axis.grid(True, which="both", alpha=0.3)
        cdf_axis.legend(fontsize=8)
        x = np.arange(len(policies))
        throughput = [result["runs"][p]["output_tokens_per_s"] for p in policies]
        bars = bar_axis.bar(x, throughput, color=[COLORS.get(p, "tab:purple") for p in policies])
        for bar, policy in zip(bars, policies):
            hit = result["runs"][policy]["prefix_hit_rate"]
            bar_axis.annotate(f"hit {format_pct(hit)}\nbal {_value(result['runs'][policy]['in_flight_balance'])}",
                              (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=8)
        bar_axis.set_xticks(x, policies, rotation=15, fontsize=8)
        bar_axis.set(title="output tokens/s, prefix hit rate, in-flight balance", ylabel="tokens/s",
                     ylim=(0, max(throughput, default=1) * 1.25))
        bar_axis.grid(True, axis="y", alpha=0.3)
    fleet = report["fleet"]
    figure.suptitle(f"Routing policies: SmolLM2-135M, {fleet['num_workers']} CPU workers x 1 thread,\n"
                    f"{fleet['version_config']['max_num_seqs']} seats, {fleet['num_kv_blocks']} KV blocks each", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
