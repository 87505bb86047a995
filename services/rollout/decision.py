"""When a canary is rolled back: its error rate or latency against the stable version's.

A pure function of the two versions' counts over the policy's window (window.py makes them from
the routers' metrics), so every case is a unit test. Errors are the codes a broken version
causes; RESOURCE_EXHAUSTED (refused for load: the fleet's, not the version's doing) and
CANCELLED (the caller went away) are not errors, though they count in the requests.
"""

from __future__ import annotations

from dataclasses import dataclass

from protos.tensoryard.v1 import registry_pb2

# promote's default bounds: a 30 s window once the canary has 20 requests in it; 5 points more
# errors than stable, or twice its mean latency, rolls back.
DEFAULT_ROLLBACK = registry_pb2.RollbackPolicy(
    window_s=30.0, min_requests=20, max_error_rate_increase=0.05, max_latency_ratio=2.0,
)
NOT_ERRORS = frozenset({"OK", "RESOURCE_EXHAUSTED", "CANCELLED"})


@dataclass(frozen=True, slots=True)
class VersionCounts:
    """One version's requests over a window, summed over routers and replicas."""

    num_requests: int = 0  # every final code
    num_errors: int = 0  # codes outside NOT_ERRORS
    num_successes: int = 0  # nv_inference_request_success
    success_duration_us: float = 0.0  # nv_inference_request_duration_us (successful requests)

    @property
    def error_rate(self) -> float:
        return self.num_errors / self.num_requests if self.num_requests else 0.0

    @property
    def mean_latency_s(self) -> float | None:
        return self.success_duration_us / self.num_successes / 1e6 if self.num_successes else None

    def __add__(self, other: VersionCounts) -> VersionCounts:
        return VersionCounts(
            self.num_requests + other.num_requests, self.num_errors + other.num_errors,
            self.num_successes + other.num_successes, self.success_duration_us + other.success_duration_us,
        )

    def __sub__(self, other: VersionCounts) -> VersionCounts:
        return VersionCounts(
            self.num_requests - other.num_requests, self.num_errors - other.num_errors,
            self.num_successes - other.num_successes, self.success_duration_us - other.success_duration_us,
        )


@dataclass(frozen=True, slots=True)
class Verdict:
    roll_back: bool
    reason: str  # why, with the figures (the audit log's text); also why not, while waiting


def judge(canary: VersionCounts, stable: VersionCounts, bounds: registry_pb2.RollbackPolicy) -> Verdict:
    """Roll back once the canary has min_requests in the window and its error rate exceeds the
    stable one's by more than max_error_rate_increase, or its mean successful latency is more than
    max_latency_ratio times the stable one's (0: no latency bound; no stable successes: nothing to
    compare the latency with, so no latency verdict)."""
    if canary.num_requests < max(bounds.min_requests, 1):
        return Verdict(False, f"canary has {canary.num_requests} of the {bounds.min_requests} requests needed")
    increase = canary.error_rate - stable.error_rate
    if increase > bounds.max_error_rate_increase:
        return Verdict(True, (
            f"canary error rate {canary.error_rate:.1%} ({canary.num_errors}/{canary.num_requests}) exceeds "
            f"stable's {stable.error_rate:.1%} ({stable.num_errors}/{stable.num_requests}) by "
            f"{increase * 100:.1f} points, more than the {bounds.max_error_rate_increase * 100:g} allowed "
            f"(window {bounds.window_s:g} s)"))
    canary_s, stable_s = canary.mean_latency_s, stable.mean_latency_s
    if bounds.max_latency_ratio > 0 and canary_s is not None and stable_s:
        ratio = canary_s / stable_s
        if ratio > bounds.max_latency_ratio:
            return Verdict(True, (
                f"canary mean latency {canary_s * 1e3:.1f} ms is {ratio:.2f}x stable's {stable_s * 1e3:.1f} ms, "
                f"more than the {bounds.max_latency_ratio:g}x allowed (window {bounds.window_s:g} s)"))
    return Verdict(False, "canary within bounds")
