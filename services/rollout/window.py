"""Routers' metrics pages -> per (model, version) counts over a sliding window.

Routers expose cumulative counters; the window keeps the increase each scrape brought, per
source (router URL), so counts add up over several routers and survive a router restart (a
counter that went down started again from zero: its new value is the increase). A source seen for
the first time gives a baseline only, since its counts may be hours old; a series that appears on
a source already seen started at zero, so all of it is new (a canary's first requests).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

from services.rollout.decision import NOT_ERRORS, VersionCounts
from services.status.scrape import Snapshot

Key = tuple[str, str]  # (model, version)

# Deltas older than this are dropped whatever a policy's window says.
MAX_WINDOW_S = 600.0


def version_counts(snapshot: Snapshot) -> dict[Key, VersionCounts]:
    """One router page's cumulative counts per (model, version), summed over its workers."""
    requests: dict[Key, list[int]] = {}
    for labels, value in snapshot.samples.get("tensoryard_router_requests", ()):
        key = (labels.get("model", ""), labels.get("version", ""))
        entry = requests.setdefault(key, [0, 0])
        entry[0] += int(value)
        if labels.get("code") not in NOT_ERRORS:
            entry[1] += int(value)
    successes = _by_version(snapshot, "nv_inference_request_success")
    durations = _by_version(snapshot, "nv_inference_request_duration_us")
    return {
        key: VersionCounts(num_requests, num_errors, int(successes.get(key, 0)), durations.get(key, 0.0))
        for key, (num_requests, num_errors) in requests.items()
    }


def _by_version(snapshot: Snapshot, name: str) -> dict[Key, float]:
    totals: dict[Key, float] = {}
    for labels, value in snapshot.samples.get(name, ()):
        key = (labels.get("model", ""), labels.get("version", ""))
        totals[key] = totals.get(key, 0.0) + value
    return totals


@dataclass(frozen=True, slots=True)
class _Delta:
    at_s: float
    key: Key
    counts: VersionCounts


class CountsWindow:
    """Increases of every source's counters, kept for MAX_WINDOW_S, summed over any shorter window."""

    def __init__(self) -> None:
        self._last: dict[str, dict[Key, VersionCounts]] = {}
        self._deltas: collections.deque[_Delta] = collections.deque()

    def observe(self, source: str, counts: dict[Key, VersionCounts], now_s: float) -> None:
        previous = self._last.get(source)
        self._last[source] = counts
        if previous is not None:
            for key, current in counts.items():
                before = previous.get(key, VersionCounts())
                delta = current - before
                if delta.num_requests < 0 or delta.num_successes < 0:  # the router restarted
                    delta = current
                if delta.num_requests or delta.num_successes:
                    self._deltas.append(_Delta(now_s, key, delta))
        while self._deltas and self._deltas[0].at_s < now_s - MAX_WINDOW_S:
            self._deltas.popleft()

    def forget(self, source: str) -> None:
        """A source that is gone; seen again, it gives a baseline first."""
        self._last.pop(source, None)

    def totals(self, key: Key, window_s: float, now_s: float) -> VersionCounts:
        total = VersionCounts()
        for delta in reversed(self._deltas):
            if delta.at_s <= now_s - window_s:
                break
            if delta.key == key:
                total = total + delta.counts
        return total
