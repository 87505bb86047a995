"""One load view per replica: what the worker last reported, plus what this router sent since.

Workers stream `LoadReport`s (services/worker/load_reports.py): a report whenever something changed,
at most every 50 ms, and a heartbeat every 250 ms. A replica is routable while it reports SERVING
and its reports keep coming; a silent stream (a stopped or hung process) makes it unroutable after
`stale_after_s`, long before its discovery lease would expire. Between two reports the router adds
the requests it has routed there, so a burst does not all land on the replica that looked idlest,
and takes off those of its own that ended there: a report may be a step old, and at capacity the
seat a request just freed is the one its caller's next request should take (read from the report
alone, every replica would look full and the router would refuse it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from protos.tensoryard.v1 import worker_pb2

SERVING = "SERVING"
DRAINING = "DRAINING"


@dataclass(slots=True)
class ReplicaLoad:
    # Reports: None until the first arrives. A worker that cannot stream (UNIMPLEMENTED) never sends
    # any: `reports` is then False and the router goes by its own counts alone.
    stats: worker_pb2.WorkerStats | None = None
    reports: bool = True
    reported_at_s: float = 0.0
    added_at_s: float = field(default_factory=time.monotonic)
    # This router's own view.
    num_outstanding: int = 0  # requests in flight on this replica from this router
    num_routed_since_report: int = 0
    num_ended_since_report: int = 0  # of this router's requests there (answered, refused or failed)
    num_blocks_routed_since_report: int = 0
    refused_since_report: bool = False  # it answered RESOURCE_EXHAUSTED since: full, whatever ended
    block_size: int = 16  # the replica's KV block size, from its KV events

    def on_report(self, stats: worker_pb2.WorkerStats, now_s: float) -> None:
        self.stats = stats
        self.reported_at_s = now_s
        self.num_routed_since_report = 0
        self.num_ended_since_report = 0
        self.num_blocks_routed_since_report = 0
        self.refused_since_report = False

    def on_routed(self, num_prompt_blocks: int = 0) -> None:
        self.num_routed_since_report += 1
        self.num_blocks_routed_since_report += num_prompt_blocks

    def on_sent(self) -> None:
        self.num_outstanding += 1

    def on_refused(self) -> None:
        """The replica refused one of this router's requests as full: whatever seat ended since
        the report is taken, so it stays saturated until it reports again."""
        self.refused_since_report = True

    def on_ended(self) -> None:
        """One of this router's requests there is over, whatever its outcome: no longer on the
        replica. (Its end may reach the router just after the report that already left it out;
        the count is then one low until the next report, at most a heartbeat away.)"""
        self.num_outstanding -= 1
        self.num_ended_since_report += 1

    @property
    def _net_routed_since_report(self) -> int:
        return self.num_routed_since_report - self.num_ended_since_report

    @property
    def state(self) -> str:
        return self.stats.state if self.stats is not None else SERVING

    def routable(self, now_s: float, stale_after_s: float) -> bool:
        """Taking new requests: reporting SERVING, and its reports are not overdue."""
        if not self.reports:
            return True
        if self.stats is None:  # just added: its stream is connecting
            return now_s - self.added_at_s < stale_after_s
        return self.stats.state == SERVING and now_s - self.reported_at_s < stale_after_s

    @property
    def saturated(self) -> bool:
        """The replica's own estimate of a new request's wait is past what it admits, and no seat
        has freed there since it said so (more of this router's requests ended than it sent), or
        one has and it refused a request since. Without that last clause, at ten times capacity a
        single request ending sent every request to the replica until its next report, and the
        workers refused 38% of them, each a call their engine thread shares the GIL with."""
        stats = self.stats
        return (stats is not None and stats.queue_wait_bound_s > 0
                and stats.estimated_queue_wait_s > stats.queue_wait_bound_s
                and (self._net_routed_since_report >= 0 or self.refused_since_report))

    @property
    def retry_after_s(self) -> float:
        stats = self.stats
        return max(stats.estimated_queue_wait_s - stats.queue_wait_bound_s, 0.05) if stats else 0.05

    def silent_for_s(self, now_s: float) -> float:
        if not self.reports:
            return 0.0
        return now_s - (self.reported_at_s if self.stats is not None else self.added_at_s)

    @property
    def num_requests(self) -> float:
        """Requests on the replica: running and waiting as reported, plus those routed since, or (no
        reports) this router's own outstanding ones."""
        if self.stats is None:
            return float(self.num_outstanding)
        reported = self.stats.num_running + self.stats.num_waiting
        if not self.stats.max_num_seqs:  # not an LLM: its queue and what it is computing
            reported = self.stats.queue_depth + self.stats.num_in_flight
        return max(reported + self._net_routed_since_report, 0)

    @property
    def occupancy(self) -> float:
        """Requests on the replica over its seats (max_num_seqs; 64 when it has not said)."""
        seats = self.stats.max_num_seqs if self.stats is not None and self.stats.max_num_seqs else 64
        return self.num_requests / seats

    @property
    def num_active_blocks(self) -> float:
        """The decode work on the replica, in KV blocks: each running sequence's whole context (a
        prefix shared by many sequences counts for each: each one's attention reads it every step),
        the prompts queued, and the prompts routed there since the last report."""
        if self.stats is None:
            return float(self.num_blocks_routed_since_report)
        context = self.stats.num_context_tokens or self.stats.num_kv_blocks_used * self.block_size
        queued = self.stats.num_queued_prompt_tokens
        return (context + queued) / self.block_size + self.num_blocks_routed_since_report
