"""Admission control for an LLM worker: take a request only if it can be served well, else refuse it
at once with RESOURCE_EXHAUSTED and a retry pushback.

A request is weighed, in the gRPC handler and before it reaches the engine, against the engine's
latest published stats plus what was admitted since (the engine publishes after each step, so a
burst between two steps is counted too). It is refused when:

- the waiting queue already holds `max_num_waiting` requests, or its tenant holds more than its
  share of a queue that is more than half full (a noisy tenant cannot fill the queue for everyone);
- its prompt would take the queued prompt tokens past `max_num_queued_tokens`;
- the estimated wait before its first token exceeds the queue-wait bound: past that, queueing only
  adds latency to what is admitted (shed the excess instead, and keep admitted requests' time to
  first token near what the engine gives at capacity). The bound is `max_queue_wait_s`, or, left at
  0, "auto": one and a half full-batch steps, at least `MIN_AUTO_QUEUE_WAIT_S` — a queue just deep
  enough to keep the seats busy between arrivals (measured: at 10x capacity, accepted requests'
  time to first token stays within 2x of the figure at capacity; with two steps it came to 1.9x);
- it has a deadline that the estimated wait would make it miss: when it could finish in time on
  an idle replica but not behind this queue, or when even its first token would come too late.
  A request whose own max_tokens could not fit its deadline even on an idle replica is still taken
  when its first token can: it may stop early, and the engine ends it at the deadline, computing
  nothing after.

A resumed request (a generation another replica began, moved here by a router) is past admission
already: only the hard bounds on the queue apply to it, never the wait or deadline estimates.

Refusals for load are RESOURCE_EXHAUSTED (retry later, or on another replica). A deadline too short
for the request's first token even on an idle replica is DEADLINE_EXCEEDED at once: no replica and
no retry could meet it, and nothing is computed for it.

The estimate. The engine reports, per tenant, the waiting requests, their uncomputed prompt tokens
and the output tokens they are expected to generate; the expected remaining output of each running
sequence; its seats (`max_num_seqs`); and a step-time model (`engine/step_cost.py`). Work "ahead" of
a new request of tenant T is T's own waiting work plus, of each other tenant's, no more than T's
(the scheduler shares the engine fairly between tenants). The request gets a seat when enough
sequences ahead of it have finished: the k-th smallest remaining output among the running, or,
past those, whole waves of the average queued request. Prompts ahead of it are computed in the same
steps as far as the step's token budget allows; the steps of prefill beyond the budget delay it too.
Seat wait plus budget wait, in steps, times the step time at the batch size it will run in, is the
queue wait; its first token comes at the end of the step that computes its prompt.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from services.common.errors import DeadlineExceeded, Overloaded
from services.worker.engine.engine import EngineStats

MIN_RETRY_AFTER_S = 0.05
MAX_RETRY_AFTER_S = 30.0
MIN_AUTO_QUEUE_WAIT_S = 0.15
AUTO_QUEUE_WAIT_STEPS = 1.5


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_num_waiting: int = 1024
    max_num_queued_tokens: int = 262_144
    max_queue_wait_s: float = 0.0  # 0: auto (AUTO_QUEUE_WAIT_STEPS full-batch steps, at least MIN_AUTO_QUEUE_WAIT_S)

    def __post_init__(self) -> None:
        if self.max_num_waiting < 1:
            raise ValueError(f"max_num_waiting must be >= 1, not {self.max_num_waiting}")
        if self.max_num_queued_tokens < 1:
            raise ValueError(f"max_num_queued_tokens must be >= 1, not {self.max_num_queued_tokens}")
        if self.max_queue_wait_s < 0:
            raise ValueError(f"max_queue_wait_s must be >= 0 (0: auto), not {self.max_queue_wait_s}")


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A request as admission weighs it."""

    tenant: str
    num_prompt_tokens: int
    max_tokens: int
    ignore_eos: bool = False


@dataclass(frozen=True, slots=True)
class Estimate:
    queue_wait_s: float  # before its prefill starts
    first_token_s: float  # its time to first token
    finish_s: float  # its last token, if it runs to max_tokens


@dataclass(slots=True)
class _Pending:
    submission: int  # the engine loop's submission number
    item: WorkItem
    expected_output_tokens: int


class AdmissionController:
    """Owned by the worker's event loop: `update` with each engine report, `admit` per request."""

    def __init__(self, config: AdmissionConfig):
        self.config = config
        self._stats: EngineStats | None = None
        self._pending: deque[_Pending] = deque()
        self.num_rejected = 0

    def update(self, stats: EngineStats, num_requests_received: int) -> None:
        """A new engine snapshot; it includes every submission up to num_requests_received."""
        self._stats = stats
        while self._pending and self._pending[0].submission <= num_requests_received:
            self._pending.popleft()

    def admitted(self, item: WorkItem, submission: int) -> None:
        """Record a request handed to the engine (its submission number), until a snapshot has it."""
        self._pending.append(_Pending(submission, item, self._expected_output(item)))

    def queue_wait_bound_s(self, stats: EngineStats) -> float:
        if self.config.max_queue_wait_s:
            return self.config.max_queue_wait_s
        return max(MIN_AUTO_QUEUE_WAIT_S, AUTO_QUEUE_WAIT_STEPS * stats.step_cost.step_s(max(stats.max_num_seqs, 1)))

    def admit(self, item: WorkItem, deadline_remaining_s: float | None, resumed: bool = False) -> Estimate | None:
        """Raises Overloaded (with a retry pushback) if the request should not be queued now, or
        DeadlineExceeded if no replica could meet its deadline."""
        stats = self._stats
        if stats is None or stats.step_cost is None:
            return None  # no report yet (warming up): nothing to weigh against
        config = self.config
        num_waiting = stats.num_waiting + len(self._pending)
        if num_waiting >= config.max_num_waiting:
            self._refuse(f"{num_waiting} requests are waiting already (at most {config.max_num_waiting})",
                         self._estimate(stats, item).queue_wait_s)
        queues = self._tenant_work(stats)
        own_waiting = queues.get(item.tenant, (0, 0, 0, 0))[0]
        num_active_tenants = len(queues | {item.tenant: None})
        fair_share = config.max_num_waiting / num_active_tenants
        if num_waiting >= config.max_num_waiting / 2 and own_waiting >= fair_share:
            self._refuse(f"tenant {item.tenant or '(default)'!r} holds {own_waiting} of the {num_waiting} waiting "
                         f"requests, more than its share ({fair_share:.0f}) of a queue this full",
                         self._estimate(stats, item).queue_wait_s)
        queued_tokens = stats.num_queued_prompt_tokens + sum(p.item.num_prompt_tokens for p in self._pending)
        if queued_tokens + item.num_prompt_tokens > config.max_num_queued_tokens:
            self._refuse(f"{queued_tokens} prompt tokens are queued already (at most {config.max_num_queued_tokens})",
                         self._estimate(stats, item).queue_wait_s)
        estimate = self._estimate(stats, item, queues)
        if resumed:
            return estimate
        bound_s = self.queue_wait_bound_s(stats)
        if estimate.queue_wait_s > bound_s:
            self._refuse(f"the estimated wait for a seat is {estimate.queue_wait_s:.2f} s "
                         f"(this replica queues at most {bound_s:.2f} s of work)", estimate.queue_wait_s - bound_s)
        if deadline_remaining_s is not None:
            self._check_deadline(stats, item, estimate, deadline_remaining_s)
        return estimate

    def estimate(self, item: WorkItem) -> Estimate | None:
        if self._stats is None or self._stats.step_cost is None:
            return None
        return self._estimate(self._stats, item)

    # -- the estimate ----------------------------------------------------------------------------

    def _tenant_work(self, stats: EngineStats) -> dict[str, tuple[int, int, int, int]]:
        """(waiting requests, their prompt tokens, their expected output tokens, running sequences)
        per active tenant, pending requests counted as waiting."""
        work = {t: [q.num_waiting, q.num_prompt_tokens, q.num_output_tokens, q.num_running]
                for t, q in stats.tenant_queues.items() if q.num_waiting or q.num_running}
        for pending in self._pending:
            entry = work.setdefault(pending.item.tenant, [0, 0, 0, 0])
            entry[0] += 1
            entry[1] += pending.item.num_prompt_tokens
            entry[2] += pending.expected_output_tokens
        return {t: tuple(w) for t, w in work.items()}

    def _estimate(self, stats: EngineStats, item: WorkItem, queues=None) -> Estimate:
        queues = self._tenant_work(stats) if queues is None else queues
        cost = stats.step_cost
        num_seats = max(stats.max_num_seqs, 1)
        own_n, own_p, own_m, own_running = queues.get(item.tenant, (0, 0, 0, 0))
        own_total_m = own_m + self._expected_output(item)
        ahead_n, ahead_p, ahead_m = float(own_n), float(own_p), float(own_m)
        for tenant, (n, p, m, _) in queues.items():
            if tenant == item.tenant or n == 0:
                continue
            share = 1.0 if m <= own_total_m else own_total_m / m  # fair order: no more of theirs than ours
            ahead_n += n * share
            ahead_p += p * share
            ahead_m += m * share
        running = stats.running_remaining_tokens
        free_seats = max(num_seats - len(running), 0)
        position = math.ceil(ahead_n) + 1  # which seat assignment this request would be
        fair_seats = num_seats / len(queues | {item.tenant: None})
        over_share = any(q[3] > fair_seats for t, q in queues.items() if t != item.tenant)
        if position <= free_seats:
            seat_wait_steps = 0.0
        elif over_share and own_running + own_n + 1 <= fair_seats:
            # Below its share of the seats while another tenant is above it: the scheduler takes a
            # seat from that tenant for it (one fairness preemption a step), so it waits for those of
            # its own tenant ahead of it, not for anyone's sequence to finish.
            seat_wait_steps = float(own_n)
        elif position - free_seats <= len(running):
            seat_wait_steps = float(running[position - free_seats - 1])
        else:  # past the running ones: waves of the average queued request through every seat
            mean_queued_m = ahead_m / ahead_n if ahead_n else self._expected_output(item)
            waves = math.ceil((position - free_seats - len(running)) / num_seats)
            seat_wait_steps = (running[-1] if running else 0) + waves * mean_queued_m
        running_prefill_tokens = max(stats.num_queued_prompt_tokens - sum(q[1] for q in queues.values()), 0)
        prefill_ahead = ahead_p + running_prefill_tokens
        budget = max(stats.max_num_batched_tokens, 1)
        budget_steps = math.floor(prefill_ahead / budget)  # full-budget steps of prefill before its own
        batch = min(num_seats, len(running) + math.ceil(ahead_n) + 1)
        step_s = cost.step_s(batch)
        queue_wait_s = (seat_wait_steps * step_s
                        + budget_steps * (step_s + budget * cost.per_prefill_token_s))
        shared_prefill = prefill_ahead - budget_steps * budget  # computed in the step with its own
        first_token_s = queue_wait_s + step_s + cost.per_prefill_token_s * (shared_prefill + item.num_prompt_tokens)
        finish_s = first_token_s + (item.max_tokens - 1) * step_s
        return Estimate(queue_wait_s, first_token_s, finish_s)

    def _expected_output(self, item: WorkItem) -> int:
        if item.ignore_eos or self._stats is None:
            return item.max_tokens
        return max(1, round(item.max_tokens * self._stats.expected_output_fraction))

    def _check_deadline(self, stats: EngineStats, item: WorkItem, estimate: Estimate, remaining_s: float) -> None:
        cost = stats.step_cost
        alone_first_token_s = cost.step_s(1, item.num_prompt_tokens)
        if alone_first_token_s > remaining_s:
            self.num_rejected += 1
            raise DeadlineExceeded(
                f"its deadline is in {remaining_s:.3f} s, sooner than its first token could come even on an "
                f"idle replica (about {alone_first_token_s:.3f} s)"
            )
        alone_s = alone_first_token_s + (item.max_tokens - 1) * cost.step_s(1)
        if estimate.finish_s > remaining_s and alone_s <= remaining_s:
            self._refuse(f"its deadline is in {remaining_s:.2f} s, and behind the work queued here it would "
                         f"finish in about {estimate.finish_s:.2f} s", estimate.finish_s - remaining_s)
        if estimate.first_token_s > remaining_s:
            self._refuse(f"its deadline is in {remaining_s:.2f} s, and its first token would come in about "
                         f"{estimate.first_token_s:.2f} s", estimate.first_token_s - remaining_s)

    def _refuse(self, reason: str, retry_after_s: float) -> None:
        self.num_rejected += 1
        retry_after_s = min(max(retry_after_s, MIN_RETRY_AFTER_S), MAX_RETRY_AFTER_S)
        raise Overloaded(f"this replica is at capacity: {reason}; retry later or elsewhere",
                         retry_after_s=retry_after_s)
