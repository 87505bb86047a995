"""The rich view of a StatusReport: a header line, one table of models with their replicas as
indented rows, and one of routers. Sized for 80 columns: p50 and p99 share a cell, figures never
wrap; the first column (names, addresses) folds when space runs short."""

from __future__ import annotations

import time

from rich import box
from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from services.status.report import Figures, ModelStatus, ReplicaStatus, RouterStatus, StatusReport

MISSING = "-"
PHASE_STYLES = {"ready": "green", "serving": "green", "stalled": "yellow", "draining": "yellow",
                "loading": "yellow", "failed": "red", "unreachable": "red"}


def render(report: StatusReport) -> RenderableType:
    parts: list[RenderableType] = [_header(report), _models_table(report)]
    if not report.models:
        parts.append(Text("no models: discovery lists no worker and no router saw a request", style="dim"))
    if report.routers:
        parts += [Text(""), _routers_table(report.routers)]
    return Group(*parts)


def _header(report: StatusReport) -> Text:
    header = Text()
    header.append("tensoryard", style="bold")
    header.append(f" · registry {report.registry}")
    num_workers = sum(m.num_replicas for m in report.models)
    header.append(f" · {num_workers} worker{'s' if num_workers != 1 else ''}")
    window = f"{report.window_s:.1f} s" if report.window_s is not None else "sampling…"
    header.append(f" · window {window} · {time.strftime('%H:%M:%S', time.localtime(report.taken_at_unix_s))}")
    if report.discovery_error:
        header.append(f"\ndiscovery: {report.discovery_error}", style="red")
    return header


def _models_table(report: StatusReport) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0),
                  caption="latency, ttft: p50/p99 over the window; kv: KV blocks in use",
                  caption_justify="left")
    # The only column that gives way when space runs short (figures never wrap).
    table.add_column("model · replica", overflow="fold")
    for name in ("rdy", "req/s", "err/s", "latency", "ttft", "tok/s", "queue", "kv"):
        table.add_column(name, justify="right", no_wrap=True)
    for model in report.models:
        table.add_row(_model_label(model), _ready(model), *_figure_cells(model.figures), style="bold")
        for replica in model.replicas:
            table.add_row(_replica_label(replica), _serving(replica), *_figure_cells(replica.figures))
    return table


def _model_label(model: ModelStatus) -> Text:
    return Text(f"{model.model} v{model.version}" if model.version else model.model)


def _replica_label(replica: ReplicaStatus) -> Text:
    phase = (replica.phase or MISSING).lower()
    label = Text(f"└ {replica.worker_id[:8]} ")
    label.append(phase, style=PHASE_STYLES.get(phase, ""))
    label.append(f"\n  {replica.address}", style="dim")
    return label


def _ready(model: ModelStatus) -> str:
    ready = MISSING if model.num_ready_replicas is None else str(model.num_ready_replicas)
    return f"{ready}/{model.num_replicas}"


def _serving(replica: ReplicaStatus) -> Text:
    if replica.serving is None:
        return Text(MISSING)
    return Text("yes", style="green") if replica.serving else Text("no", style="red")


def _figure_cells(figures: Figures) -> list[str]:
    return [
        _number(figures.requests_per_s),
        _number(figures.errors_per_s),
        _durations(figures.latency_p50_s, figures.latency_p99_s),
        _durations(figures.ttft_p50_s, figures.ttft_p99_s),
        _number(figures.tokens_per_s),
        _number(figures.num_requests_waiting),
        _percent(figures.kv_cache_usage_perc),
    ]


def _routers_table(routers: list[RouterStatus]) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, padding=(0, 0))
    table.add_column("router metrics", overflow="fold")
    for name in ("state", "req/s", "err/s", "rejected/s", "in flight"):
        table.add_column(name, justify="right", no_wrap=True)
    for router in routers:
        state = Text("up", style="green") if router.reachable else Text("unreachable", style="red")
        table.add_row(router.metrics_url, state, _number(router.requests_per_s), _number(router.errors_per_s),
                      _number(router.rejected_per_s), _number(router.num_in_flight))
    return table


def _number(value: float | None) -> str:
    if value is None:
        return MISSING
    if value == 0:
        return "0"
    if abs(value) < 10:
        return f"{value:.1f}"
    if abs(value) < 10_000:
        return f"{value:.0f}"
    return f"{value / 1000:.0f}k"


def _durations(p50_s: float | None, p99_s: float | None) -> str:
    """"3.1/9.8ms": both in the unit that suits the larger."""
    if p50_s is None and p99_s is None:
        return MISSING
    largest = max(v for v in (p50_s, p99_s) if v is not None)
    scale, unit = (1.0, "s") if largest >= 1 else (1000.0, "ms")
    return f"{_short(p50_s, scale)}/{_short(p99_s, scale)}{unit}"


def _short(value_s: float | None, scale: float) -> str:
    if value_s is None:
        return MISSING
    value = value_s * scale
    return f"{value:.1f}" if value < 10 else f"{value:.0f}"


def _percent(fraction: float | None) -> str:
    if fraction is None:
        return MISSING
    percent = fraction * 100
    return f"{percent:.1f}%" if 0 < percent < 10 else f"{percent:.0f}%"
