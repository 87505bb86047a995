"""`tensoryard status`: the live view, or one snapshot (`--once`, `--json`).

A snapshot takes two rounds of scrapes `interval_s` apart (start to start): rates and windowed
percentiles are differences between two readings of the counters and histogram buckets, so even
`--once` takes that long. Live, each refresh compares the newest round with the one before.
The JSON shape is described in services/status/__init__.py.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.live import Live

from services.status.report import build_report
from services.status.scrape import (
    Round,
    consul_router_metrics,
    default_router_metrics,
    metrics_url,
    take_round,
    up_router_metrics,
)
from services.status.view import render


@dataclass(frozen=True, slots=True)
class StatusOptions:
    registry: str = "127.0.0.1:7070"
    # Router /metrics URLs (or host:port); empty: those `tensoryard up` in `home` lists, else
    # `up`'s default port on the registry's host.
    router_metrics: tuple[str, ...] = ()
    home: Path | None = None
    interval_s: float = 2.0
    timeout_s: float = 1.0  # per page, and at least 1 s for the discovery call
    once: bool = False
    json: bool = False  # implies once
    security: object = None  # services.common.tls.ChannelSecurity of the registry call; None: plaintext
    consul: object = None  # services.status.consul_source.ConsulSource: list from Consul, not the registry

    def __post_init__(self) -> None:
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be > 0, not {self.interval_s}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, not {self.timeout_s}")

    def router_urls(self) -> list[str]:
        """Read anew each round: `up` may start after the view, and rewrites its targets."""
        if self.router_metrics:
            return [metrics_url(u) for u in self.router_metrics]
        if self.consul is not None:
            return consul_router_metrics(self.consul, self.timeout_s)
        from_up = up_router_metrics(self.home) if self.home is not None else []
        return from_up or [default_router_metrics(self.registry)]


def run(options: StatusOptions, out=None) -> int:
    """0, or 1 when a snapshot could not list the workers (the registry did not answer)."""
    out = out or sys.stdout
    if options.once or options.json:
        before = _take(options)
        _sleep_until(before.started_s + options.interval_s)
        report = build_report(options.registry, before.round, _take(options).round)
        if options.json:
            print(json.dumps(asdict(report), indent=2), file=out, flush=True)
        else:
            Console(file=out).print(render(report))
        return 1 if report.discovery_error else 0
    return _live(options, Console(file=out))


def _live(options: StatusOptions, console: Console) -> int:
    try:
        previous = _take(options)
        with Live(render(build_report(options.registry, None, previous.round)), console=console,
                  auto_refresh=False) as live:
            while True:
                _sleep_until(previous.started_s + options.interval_s)
                current = _take(options)
                live.update(render(build_report(options.registry, previous.round, current.round)), refresh=True)
                previous = current
    except KeyboardInterrupt:  # Ctrl-C is how the live view ends
        return 0


@dataclass(frozen=True, slots=True)
class _Timed:
    round: Round
    started_s: float  # time.monotonic()


def _take(options: StatusOptions) -> _Timed:
    started_s = time.monotonic()
    return _Timed(take_round(options.registry, options.router_urls(), options.timeout_s, options.security,
                             options.consul), started_s)


def _sleep_until(monotonic_s: float) -> None:
    time.sleep(max(0.0, monotonic_s - time.monotonic()))
