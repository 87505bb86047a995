"""`Sequence`: one request's tokens and its progress through the engine."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from services.worker.engine.sampler import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # an end-of-sequence or stop token, or a stop string
    LENGTH = "length"  # max_tokens, or the model's max length
    ABORT = "abort"  # the caller cancelled
    DEADLINE = "deadline"  # the request's deadline passed


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    token_ids: list[int]  # the prompt, then each sampled token
    num_prompt_tokens: int
    params: SamplingParams
    priority: int = 0  # lower runs first
    tenant: str = ""  # whose request: the scheduler shares the engine fairly between tenants ("" the default)
    arrival: int = 0  # admission order: the tie-break within a priority, and "newest" for preemption
    deadline_s: float | None = None  # absolute, on the scheduler's clock (time.monotonic by default)
    generator: torch.Generator | None = None  # per-request seed: draws do not depend on the batch
    draw_seed: int = 0  # the device sampler's key: the request's seed, or one drawn by the engine
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    abort_requested: bool = False  # set by abort(); the scheduler finishes the sequence next step
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache; the rest are computed next
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache on first admission
    num_preemptions: int = 0
    block_table: list[int] = field(default_factory=list)  # cache block ids, in token order
    block_hashes: list[bytes] = field(default_factory=list)  # chained hashes of token_ids' full blocks
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    num_charged_prompt_tokens: int = 0  # prompt tokens charged to the tenant; a recompute is not charged again
    # The request's clock (time.monotonic): when the engine took it, first ran it, sampled its
    # first and its latest token here. A resumed request's first token is its first on this replica.
    arrival_time_s: float = 0.0
    first_scheduled_time_s: float | None = None
    first_token_time_s: float | None = None
    last_token_time_s: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def sort_key(self) -> tuple[int, int]:
        """Scheduling order: priority, then age. The largest key is the first preemption victim."""
        return (self.priority, self.arrival)
