"""Rates and windowed percentiles from two snapshots of one page, as PromQL's `rate()` and
`histogram_quantile()` would compute them over the window between the two.

Every function is pure and answers None when the family is absent from the page (a figure shown
as "-"), as opposed to 0 when the family is there and nothing happened. A series missing from the
earlier snapshot counts from 0 (labelled children appear on their first increment); a series that
went down was reset (the process restarted) and counts from 0 again, as Prometheus does.

`select` arguments are predicates on a sample's labels (see `labels_match`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from services.status.scrape import Labels, Snapshot

Select = Callable[[Labels], bool]
# Cumulative count by bucket upper bound (`le`, +Inf included), as a histogram's buckets are.
Buckets = dict[float, float]


def everything(labels: Labels) -> bool:
    return True


def labels_match(**wanted: str | Iterable[str]) -> Select:
    """Samples whose label equals (or is among) each wanted value; a sample without that label
    matches too, so worker-level families (one model per worker) pass a per-model filter."""
    allowed = {k: {v} if isinstance(v, str) else set(v) for k, v in wanted.items()}

    def select(labels: Labels) -> bool:
        return all(labels[k] in values for k, values in allowed.items() if k in labels)

    return select


def _series(snapshot: Snapshot, sample_name: str, select: Select) -> dict[tuple, float]:
    series = {}
    for labels, value in snapshot.samples.get(sample_name, ()):
        if select(labels):
            series[tuple(sorted(labels.items()))] = value
    return series


def counter_delta(before: Snapshot, after: Snapshot, name: str, select: Select = everything) -> float | None:
    """How much the counter `name` (with or without `_total`) grew between the two snapshots,
    summed over the selected series."""
    name = name.removesuffix("_total")
    if name not in after.families:
        return None
    old = _series(before, name, select)
    delta = 0.0
    for key, value in _series(after, name, select).items():
        previous = old.get(key, 0.0)
        delta += value - previous if value >= previous else value
    return delta


def counter_rate(before: Snapshot, after: Snapshot, name: str, select: Select = everything) -> float | None:
    """Per second over the window; None for an absent family or an empty window."""
    delta = counter_delta(before, after, name, select)
    window_s = after.taken_at_s - before.taken_at_s
    if delta is None or window_s <= 0:
        return None
    return delta / window_s


def gauge_sum(snapshot: Snapshot, name: str, select: Select = everything) -> float | None:
    if name not in snapshot.families:
        return None
    return sum(_series(snapshot, name, select).values())


def gauge_mean(snapshot: Snapshot, name: str, select: Select = everything) -> float | None:
    values = list(_series(snapshot, name, select).values())
    if name not in snapshot.families or not values:
        return None
    return sum(values) / len(values)


def gauge_label(snapshot: Snapshot, name: str, label: str, select: Select = everything) -> str | None:
    """The `label` of the series set to 1 (e.g. the current phase of a one-hot gauge)."""
    for labels, value in snapshot.samples.get(name, ()):
        if value == 1 and label in labels and select(labels):
            return labels[label]
    return None


def histogram_delta(before: Snapshot, after: Snapshot, name: str, select: Select = everything) -> Buckets | None:
    """The buckets of the observations made between the two snapshots, summed over the selected
    series; None for an absent family."""
    if name not in after.families:
        return None
    bucket = f"{name}_bucket"
    old = _by_series(_series(before, bucket, select))
    delta: Buckets = {}
    for key, buckets in _by_series(_series(after, bucket, select)).items():
        previous = old.get(key, {})
        if buckets.get(math.inf, 0.0) < previous.get(math.inf, 0.0):
            previous = {}  # reset
        for le, count in buckets.items():
            delta[le] = delta.get(le, 0.0) + count - previous.get(le, 0.0)
    return delta


def _by_series(samples: dict[tuple, float]) -> dict[tuple, Buckets]:
    """Bucket samples (label tuples with `le`) grouped by their series, the others' labels."""
    grouped: dict[tuple, Buckets] = {}
    for key, value in samples.items():
        le = next((v for k, v in key if k == "le"), None)
        if le is None:
            continue
        series = tuple(item for item in key if item[0] != "le")
        grouped.setdefault(series, {})[float(le)] = value
    return grouped


def merge_buckets(parts: Iterable[Buckets | None]) -> Buckets | None:
    """Sum bucket counts by bound (replicas of one model share the bounds); None if all are."""
    merged: Buckets | None = None
    for part in parts:
        if part is None:
            continue
        merged = merged if merged is not None else {}
        for le, count in part.items():
            merged[le] = merged.get(le, 0.0) + count
    return merged


def quantile(q: float, buckets: Buckets | None) -> float | None:
    """PromQL's histogram_quantile: linear within the bucket the rank falls in, the first bucket
    starting at 0, the +Inf bucket answered with the highest finite bound. None without samples."""
    if not buckets or math.inf not in buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[math.inf]
    if total <= 0:
        return None
    rank = q * total
    lower, count_below = 0.0, 0.0
    for index, upper in enumerate(bounds):
        count = buckets[upper]
        if count >= rank:
            if upper == math.inf:
                return bounds[index - 1] if index > 0 else None
            if index == 0 and upper <= 0:
                return upper
            if count == count_below:
                return upper
            return lower + (upper - lower) * (rank - count_below) / (count - count_below)
        lower, count_below = upper, count
    return None
