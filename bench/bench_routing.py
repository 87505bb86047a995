"""Routing policies against each other on one LLM fleet, and what the router's hop costs.

    .venv/bin/python -m bench.bench_routing [--quick] [--workers 2] [--max-num-seqs 8]
        [--warmup-s 20] [--arrivals-s 50] [--load-fraction 0.8] [--scenarios multi_tenant,unique,hot_prefix]
        [--policies round_robin,least_load,kv_aware_approx,kv_aware_events] [--kv-router-flags "..."]
        [--explore-overlap-weights 16] [--saturation-scenarios multi_tenant,unique] [--rate-per-s R]
        [--tenant-header] [--skip-router-cost] [--seed 0]

A fleet started by hand (bench/routing_fleet.py): a registry, SmolLM2-135M-Instruct registered as
`smollm2-routing` with a version config sized for the scenarios, --workers workers of one torch
thread each, and one router per run. Three traffic mixes (bench/routing_scenarios.py): (a)
multi_tenant, 16 tenants with ~500-token system prompts and short unique questions; (b) unique,
the same shape with nothing shared; (c) hot_prefix, one system prompt for all. Each worker's KV
cache holds the shared prefixes of half the tenants plus the private blocks of a full batch, so in
(a) one replica cannot cache every tenant, as in production.

Per scenario:
1. capacity: fresh workers, the kv_aware (events) router, a closed loop of as many clients as the
   fleet has seats (workers x max_num_seqs); capacity = output tokens/s over max_tokens (requests/s)
   in its measured window, after a warm-up that fills the caches. In --saturation-scenarios the
   same closed loop runs through least_load too: throughput at saturation, beside the open loop's;
2. Poisson arrivals at --load-fraction of that capacity for --warmup-s + --arrivals-s, and one
   request per arrival;
3. each policy in turn: restart the workers (empty caches, the same start for every policy), start
   its router, wait until it follows every worker, send the same requests at the same offsets
   (bench/routing_load.py: the first --warmup-s of arrivals fill caches and queues and are not
   measured), stop the router. In multi_tenant, kv_aware (events) also runs with each
   --explore-overlap-weights value (the targets use the router's default, 4).
Then the router's cost (bench/router_cost.py, bench/routing_cost.py): ModelMetadata through a
kv_aware router against straight to a worker, and the forwarding rate of one router and of two
router processes sharing one port.

Workers run with TENSORYARD_MAX_QUEUE_WAIT_S=10 (admission control sheds nothing the comparison
needs; refusals are counted anyway) and TENSORYARD_PROGRESS_TIMEOUT_S=20, and the version config
caps a step at 512 tokens (max_num_batched_tokens): one 500-token prefill takes about 1.2 s on one
thread, and the engine's default budget (2048) made steps long enough for the 5 s progress watchdog
to call the engine stalled, which takes the replica out of rotation. Requests: greedy, exactly --max-tokens output tokens
(ignore_eos). With --tenant-header, multi_tenant requests carry x-tenant-id (the workers then share
their engine fairly between tenants); by default tenants differ by their system prompt alone.
Writes bench/results/routing-<UTC>.json and a .png beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import signal
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from bench.llm_load import poisson_arrivals_s
from bench.llm_report import format_ms
from bench.machine import machine_info
from bench.result_files import result_path, write_json
from bench.router_cost import router_cost
from bench.routing_cost import spread_throughput
from bench.routing_fleet import Fleet, running_fleet
from bench.routing_load import CLOSED_LOOP_SPREAD_S, closed_loop_run, open_loop_run
from bench.routing_report import plot, print_tables, target_rows
from bench.routing_scenarios import (SCENARIOS, PromptBuilder, ScenarioShape, generate_requests, make_prompts,
                                     prompt_summary)

RESULTS_NAME = "routing"
MODEL_NAME = "smollm2-routing"
BLOCK_SIZE = 16
KV_BYTES_PER_TOKEN = 2 * 30 * 3 * 64 * 4  # SmolLM2-135M in float32: K and V, 30 layers, 3 KV heads of 64
MAX_MODEL_LEN = 1024
# Tokens computed per engine step. The engine's default (2048) makes a step of four 500-token
# prefills, over 5 s on one thread; 512 keeps a step near one prompt's prefill (~1.2 s).
MAX_NUM_BATCHED_TOKENS = 512
POLICIES = {
    "round_robin": ["--routing-policy", "round_robin"],
    "least_load": ["--routing-policy", "least_load"],
    "kv_aware_approx": ["--routing-policy", "kv_aware", "--kv-index", "approximate"],
    "kv_aware_events": ["--routing-policy", "kv_aware", "--kv-index", "events"],
}
# Admission sheds nothing the comparison needs; a step of a whole prompt chunk (about 1.2 s on one
# thread) is not mistaken for a hung engine; stopped workers have nothing left to drain.
WORKER_ENV = {"TENSORYARD_MAX_QUEUE_WAIT_S": "10", "TENSORYARD_PROGRESS_TIMEOUT_S": "20",
              "TENSORYARD_DRAIN_TIMEOUT_S": "5"}

log = Console(stderr=True)


# ------------------------------------------------------------------------------------------ sizing

def fleet_sizing(builder: PromptBuilder, args: argparse.Namespace) -> dict:
    """The version config: seats, and a KV cache of half the tenants' shared prefixes plus a full
    batch's private blocks (prompt tail, question and output)."""
    tenants = make_prompts(builder, _shape("multi_tenant", args), 64, args.seed)
    ids = [builder.tokenizer.encode(builder.template.render(
        [{"role": "system", "content": p.system}, {"role": "user", "content": q}]), add_special_tokens=False).ids
        for p in tenants[:1] for q in ("Question 1: why?", "Question 2: how?")]
    shared_tokens = next(i for i, (a, b) in enumerate(zip(*ids)) if a != b)
    shared_blocks = shared_tokens // BLOCK_SIZE
    longest = max(p.num_tokens for p in tenants)
    private_blocks = math.ceil((longest + args.max_tokens) / BLOCK_SIZE) - shared_blocks
    # ... and never less than a full batch of prompts that share nothing (the unique scenario).
    num_blocks = max(math.ceil(args.num_tenants * args.cache_fraction) * shared_blocks
                     + args.max_num_seqs * private_blocks,
                     args.max_num_seqs * math.ceil((longest + args.max_tokens) / BLOCK_SIZE))
    return {
        "num_shared_prefix_tokens": shared_tokens, "num_shared_prefix_blocks": shared_blocks,
        "num_private_blocks_per_sequence": private_blocks, "num_kv_blocks": num_blocks,
        "cache_holds_tenant_prefixes": (num_blocks - args.max_num_seqs * private_blocks) / shared_blocks,
        "version_config": {"max_num_seqs": args.max_num_seqs, "max_model_len": MAX_MODEL_LEN,
                           "max_num_batched_tokens": MAX_NUM_BATCHED_TOKENS,
                           "kv_cache_bytes": num_blocks * BLOCK_SIZE * KV_BYTES_PER_TOKEN},
    }


def _shape(name: str, args: argparse.Namespace) -> ScenarioShape:
    return ScenarioShape(name, args.num_tenants, args.system_prompt_tokens)


# ----------------------------------------------------------------------------------------- running

def policy_flags(policy: str, args: argparse.Namespace) -> list[str]:
    """The router flags of a policy; "kv_aware_events_w<W>" is kv_aware (events) with kv_overlap_weight W."""
    base, _, weight = policy.partition("_w")
    flags = POLICIES[base] + (["--kv-overlap-weight", weight] if weight else [])
    return flags + (shlex.split(args.kv_router_flags) if policy.startswith("kv_aware") else [])


def scenario_policies(scenario: str, args: argparse.Namespace) -> list[str]:
    """The policies compared, and in multi_tenant the kv_overlap_weight explorations after them."""
    extra = [f"kv_aware_events_w{w:g}" for w in args.explore_overlap_weights] if scenario == "multi_tenant" else []
    return args.policies + extra


def fresh_run(fleet: Fleet, policy: str, args: argparse.Namespace, measure) -> dict:
    """Restart the workers, start the policy's router, run `measure(router, workers)`, stop the router."""
    fleet.restart_workers(args.workers)
    router = fleet.start_router(f"router-{policy}-{fleet.num_worker_starts}", policy_flags(policy, args))
    try:
        fleet.wait_router_sees_workers(router)
        return asyncio.run(measure(router.address, [w.address for w in fleet.workers]))
    finally:
        fleet.stop_router(router)


def tenant_metadata(prompts, scenario: str, args: argparse.Namespace):
    if not args.tenant_header or scenario != "multi_tenant":
        return None
    return [("x-tenant-id", f"tenant-{p.group}") for p in prompts]


def closed_loop_capacity(fleet: Fleet, builder: PromptBuilder, shape: ScenarioShape, index: int, policy: str,
                         args: argparse.Namespace) -> dict:
    """A closed loop of as many clients as the fleet has seats, through the policy's router, on
    fresh workers; its throughput is the fleet's capacity under that policy."""
    scenario = shape.name
    seats = args.workers * args.max_num_seqs
    prompts = make_prompts(builder, shape, 4 * seats + 64, args.seed + 100 + index, first_number=100_000)
    requests = generate_requests(prompts, MODEL_NAME, args.max_tokens, f"{scenario}-cal")
    log.print(f"  closed loop, {seats} clients, {policy} ...")
    point = fresh_run(fleet, policy, args, lambda router, workers: closed_loop_run(
        router, workers, requests, seats, args.calibration_s, args.calibration_warmup_s, args.max_tokens,
        tenant_metadata(prompts, scenario, args)))
    point.pop("measured_requests", None)
    # Every request yields exactly max_tokens tokens, so tokens/s over max_tokens is the request rate
    # the fleet sustains; unlike finished requests it counts the window's partial progress too.
    point["capacity_per_s"] = point["output_tokens_per_s"] / args.max_tokens
    point["router_flags"] = policy_flags(policy, args)
    log.print(f"    {point['capacity_per_s']:.2f} requests/s ({point['output_tokens_per_s']:.1f} tok/s, "
              f"{point['requests_per_s']:.2f} requests/s finished, hit {point['prefix_hit_rate'] or 0:.1%})")
    return point


def calibrate(fleet: Fleet, builder: PromptBuilder, shape: ScenarioShape, index: int,
              args: argparse.Namespace) -> tuple[dict, dict]:
    """The scenario's capacity (kv_aware events), and the closed-loop points it came from: that one
    and, in --saturation-scenarios, least_load's (throughput at saturation, for the targets)."""
    log.print(f"[bold]{shape.name}[/bold]: calibrating capacity ...")
    saturated = {"kv_aware_events": closed_loop_capacity(fleet, builder, shape, index, "kv_aware_events", args)}
    capacity_per_s = saturated["kv_aware_events"]["capacity_per_s"]
    if capacity_per_s <= 0:
        raise RuntimeError(f"{shape.name}: the calibration produced no token "
                           f"({saturated['kv_aware_events']['first_error']})")
    if shape.name in args.saturation_scenarios and "least_load" in args.policies:
        saturated["least_load"] = closed_loop_capacity(fleet, builder, shape, index, "least_load", args)
    seats = args.workers * args.max_num_seqs
    capacity = {"definition": f"output tokens per second over max_tokens (= requests per second) in the measured "
                              f"window ({args.calibration_s:g}s) of a closed loop of {seats} clients (workers x "
                              f"max_num_seqs, started over {min(args.calibration_warmup_s / 2, CLOSED_LOOP_SPREAD_S):g}s) through the "
                              f"kv_aware (events) router, after {args.calibration_warmup_s:g}s of warm-up, fresh "
                              f"workers; requests of the same mix, other questions", "requests_per_s": capacity_per_s}
    return capacity, saturated


def run_scenario(fleet: Fleet, builder: PromptBuilder, scenario: str, index: int, args: argparse.Namespace) -> dict:
    shape = _shape(scenario, args)
    if args.rate_per_s:
        capacity, saturated = {"definition": "not calibrated: --rate-per-s given", "requests_per_s": None}, {}
        rate_per_s = args.rate_per_s
    else:
        capacity, saturated = calibrate(fleet, builder, shape, index, args)
        rate_per_s = args.load_fraction * capacity["requests_per_s"]
    arrivals_s = poisson_arrivals_s(rate_per_s, args.warmup_s + args.arrivals_s, args.seed + index)
    num_measured = sum(t >= args.warmup_s for t in arrivals_s)
    log.print(f"  Poisson at {rate_per_s:.2f}/s: {len(arrivals_s)} arrivals, {num_measured} of them measured "
              f"(after a {args.warmup_s:g}s warm-up, over {args.arrivals_s:g}s)")
    prompts = make_prompts(builder, shape, len(arrivals_s), args.seed + index)
    requests = generate_requests(prompts, MODEL_NAME, args.max_tokens, scenario)
    metadata = tenant_metadata(prompts, scenario, args)
    runs = {}
    for policy in scenario_policies(scenario, args):
        started = time.monotonic()
        runs[policy] = fresh_run(fleet, policy, args, lambda router, workers: open_loop_run(
            router, workers, requests, arrivals_s, args.warmup_s, args.arrivals_s, args.drain_timeout_s, args.max_tokens,
            metadata))
        runs[policy] |= {"router_flags": policy_flags(policy, args), "wall_s": time.monotonic() - started,
                         "load_avg_1m_after": os.getloadavg()[0]}
        _log_run(policy, runs[policy])
    return {
        "shape": {"num_tenants": shape.num_tenants if scenario == "multi_tenant" else None,
                  "system_prompt_tokens": shape.system_prompt_tokens},
        "prompts": prompt_summary(prompts),
        "capacity": capacity,
        "saturated": saturated,
        "rate_per_s": rate_per_s,
        "arrivals": {"kind": "Poisson", "rate_per_s": rate_per_s, "warmup_s": args.warmup_s,
                     "duration_s": args.arrivals_s, "seed": args.seed + index, "num_arrivals": len(arrivals_s),
                     "num_measured": num_measured,
                     "measured": "requests sent at offsets >= warmup_s; throughput over [warmup_s, warmup_s + duration_s]",
                     "offsets_s": [round(t, 4) for t in arrivals_s]},
        "runs": runs,
    }


def _log_run(policy: str, run: dict) -> None:
    errors = f", [red]{sum(run['errors_by_code'].values())} refused {run['errors_by_code']}[/red]" if run[
        "errors_by_code"] else ""
    unfinished = f", [red]{run['num_without_first_token']} without a first token[/red]" if run[
        "num_without_first_token"] else ""
    hit = run["prefix_hit_rate"]
    log.print(f"  {policy:>16}: TTFT p50 {format_ms(run['ttft_p50_ms'])} p90 {format_ms(run['ttft_p90_ms'])} "
              f"p99 {format_ms(run['ttft_p99_ms'])} ms, {run['output_tokens_per_s']:.1f} tok/s, hit "
              f"{hit if hit is None else f'{hit:.1%}'}, balance {run['in_flight_balance'] or 0:.2f}, "
              f"served {[w['num_requests_ok'] for w in run['workers']]}{errors}{unfinished} ({run['wall_s']:.0f}s)",
              soft_wrap=True)


def measure_router_cost(fleet: Fleet, args: argparse.Namespace) -> dict:
    """ModelMetadata via a kv_aware router vs direct; then one router and two on one port, spread."""
    log.print("[bold]router cost[/bold] ...")
    flags = policy_flags("kv_aware_events", args)
    worker = fleet.workers[0]
    router = fleet.start_router("router-cost", flags)
    fleet.wait_router_sees_workers(router)
    result = {"router_flags": flags}
    try:
        result["single"] = asyncio.run(router_cost(router.address, worker.address, router.pid, MODEL_NAME,
                                                   duration_s=args.cost_s))
        result["spread_one_router"] = asyncio.run(spread_throughput(router.address, MODEL_NAME, [router.pid],
                                                                    duration_s=args.cost_s))
    finally:
        fleet.stop_router(router)
    pair = [fleet.start_router("router-shared-0", flags)]
    pair.append(fleet.start_router("router-shared-1", flags, port=int(pair[0].address.rsplit(":", 1)[1])))
    try:
        for router in pair:
            fleet.wait_router_sees_workers(router)
        result["spread_two_routers_one_port"] = asyncio.run(spread_throughput(
            pair[0].address, MODEL_NAME, [r.pid for r in pair], duration_s=args.cost_s))
    finally:
        for router in pair:
            fleet.stop_router(router)
    single, two = result["single"], result["spread_two_routers_one_port"]
    log.print(f"  added p50 at c=1 {single['added_p50_ms_at_1']:.3f} ms; per router core: one router "
              f"{single['forwarded_per_router_core_s']:.0f}/s; two on one port {two['requests_per_s']:.0f}/s total, "
              f"{two['forwarded_per_router_core_s']:.0f}/s per core, CPU split "
              f"{[round(s or 0, 2) for s in two['router_cpu_share']]}")
    return result


# -------------------------------------------------------------------------------------------- main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: short windows")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--max-num-seqs", type=int, default=8, help="seats per worker")
    parser.add_argument("--num-tenants", type=int, default=16)
    parser.add_argument("--system-prompt-tokens", type=int, default=500)
    parser.add_argument("--cache-fraction", type=float, default=0.5,
                        help="share of the tenants' shared prefixes one worker's KV cache holds (beside a full batch)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--warmup-s", type=float, default=20.0,
                        help="Poisson arrivals before the measured ones (the same for every policy), not measured")
    parser.add_argument("--arrivals-s", type=float, default=50.0, help="measured Poisson arrivals per run")
    parser.add_argument("--load-fraction", type=float, default=0.8, help="arrival rate over the calibrated capacity")
    parser.add_argument("--rate-per-s", type=float, default=0.0,
                        help="skip the calibration: this arrival rate in every scenario (to compare router flags at one rate)")
    parser.add_argument("--calibration-s", type=float, default=20.0)
    parser.add_argument("--calibration-warmup-s", type=float, default=20.0,
                        help="before the calibration's window: the first wave of prompts fills the caches")
    parser.add_argument("--drain-timeout-s", type=float, default=60.0,
                        help="after the arrivals, how long stragglers get before they are cancelled")
    parser.add_argument("--cost-s", type=float, default=5.0, help="seconds per router-cost point")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--kv-router-flags", default="", help="extra router flags for the kv_aware routers")
    parser.add_argument("--explore-overlap-weights", default="16",
                        help="in multi_tenant, also kv_aware (events) with these kv_overlap_weight values, comma-separated "
                             "('' for none): an exploration beside the router's default, which the targets use")
    parser.add_argument("--saturation-scenarios", default="multi_tenant,unique",
                        help="where least_load also runs the calibration's closed loop (throughput at saturation)")
    parser.add_argument("--tenant-header", action="store_true", help="multi_tenant requests carry x-tenant-id")
    parser.add_argument("--skip-router-cost", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.warmup_s, args.arrivals_s, args.calibration_s, args.calibration_warmup_s = 10.0, 15.0, 8.0, 15.0
        args.drain_timeout_s, args.cost_s = 30.0, 2.0
    args.scenarios = _subset(parser, "--scenarios", args.scenarios, SCENARIOS)
    args.policies = _subset(parser, "--policies", args.policies, tuple(POLICIES))
    args.saturation_scenarios = [v.strip() for v in args.saturation_scenarios.split(",") if v.strip()]
    try:
        args.explore_overlap_weights = [float(v) for v in args.explore_overlap_weights.split(",") if v.strip()]
    except ValueError:
        parser.error("--explore-overlap-weights: numbers, comma-separated")
    if args.workers < 2:
        parser.error("--workers: at least 2 (there is nothing to route between with one)")
    return args


def _subset(parser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    wanted = {v.strip() for v in value.split(",") if v.strip()}
    if not wanted or wanted - set(allowed):
        parser.error(f"{flag}: some of {','.join(allowed)}")
    return [v for v in allowed if v in wanted]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    started = time.monotonic()
    created = datetime.now(timezone.utc)
    machine = machine_info(("torch", "grpcio", "numpy", "matplotlib"))

    from services.model_import import convert_gguf
    from services.worker.models.gguf_import import find_demo_gguf

    home = Path(tempfile.mkdtemp(prefix="tensoryard-bench-routing-"))
    scenarios: dict[str, dict] = {}
    cost = None
    with running_fleet(home, MODEL_NAME, WORKER_ENV) as fleet:
        folder = convert_gguf(find_demo_gguf(), home / "imports" / "SmolLM2-135M-Instruct", show_progress=False)
        builder = PromptBuilder(folder)
        sizing = fleet_sizing(builder, args)
        log.print(f"{args.workers} workers x {args.max_num_seqs} seats, 1 thread each; KV cache "
                  f"{sizing['num_kv_blocks']} blocks of {BLOCK_SIZE} tokens per worker (the shared prefixes of "
                  f"{sizing['cache_holds_tenant_prefixes']:.1f} tenants, {sizing['num_shared_prefix_blocks']} blocks "
                  f"each, beside a full batch's {sizing['num_private_blocks_per_sequence']} private blocks a sequence)")
        fleet.start_registry()
        version = fleet.register_model(folder, sizing["version_config"])
        for index, scenario in enumerate(args.scenarios):
            scenarios[scenario] = run_scenario(fleet, builder, scenario, index, args)
        if not args.skip_router_cost:
            if not fleet.workers:
                fleet.start_workers(args.workers)
            cost = measure_router_cost(fleet, args)
        worker_start_s = list(fleet.worker_start_s)
    wall_s = time.monotonic() - started

    report = {
        "benchmark": RESULTS_NAME,
        "model": "SmolLM2-135M-Instruct (float32, imported from its Q4_1 GGUF)",
        "created_utc": created.isoformat(),
        "wall_s": wall_s,
        "machine": {**machine, "load_avg_1_5_15m_at_end": list(os.getloadavg())},
        "options": vars(args),
        "fleet": {"model_name": MODEL_NAME, "version": version, "num_workers": args.workers, "threads_per_worker": 1,
                  "worker_env": WORKER_ENV, "block_size": BLOCK_SIZE, "kv_bytes_per_token": KV_BYTES_PER_TOKEN,
                  **sizing, "worker_start_s": worker_start_s,
                  "fresh_caches": "workers restarted before every run (calibrations included)",
                  "routers": "one router process per run, started after the workers, stopped after the run"},
        "policies": {p: policy_flags(p, args) for scenario in args.scenarios for p in scenario_policies(scenario, args)},
        "scenarios": scenarios,
        "router_cost": cost,
    }
    report["targets"] = target_rows(report)
    print_tables(report)
    log.print(f"wrote {write_json(report, created, RESULTS_NAME)}")
    log.print(f"wrote {plot(report, result_path(RESULTS_NAME, created, 'png'))}")
    log.print(f"the whole run took {wall_s / 60:.1f} minutes")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log.print("interrupted; the fleet was stopped")
        sys.exit(130)
