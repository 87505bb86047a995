"""`StepInputs`: what one step computes, as plain data — all the runner and the sampler read.

The scheduler decides with `Sequence` objects; what leaves it for the runner is a description of
what changed since the runner last heard (as vLLM v1's `SchedulerOutput`): sequences it has not seen
(admitted, re-admitted after a preemption, resumed from another replica) come with every token and
block they hold; sequences it has seen come with only the tokens sampled and the blocks allocated
since. The runner keeps the rest in its own persistent buffers, one row (slot) per sequence, and
frees a row when the sequence's id is released (finished, aborted, preempted). Nothing here is live:
a runner in another process (or on another rank) could be sent the same objects.

`StepDescriber` is the scheduler's record of what the runner has been told, the one place that
turns scheduling decisions into this description.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from services.worker.engine.sampler import SamplingParams
    from services.worker.engine.sequence import Sequence


@dataclass(frozen=True, slots=True)
class NewSequence:
    """A sequence the runner holds nothing for: it takes a slot and all of this."""

    request_id: str
    token_ids: list[int]  # every token it has: the prompt, and output so far when resumed or re-admitted
    block_ids: list[int]  # its whole block table
    num_computed_tokens: int  # tokens whose K/V are in the cache already (a prefix-cache hit)
    num_prompt_tokens: int  # of token_ids, the prompt's; the rest were generated (here or elsewhere)


@dataclass(frozen=True, slots=True)
class RunningSequence:
    """A sequence the runner holds a slot for: what grew since it was last scheduled."""

    request_id: str
    new_token_ids: list[int]  # tokens sampled since then, appended to its slot's tokens
    new_block_ids: list[int]  # blocks allocated since then, appended to its slot's block table
    num_computed_tokens: int


@dataclass(frozen=True, slots=True)
class SamplingRow:
    """What the sampler needs for one sampling sequence; the token lists only when penalties read them."""

    params: SamplingParams
    generator: torch.Generator | None  # the request's own (seeded) draws; None: the engine's
    token_ids: list[int] = field(default_factory=list)  # prompt and output: repetition penalty only
    output_token_ids: list[int] = field(default_factory=list)  # frequency and presence penalties only
    # The device sampler's draw: the request's seed (its own, or one the engine gave it) and how
    # many tokens it has sampled, wherever they were sampled (the draw's counter).
    seed: int = 0
    num_drawn: int = 0


@dataclass(slots=True)
class StepInputs:
    """One step, in batch order: sequence b computes num_scheduled_tokens[b] tokens starting at its
    num_computed_tokens[b]-th, and samples if sample_flags[b]."""

    request_ids: list[str] = field(default_factory=list)
    num_computed_tokens: list[int] = field(default_factory=list)
    num_scheduled_tokens: list[int] = field(default_factory=list)
    sample_flags: list[bool] = field(default_factory=list)
    new_seqs: list[NewSequence] = field(default_factory=list)
    running_seqs: list[RunningSequence] = field(default_factory=list)
    # Finished, aborted or preempted since the last step, among those the runner had been told of:
    # their slots are free before this step's new sequences take theirs.
    released_ids: list[str] = field(default_factory=list)
    sampling: list[SamplingRow] = field(default_factory=list)  # one per sampling sequence, in batch order

    @property
    def num_seqs(self) -> int:
        return len(self.request_ids)


class StepDescriber:
    """What the runner has been told of each sequence, and the description of each step."""

    def __init__(self) -> None:
        self._num_sent: dict[str, tuple[int, int]] = {}  # request_id -> (tokens, blocks) the runner holds
        self._released: list[str] = []

    def release(self, request_id: str) -> None:
        """The sequence left running (finished, aborted, preempted); its slot is freed next step."""
        if self._num_sent.pop(request_id, None) is not None:
            self._released.append(request_id)

    def describe(self, seqs: list[Sequence], num_scheduled_tokens: list[int], sample_flags: list[bool]) -> StepInputs:
        step = StepInputs(num_scheduled_tokens=list(num_scheduled_tokens), sample_flags=list(sample_flags),
                          released_ids=self._released)
        self._released = []
        for seq, sample in zip(seqs, sample_flags):
            step.request_ids.append(seq.request_id)
            step.num_computed_tokens.append(seq.num_computed_tokens)
            sent = self._num_sent.get(seq.request_id)
            if sent is None:
                step.new_seqs.append(NewSequence(seq.request_id, list(seq.token_ids), list(seq.block_table),
                                                 seq.num_computed_tokens, seq.num_prompt_tokens))
            else:
                step.running_seqs.append(RunningSequence(seq.request_id, seq.token_ids[sent[0]:],
                                                         seq.block_table[sent[1]:], seq.num_computed_tokens))
            self._num_sent[seq.request_id] = (seq.num_tokens, len(seq.block_table))
            if sample:
                step.sampling.append(_sampling_row(seq))
        return step


def _sampling_row(seq: Sequence) -> SamplingRow:
    p = seq.params
    token_ids = list(seq.token_ids) if p.repetition_penalty != 1.0 else []
    output_token_ids = seq.output_token_ids if p.frequency_penalty or p.presence_penalty else []
    return SamplingRow(p, seq.generator, token_ids, output_token_ids, seq.draw_seed, seq.num_output_tokens)
