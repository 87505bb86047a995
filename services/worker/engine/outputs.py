"""What the engine hands out: each request's outputs (tokens, text, usage, timings), the record of
its latest step and its stats for admission, load reports and metrics. Plain data, importable
without the engine's model code."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.worker.engine.sampler import TokenLogprobs
from services.worker.engine.step_cost import StepCost


@dataclass(slots=True)
class Usage:
    num_prompt_tokens: int
    num_completion_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass(frozen=True, slots=True)
class RequestTimings:
    """Where a finished request's time went, on the engine's clock (time.monotonic, seconds).
    first_scheduled_s and first_token_s are None when it ended before getting that far."""

    arrival_s: float
    first_scheduled_s: float | None
    first_token_s: float | None
    finished_s: float
    num_preemptions: int

    @property
    def queue_s(self) -> float:
        return (self.first_scheduled_s if self.first_scheduled_s is not None else self.finished_s) - self.arrival_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.arrival_s

    @property
    def prefill_s(self) -> float | None:
        if self.first_scheduled_s is None or self.first_token_s is None:
            return None
        return self.first_token_s - self.first_scheduled_s

    @property
    def decode_s(self) -> float | None:
        return None if self.first_token_s is None else self.finished_s - self.first_token_s

    @property
    def inference_s(self) -> float | None:
        return None if self.first_scheduled_s is None else self.finished_s - self.first_scheduled_s

    @property
    def e2e_s(self) -> float:
        return self.finished_s - self.arrival_s


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One engine step, for the worker's metrics."""

    started_s: float  # time.monotonic()
    duration_s: float
    num_seqs: int  # sequences in the batch
    num_tokens: int  # tokens computed (prefill chunks and decodes)
    num_prefill_tokens: int
    num_sampled: int
    num_preemptions: int  # during this step's scheduling
    # For each sampled token that was not its sequence's first here: the time since the one before.
    inter_token_latencies_s: tuple[float, ...] = ()


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens sampled this step (at most one today)
    text_delta: str  # whole characters only; never text at or past a stop string
    finish_reason: str | None  # "stop", "length", "abort", "deadline"; None while running
    usage: Usage
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked
    timings: RequestTimings | None = None  # on the final output only

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True, slots=True)
class TenantQueue:
    """One tenant's waiting work: what admission control weighs a new request of that tenant against."""

    num_waiting: int = 0
    num_prompt_tokens: int = 0  # not yet computed
    num_output_tokens: int = 0  # still to generate, expected (see EngineStats.expected_output_fraction)
    num_running: int = 0


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int
    num_chunked_prefills: int
    num_prefix_query_tokens: int
    num_prefix_hit_tokens: int
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    block_size: int = 0
    num_queued_prompt_tokens: int = 0  # prompt tokens not yet computed, waiting or mid-prefill
    num_context_tokens: int = 0  # over the running sequences, each counted in full
    num_generated_tokens: int = 0  # since the engine started
    # Output tokens each running sequence is still expected to generate, smallest first.
    running_remaining_tokens: tuple[int, ...] = ()
    tenant_queues: dict[str, TenantQueue] = field(default_factory=dict)
    # Of max_tokens, the share requests that may stop early (no ignore_eos) have used, on average.
    expected_output_fraction: float = 1.0
    step_cost: StepCost | None = None
