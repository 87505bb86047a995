"""The router's bound on requests in flight per model, shared fairly between tenants.

Each model may have at most `max_in_flight` requests in flight through this router. Past half of
that, a tenant already holding its share (the bound over the number of tenants in flight) is refused
too, so a tenant sending ten times another's rate cannot take every slot. A refusal is
RESOURCE_EXHAUSTED at once, with a retry pushback: the queue is the workers' to keep (they know how
long it is), the router only stops an unbounded pile-up in front of them.
"""

from __future__ import annotations

import contextlib
from collections import Counter

from services.common.errors import Overloaded

RETRY_AFTER_S = 0.2


class InFlightLimiter:
    def __init__(self, max_in_flight: int):
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, not {max_in_flight}")
        self.max_in_flight = max_in_flight
        self._by_model: Counter[str] = Counter()
        self._by_tenant: dict[str, Counter[str]] = {}
        self.num_rejected = 0

    def in_flight(self, model_name: str) -> int:
        return self._by_model[model_name]

    def in_flight_by_model(self) -> dict[str, int]:
        """Requests in flight per model; safe from another thread (one C-level copy)."""
        return dict(self._by_model)

    @contextlib.contextmanager
    def hold(self, model_name: str, tenant: str):
        self.acquire(model_name, tenant)
        try:
            yield
        finally:
            self.release(model_name, tenant)

    def acquire(self, model_name: str, tenant: str) -> None:
        total = self._by_model[model_name]
        tenants = self._by_tenant.setdefault(model_name, Counter())
        if total >= self.max_in_flight:
            self._refuse(f"{total} requests for '{model_name}' are in flight through this router "
                         f"(at most {self.max_in_flight})")
        share = self.max_in_flight / max(len(tenants) + (tenant not in tenants), 1)
        if total >= self.max_in_flight / 2 and tenants[tenant] >= share:
            self._refuse(f"tenant {tenant or '(default)'!r} has {tenants[tenant]} of the {total} requests for "
                         f"'{model_name}' in flight, its share ({share:.0f}) while this router is this busy")
        self._by_model[model_name] = total + 1
        tenants[tenant] += 1

    def holds_share(self, model_name: str, tenant: str) -> bool:
        """Whether the tenant has at least its share (1 / tenants) of the model's requests in flight."""
        tenants = self._by_tenant.get(model_name)
        if not tenants:
            return True
        return tenants[tenant] * len(tenants) >= self._by_model[model_name]

    def release(self, model_name: str, tenant: str) -> None:
        self._by_model[model_name] -= 1
        tenants = self._by_tenant[model_name]
        tenants[tenant] -= 1
        if tenants[tenant] <= 0:
            del tenants[tenant]

    def _refuse(self, reason: str) -> None:
        self.num_rejected += 1
        raise Overloaded(f"the router is at capacity: {reason}; retry later", retry_after_s=RETRY_AFTER_S)
