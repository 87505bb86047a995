"""The LLM benchmark's report: static batching simulated under the open-loop arrivals, the ratios,
and the tables (`bench_llm.py` measures; this module only turns measurements into a report)."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.table import Table

from bench.llm_reference import simulate_static_batching

MODEL = "SmolLM2-135M-Instruct"
TARGET_ROUTER_OVER_STATIC = 3.0


def simulate(transformers: dict[int, dict], serving: dict) -> list[dict]:
    """Static batching at each measured batch size, on each open-loop point's own arrival times."""
    rows = []
    for point in serving["open_loop"]:
        arrivals_s = serving["arrivals_s"][point["rate_per_s"]]
        for batch_size in sorted(transformers):
            rows.append({"rate_per_s": point["rate_per_s"], "tensoryard_ttft_p99_ms": point["ttft_p99_ms"],
                         **simulate_static_batching(arrivals_s, batch_size, transformers)})
    return rows


def compare(serving: dict, transformers: dict[int, dict], engine_only: dict | None, simulated: list[dict],
            concurrencies: list[int]) -> dict:
    points = {(p["target"], p["concurrency"]): p for p in serving["closed_loop"]}
    top = max(concurrencies)
    by_concurrency = []
    for concurrency in concurrencies:
        router, direct = points[("router", concurrency)], points[("direct", concurrency)]
        static = transformers.get(concurrency)
        by_concurrency.append({
            "concurrency": concurrency,
            "router_over_direct_tokens_per_s": _ratio(router["output_tokens_per_s"], direct["output_tokens_per_s"]),
            "router_over_transformers_static_tokens_per_s": _ratio(
                router["output_tokens_per_s"], static and static["output_tokens_per_s"]),
        })
    ttft = [{"rate_per_s": row["rate_per_s"], "static_batch_size": row["batch_size"],
             "static_over_tensoryard_ttft_p99": _ratio(row["ttft_p99_ms"], row["tensoryard_ttft_p99_ms"])}
            for row in simulated]
    router_over_static_top = by_concurrency[-1]["router_over_transformers_static_tokens_per_s"]
    return {
        "by_concurrency": by_concurrency,
        "top_concurrency": top,
        "router_over_transformers_static_top": router_over_static_top,
        "target_router_over_static": TARGET_ROUTER_OVER_STATIC,
        "meets_target": None if router_over_static_top is None else router_over_static_top >= TARGET_ROUTER_OVER_STATIC,
        "direct_over_engine_only_top": _ratio(points[("direct", top)]["output_tokens_per_s"],
                                              engine_only and engine_only["output_tokens_per_s"]),
        "ttft_p99_static_over_tensoryard": ttft,
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 100 else f"{value:.1f}"


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_pct(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.1f}%"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table(title: str, headers: tuple[str, ...], rows: list[tuple]) -> Table:
    table = Table(title=title)
    for index, header in enumerate(headers):
        table.add_column(header, justify="left" if index == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def print_tables(report: dict) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    options, serving = report["options"], report["serving"]
    latency_headers = ("TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "lat p50")

    def latencies(p: dict) -> tuple[str, ...]:
        return tuple(format_ms(p[k]) for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "latency_p50_ms"))

    console.print(_table(
        f"{MODEL}, closed loop, {options['max_tokens']} output tokens, {options['duration_s']:g}s per point (ms)",
        ("target", "conc", "out tok/s", "req/s", *latency_headers, "peak KV", "cached", "errors"),
        [(p["target"], str(p["concurrency"]), f"{p['output_tokens_per_s']:.1f}", f"{p['requests_per_s']:.2f}",
          *latencies(p), format_pct(p["peak_kv_use"]), format_pct(p["prefix_cached_fraction"]),
          str(p["num_errors"] + p["num_wrong_length"])) for p in serving["closed_loop"]],
    ))
    console.print(_table(
        f"Open loop through the router, Poisson arrivals, {options['open_loop_s']:g}s per rate (ms; latencies over "
        f"all requests sent)",
        ("rate/s", "sent", "req/s", "out tok/s", *latency_headers, "peak KV", "peak wait", "unfinished", "errors"),
        [(f"{p['rate_per_s']:g}", str(p["num_requests_sent"]), f"{p['requests_per_s']:.2f}",
          f"{p['output_tokens_per_s']:.1f}", *latencies(p), format_pct(p["peak_kv_use"]), _count(p["peak_num_waiting"]),
          str(p["num_cancelled"]), str(p["num_errors"] + p["num_wrong_length"])) for p in serving["open_loop"]],
    ))
    inprocess_rows = [
        (f"transformers {'1 at a time' if b == 1 else f'static {b}'}", str(r["num_requests"]),
         f"{r['output_tokens_per_s']:.1f}", format_ms(r["mean_first_token_ms"]), format_ms(r["mean_batch_ms"]),
         format_ms(r["itl_p50_ms"]), format_ms(r["itl_p99_ms"]))
        for b, r in report["transformers"].items()
    ]
    if engine := report["engine_only"]:
        inprocess_rows.append(
            (f"engine only ({engine['num_requests']} at once)", str(engine["num_requests"]),
             f"{engine['output_tokens_per_s']:.1f}", format_ms(engine["all_first_tokens_ms"]), format_ms(engine["elapsed_s"] * 1e3),
             format_ms(engine["decode_step_p50_ms"]), "-"))
    if inprocess_rows:
        console.print(_table(
            f"In-process, torch threads {report['torch_num_threads']} (ms; first token: mean per batch, for the engine "
            f"the last request's; ITL for the engine: decode step p50)",
            ("system", "requests", "out tok/s", "first token", "batch", "ITL p50", "ITL p99"), inprocess_rows))
    if report["static_batching_simulated"]:
        console.print(_table(
            "Static batching under the open-loop arrivals, SIMULATED from the measured generate() times (ms)",
            ("rate/s", "batch", "TTFT p50", "TTFT p99", "lat p50", "lat p99", "tensoryard TTFT p99", "overloaded"),
            [(f"{r['rate_per_s']:g}", str(r["batch_size"]), format_ms(r["ttft_p50_ms"]), format_ms(r["ttft_p99_ms"]),
              format_ms(r["latency_p50_ms"]), format_ms(r["latency_p99_ms"]), format_ms(r["tensoryard_ttft_p99_ms"]),
              "yes" if r["overloaded"] else "no") for r in report["static_batching_simulated"]],
        ))
    comparisons = report["comparisons"]
    rows = [(f"router / direct tok/s, c={c['concurrency']}", _x(c["router_over_direct_tokens_per_s"]))
            for c in comparisons["by_concurrency"]]
    rows += [(f"router / transformers static tok/s, c={c['concurrency']}",
              _x(c["router_over_transformers_static_tokens_per_s"]))
             for c in comparisons["by_concurrency"] if c["concurrency"] > 1]
    meets = {None: "-", True: "meets", False: "BELOW"}[comparisons["meets_target"]]
    rows.append((f"target: router c={comparisons['top_concurrency']} / static-{comparisons['top_concurrency']} "
                 f">= {TARGET_ROUTER_OVER_STATIC:g}x", meets))
    rows.append((f"direct / engine only tok/s, c={comparisons['top_concurrency']}",
                 _x(comparisons["direct_over_engine_only_top"])))
    rows += [(f"TTFT p99 static-{t['static_batch_size']} (simulated) / tensoryard, {t['rate_per_s']:g}/s",
              _x(t["static_over_tensoryard_ttft_p99"])) for t in comparisons["ttft_p99_static_over_tensoryard"]]
    console.print(_table("Ratios", ("", "value"), rows))
