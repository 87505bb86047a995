"""The scheduler's view of tenants: who is waiting (`WaitingQueue`), what each has been served
(`TenantCounters`, the virtual token counters) and their load (`TenantStats`). The policy that
charges and compares the counters is the scheduler's (scheduler.py, "Fairness")."""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Iterator, Mapping

from services.worker.engine.sequence import Sequence


def _sort_key(seq: Sequence) -> tuple[int, int]:
    return seq.sort_key


@dataclass(slots=True)
class TenantStats:
    """One active tenant's load, for admission control and metrics."""

    num_waiting: int = 0  # sequences waiting: new, or preempted
    num_queued_tokens: int = 0  # tokens those still have to compute (after a preemption, prompt and output)
    num_running: int = 0
    service: float = 0.0  # its virtual token counter: weighted tokens computed for it


class WaitingQueue:
    """Every waiting sequence, one list per tenant in (priority, arrival) order.

    Supports len(), `in` and iteration (tenant by tenant: cheap, for sums over the queue), and
    compares equal to a list of the same sequences in (priority, arrival) order."""

    def __init__(self) -> None:
        self._by_tenant: dict[str, list[Sequence]] = {}
        self._num_seqs = 0

    def __len__(self) -> int:
        return self._num_seqs

    def __iter__(self) -> Iterator[Sequence]:
        return itertools.chain.from_iterable(self._by_tenant.values())

    def __contains__(self, seq: object) -> bool:
        return any(s is seq for s in self._by_tenant.get(getattr(seq, "tenant", None), ()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, WaitingQueue):
            other = sorted(other, key=_sort_key)
        if isinstance(other, (list, tuple)):
            return sorted(self, key=_sort_key) == list(other)
        return NotImplemented

    __hash__ = None  # mutable

    def add(self, seq: Sequence) -> None:
        bisect.insort(self._by_tenant.setdefault(seq.tenant, []), seq, key=_sort_key)
        self._num_seqs += 1

    def remove(self, seq: Sequence) -> None:
        queue = self._by_tenant[seq.tenant]
        queue.remove(seq)
        if not queue:
            del self._by_tenant[seq.tenant]
        self._num_seqs -= 1

    def by_tenant(self) -> Mapping[str, list[Sequence]]:
        """tenant -> its waiting sequences, in (priority, arrival) order; only tenants with some."""
        return MappingProxyType(self._by_tenant)

    def first(self, counters: Mapping[str, float]) -> Sequence | None:
        """The next to admit: best priority, then the tenant with the smallest counter, then arrival."""
        heads = (queue[0] for queue in self._by_tenant.values())
        return min(heads, key=lambda s: (s.priority, counters[s.tenant], s.arrival), default=None)


class TenantCounters:
    """Virtual token counters: every active tenant's (one with a sequence waiting or running), and
    idle ones' while in debt. A tenant becoming active is lifted to the floor, so idling banks no credit."""

    def __init__(self, idle_ttl_s: float, clock: Callable[[], float]):
        self.idle_ttl_s = idle_ttl_s
        self.clock = clock
        self.counters: dict[str, float] = {}  # tenant -> service so far: every active tenant, idle ones in debt
        self.active: dict[str, int] = {}  # active tenant -> its unfinished sequences
        self._idle_since: dict[str, float] = {}  # idle tenant with a counter kept -> when it left; oldest first
        self._last_floor = 0.0  # the counter of the last tenant to go idle: the floor while none is active

    def activate(self, tenant: str) -> None:
        """Counts a new sequence of tenant; a tenant becoming active is lifted to the floor."""
        num_seqs = self.active.get(tenant, 0)
        if num_seqs == 0:
            self.counters[tenant] = max(self.counters.get(tenant, 0.0), self._floor())
            self._idle_since.pop(tenant, None)
        self.active[tenant] = num_seqs + 1

    def deactivate(self, tenant: str) -> None:
        """Counts a finished sequence of tenant; an idle tenant keeps its counter only while in debt."""
        self.active[tenant] -= 1
        if self.active[tenant] > 0:
            return
        del self.active[tenant]
        counter = self.counters[tenant]
        if not self.active:
            self._last_floor = max(self._last_floor, counter)
        if counter <= self._floor():  # on return it is lifted to at least the floor anyway
            del self.counters[tenant]
        else:
            self._idle_since[tenant] = self.clock()

    def _floor(self) -> float:
        """What a tenant becoming active is lifted to: the smallest active counter, else the last one's."""
        return min((self.counters[t] for t in self.active), default=self._last_floor)

    def forget_idle(self, now: float) -> None:
        """Drops the counters (the debts) of tenants idle for longer than fair_idle_counter_ttl_s."""
        while self._idle_since:
            tenant, since = next(iter(self._idle_since.items()))
            if now - since < self.idle_ttl_s:
                return
            del self._idle_since[tenant], self.counters[tenant]
