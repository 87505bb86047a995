"""The report of bench/bench_llm_peers.py: tensoryard's ratios to each peer, the tables and the plot
(the benchmark measures; this module only turns its points into a report)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from rich.console import Console

from bench.llm_report import _ratio, _table, _x, format_ms

SYSTEM_NAMES = {"tensoryard": "tensoryard", "vllm": "vLLM", "llamacpp": "llama.cpp"}
COLORS = {"tensoryard": "tab:blue", "vllm": "tab:orange", "llamacpp": "tab:green"}
# A system's other dtypes: the same hue family, so tensoryard and vLLM in one dtype read as a pair.
DTYPE_COLORS = {("tensoryard", "bfloat16"): "navy", ("tensoryard", "float16"): "tab:cyan",
                ("tensoryard", "int8"): "tab:purple", ("tensoryard", "int4"): "tab:pink",
                ("vllm", "bfloat16"): "tab:red", ("vllm", "float16"): "tab:brown"}
PEERS = ("vllm", "llamacpp")
CHECK_TEXT_CHARS = 60


def _name(point: dict) -> str:
    """"tensoryard bfloat16", "vLLM float32", "llama.cpp q4_1"; the bare name for a point without a dtype."""
    dtype = point.get("dtype")
    return f"{SYSTEM_NAMES[point['target']]} {dtype}" if dtype else SYSTEM_NAMES[point["target"]]


def _color(target: str, dtype: str | None) -> str:
    return DTYPE_COLORS.get((target, dtype), COLORS[target])


def _where(point: dict) -> tuple[str, float]:
    """The point's place on its axis: ("closed", concurrency) or ("open", rate)."""
    return (point["loop"], point["concurrency"] if point["loop"] == "closed" else point["rate_per_s"])


def compare(points: list[dict]) -> list[dict]:
    """At each dtype, concurrency and rate tensoryard ran: its output tok/s and TTFT p50 over each
    peer's in the same dtype (llama.cpp: in its own, whatever tensoryard's)."""
    by_key = {(*_where(p), p["target"], p.get("dtype")): p for p in points}
    llamacpp = {_where(p): p for p in points if p["target"] == "llamacpp"}
    rows = []
    for point in points:
        if point["target"] != "tensoryard":
            continue
        loop, at = _where(point)
        row = {"dtype": point.get("dtype"), "loop": loop, "concurrency" if loop == "closed" else "rate_per_s": at}
        for peer in PEERS:
            other = (llamacpp.get((loop, at)) if peer == "llamacpp"
                     else by_key.get((loop, at, peer, point.get("dtype")))) or {}
            row[f"tensoryard_over_{peer}_tokens_per_s"] = _ratio(point["output_tokens_per_s"],
                                                                 other.get("output_tokens_per_s"))
            row[f"tensoryard_over_{peer}_ttft_p50"] = _ratio(point["ttft_p50_ms"], other.get("ttft_p50_ms"))
        rows.append(row)
    return rows


def print_tables(systems: dict[str, dict], points: list[dict], comparisons: list[dict], title: str,
                 targets: list[dict] = ()) -> None:
    console = Console(width=None if sys.stdout.isatty() else 170)
    headers = ("out tok/s", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "lat p50", "errors", "wrong len", "load 1m")

    def cells(p: dict) -> tuple[str, ...]:
        return (f"{p['output_tokens_per_s']:.1f}",
                *(format_ms(p[k]) for k in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms", "latency_p50_ms")),
                str(p["num_errors"]), str(p["num_wrong_length"]), f"{p['load_avg_1m_after']:.2f}")

    closed = sorted((p for p in points if p["loop"] == "closed"), key=lambda p: p["concurrency"])
    console.print(_table(f"{title}\nClosed loop (ms)", ("system", "conc", *headers),
                         [(_name(p), str(p["concurrency"]), *cells(p)) for p in closed]))
    opened = sorted((p for p in points if p["loop"] == "open"), key=lambda p: p["rate_per_s"])
    console.print(_table("Open loop, Poisson arrivals (ms; latencies over all requests sent)",
                         ("system", "rate/s", "sent", "unfinished", *headers),
                         [(_name(p), f"{p['rate_per_s']:g}", str(p["num_requests_sent"]),
                           str(p["num_cancelled"]), *cells(p)) for p in opened]))
    console.print(_table(
        "tensoryard / peer, vLLM in the same dtype (tok/s: above 1 is faster; TTFT: below 1 is faster)",
        ("dtype", "point", *(f"{what} / {SYSTEM_NAMES[peer]}" for peer in PEERS for what in ("tok/s", "TTFT p50"))),
        [(row.get("dtype") or "-", f"c={row['concurrency']}" if row["loop"] == "closed" else f"{row['rate_per_s']:g}/s",
          *(_x(row[f"tensoryard_over_{peer}_{what}"]) for peer in PEERS for what in ("tokens_per_s", "ttft_p50")))
         for row in comparisons]))
    weights = [(key, system) for key, system in systems.items() if "weight_bytes" in system]
    if weights:
        console.print(_table("tensoryard worker: tensoryard_worker_weight_bytes", ("system", "dtype label", "MiB"),
                             [(key, system["weight_dtype_reported"], f"{system['weight_bytes'] / 2**20:.1f}")
                              for key, system in weights]))
    if targets:
        console.print(_table("Targets (issue 13), this run", ("target", "measured", "bound", "met"),
                             [(t["target"], _x(t["value"]), t["bound"],
                               "-" if t["met"] is None else "yes" if t["met"] else "NO") for t in targets]))
    console.print(_table("Check: one greedy request on prompt 0", ("system", "prompt tokens", "output tokens",
                                                                   "finish", "text"),
                         [_check_row(target, system) for target, system in systems.items()]))


def _check_row(key: str, system: dict) -> tuple[str, ...]:
    """`key`: a target, or "target:dtype" (bench/llm_peer_dtypes.py)."""
    target, _, dtype = key.partition(":")
    name = f"{SYSTEM_NAMES[target]} {dtype}".strip()
    if "check" not in system:
        return name, "-", "-", "-", system.get("skipped", "")
    check = system["check"]
    return (name, f"{check['prompt_tokens']} (expected {check['prompt_tokens_expected']})",
            f"{check['output_tokens']} (expected {check['output_tokens_expected']})", check["finish_reason"],
            repr(check["text"][:CHECK_TEXT_CHARS]))


def plot(points: list[dict], title: str, path: Path) -> Path:
    """Throughput, TTFT and ITL against concurrency, and TTFT against the Poisson rate; p50 solid, p99 dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    figure, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    throughput_axis, ttft_axis, itl_axis, rate_axis = axes.flat
    systems = dict.fromkeys((p["target"], p.get("dtype")) for p in points)
    for target, dtype in systems:
        mine = [p for p in points if p["target"] == target and p.get("dtype") == dtype]
        closed = sorted((p for p in mine if p["loop"] == "closed"), key=lambda p: p["concurrency"])
        opened = sorted((p for p in mine if p["loop"] == "open"), key=lambda p: p["rate_per_s"])
        name, color = _name(mine[0]), _color(target, dtype)
        concurrency = [p["concurrency"] for p in closed]
        throughput_axis.plot(concurrency, [p["output_tokens_per_s"] for p in closed], "o-", color=color, label=name)
        for axis, metric, x, series in ((ttft_axis, "ttft", concurrency, closed), (itl_axis, "itl", concurrency, closed),
                                        (rate_axis, "ttft", [p["rate_per_s"] for p in opened], opened)):
            axis.plot(x, [p[f"{metric}_p50_ms"] for p in series], "o-", color=color, label=f"{name} p50")
            axis.plot(x, [p[f"{metric}_p99_ms"] for p in series], "s--", color=color, label=f"{name} p99")
    concurrencies = sorted({p["concurrency"] for p in points if p["loop"] == "closed"})
    throughput_axis.set(title="throughput", ylabel="output tokens/s", ylim=(0, None))
    ttft_axis.set(title="time to first token", ylabel="ms")
    itl_axis.set(title="inter-token latency", ylabel="ms")
    for axis in (throughput_axis, ttft_axis, itl_axis):
        axis.set(xlabel="concurrency (closed loop)", xscale="log")
        # Plain numbers at the measured concurrencies only, not log-scale minor labels.
        axis.set_xticks(concurrencies, [str(c) for c in concurrencies])
        axis.xaxis.set_minor_formatter(NullFormatter())
    rate_axis.set(title="time to first token, open loop", xlabel="Poisson rate (requests/s)", ylabel="ms")
    for axis in (ttft_axis, itl_axis, rate_axis):
        _log_y_when_drawable(axis)
    for axis in axes.flat:
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _log_y_when_drawable(axis) -> None:
    """Log scale, unless no point has a value (a window too short for any first token): matplotlib
    cannot draw a log axis over nothing."""
    from matplotlib.ticker import LogFormatter, ScalarFormatter

    if any(np.isfinite(np.asarray(line.get_ydata(), dtype=float)).any() for line in axis.get_lines()):
        axis.set_yscale("log")
        axis.yaxis.set_major_formatter(ScalarFormatter())  # plain milliseconds, not powers of ten
        axis.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
