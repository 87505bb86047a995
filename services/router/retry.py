"""One retry budget per router: retries may add at most a fixed share of the traffic.

A token bucket (as Finagle's and Envoy's retry budgets): every request routed deposits `ratio`
tokens, the bucket also refills at `min_per_s` tokens a second so that a quiet router can still
retry, and it holds at most `max_tokens`. A retry, or a stream's migration to another replica, takes
one token. When replicas fail together (an outage, an overload), retries then add `ratio` of the load
at most, instead of multiplying it.
"""

from __future__ import annotations

import time


class RetryBudget:
    def __init__(self, ratio: float = 0.2, min_per_s: float = 10.0, max_tokens: float = 100.0, clock=time.monotonic):
        if ratio < 0 or min_per_s < 0 or max_tokens < 1:
            raise ValueError("retry budget: ratio and min_per_s must be >= 0, max_tokens >= 1")
        self.ratio = ratio
        self.min_per_s = min_per_s
        self.max_tokens = max_tokens
        self._clock = clock
        self._tokens = max_tokens
        self._refilled_at = clock()
        self.num_spent = 0
        self.num_denied = 0

    def on_request(self) -> None:
        self._tokens = min(self.max_tokens, self._tokens + self.ratio)

    def try_spend(self) -> bool:
        now = self._clock()
        self._tokens = min(self.max_tokens, self._tokens + (now - self._refilled_at) * self.min_per_s)
        self._refilled_at = now
        if self._tokens >= 1:
            self._tokens -= 1
            self.num_spent += 1
            return True
        self.num_denied += 1
        return False
