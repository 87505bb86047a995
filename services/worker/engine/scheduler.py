"""Iteration-level scheduling: which sequences compute which tokens this step.

Policy. There are no prefill and decode phases: every sequence has tokens whose K/V are not yet in
the cache (its whole prompt at first, one sampled token afterwards) and each step lets some of them
catch up, within a budget of max_num_batched_tokens. Running sequences go first, in (priority,
arrival) order, so decodes are never starved by prefills; a prompt longer than the budget left is
cut into chunks (chunked prefill) and finishes over several steps. When a running sequence needs a
block and none is free, the running sequence with the largest (priority, arrival) — the lowest
priority, newest — is preempted by recompute: its blocks are freed and it returns to waiting with
every token it has (prompt and output) to be computed again; tokens already sent are not resent.
Waiting sequences are admitted in (priority, arrival) order while the budget, max_num_seqs and free
blocks allow, taking what they can from the prefix cache; none are admitted in a step that
preempted. Aborted sequences and those past their deadline are finished at the start of the next
step. Finish, abort, deadline and preemption all release blocks through `KVCacheManager.free`.
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field
from typing import Callable

from services.worker.engine.config import SchedulerConfig
from services.worker.engine.kv_cache import KVCacheManager
from services.worker.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(slots=True)
class SchedulerOutput:
    """What one step computes: all the runner reads, and what the engine reports besides."""

    # Sequences computing tokens this step, in batch order; the runner lays their tokens out so.
    scheduled_seqs: list[Sequence] = field(default_factory=list)
    # New tokens each computes: a prompt chunk, a whole prompt, or 1 for a decode.
    num_scheduled_tokens: list[int] = field(default_factory=list)
    # Whether each reaches its last token this step, so the step samples its next token.
    sample_flags: list[bool] = field(default_factory=list)
    # Sent back to waiting this step; their blocks are already free.
    preempted_seqs: list[Sequence] = field(default_factory=list)
    # Finished before running (abort, deadline); the engine reports them.
    finished_seqs: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(self.num_scheduled_tokens)

    @property
    def sampled_seqs(self) -> list[Sequence]:
        """The sequences that get a new token, in the order of the logits rows."""
        return [seq for seq, sample in zip(self.scheduled_seqs, self.sample_flags) if sample]

    def add(self, seq: Sequence, num_tokens: int) -> None:
        self.scheduled_seqs.append(seq)
        self.num_scheduled_tokens.append(num_tokens)
        self.sample_flags.append(seq.num_computed_tokens + num_tokens == seq.num_tokens)


class Scheduler:
    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache: KVCacheManager,
        max_model_len: int,
        eos_token_ids: tuple[int, ...] = (),
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.kv_cache = kv_cache
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.clock = clock
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key
        self.requests: dict[str, Sequence] = {}  # every unfinished sequence
        self._next_arrival = 0
        self.num_preemptions = 0
        self.num_chunked_prefills = 0  # times a prompt was cut short by the token budget

    def add(self, seq: Sequence) -> None:
        seq.arrival = self._next_arrival
        self._next_arrival += 1
        self.requests[seq.request_id] = seq
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def abort(self, request_id: str) -> None:
        """Marks the request; its blocks are freed when the next step is scheduled."""
        seq = self.requests.get(request_id)
        if seq is not None:
            seq.abort_requested = True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._reap(out)
        budget = self._schedule_running(out, self.config.max_num_batched_tokens)
        if not out.preempted_seqs:
            self._schedule_waiting(out, budget)
        return out

    def update(self, out: SchedulerOutput, sampled_token_ids: list[int]) -> list[Sequence]:
        """Records the step's computed and sampled tokens; returns the sequences that finished."""
        for seq, num_tokens in zip(out.scheduled_seqs, out.num_scheduled_tokens):
            seq.num_computed_tokens += num_tokens
            self.kv_cache.cache_full_blocks(seq)
        finished = []
        for seq, token_id in zip(out.sampled_seqs, sampled_token_ids, strict=True):
            seq.token_ids.append(token_id)
            reason = self._stop_reason(seq, token_id)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.is_finished:
            return
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        self.kv_cache.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self.requests[seq.request_id]

    def _reap(self, out: SchedulerOutput) -> None:
        now = self.clock()
        for seq in list(self.requests.values()):
            if seq.abort_requested:
                reason = FinishReason.ABORT
            elif seq.deadline_s is not None and now >= seq.deadline_s:
                reason = FinishReason.DEADLINE
            else:
                continue
            self.finish(seq, reason)
            out.finished_seqs.append(seq)

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_tokens = min(seq.num_uncomputed_tokens, budget)
            while not self.kv_cache.allocate(seq, seq.num_computed_tokens + num_tokens):
                victim = self.running[-1]  # lowest priority, newest; never one scheduled already
                self._preempt(victim, out)
                if victim is seq:
                    return budget
            self._count_chunk(seq, num_tokens)
            out.add(seq, num_tokens)
            budget -= num_tokens
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            cached_blocks = self.kv_cache.find_cached_blocks(seq)
            num_cached_tokens = len(cached_blocks) * self.kv_cache.block_size
            num_tokens = min(seq.num_tokens - num_cached_tokens, budget)
            if num_tokens < seq.num_tokens - num_cached_tokens and not self.config.enable_chunked_prefill:
                return
            if not self.kv_cache.allocate(seq, num_cached_tokens + num_tokens, cached_blocks):
                return
            self.kv_cache.record_admission(seq, num_cached_tokens)
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = num_cached_tokens
            seq.num_computed_tokens = num_cached_tokens
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=lambda s: s.sort_key)
            self._count_chunk(seq, num_tokens)
            out.add(seq, num_tokens)
            budget -= num_tokens

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.kv_cache.free(seq)
        seq.num_computed_tokens = 0  # recompute: prompt and output so far become the prompt
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)
        out.preempted_seqs.append(seq)
        self.num_preemptions += 1

    def _count_chunk(self, seq: Sequence, num_tokens: int) -> None:
        if num_tokens < seq.num_uncomputed_tokens:
            self.num_chunked_prefills += 1

    def _stop_reason(self, seq: Sequence, token_id: int) -> FinishReason | None:
        params = seq.params
        if token_id in params.stop_token_ids or (not params.ignore_eos and token_id in self.eos_token_ids):
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None
