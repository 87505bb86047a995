"""Small builders for sequences and schedulers in unit tests."""

from __future__ import annotations

import itertools

from services.worker.engine.config import SchedulerConfig
from services.worker.engine.kv_cache import KVCacheManager
from services.worker.engine.sampler import SamplingParams
from services.worker.engine.scheduler import Scheduler
from services.worker.engine.sequence import Sequence

_ids = itertools.count()


def make_seq(num_tokens: int = 8, *, tokens: list[int] | None = None, priority: int = 0, tenant: str = "",
             deadline_s: float | None = None, **params) -> Sequence:
    token_ids = list(tokens) if tokens is not None else [10 + i % 200 for i in range(num_tokens)]
    return Sequence(
        request_id=f"req-{next(_ids)}",
        token_ids=token_ids,
        num_prompt_tokens=len(token_ids),
        params=SamplingParams(**{"max_tokens": 100, "temperature": 0.0, **params}),
        priority=priority,
        tenant=tenant,
        deadline_s=deadline_s,
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make_scheduler(num_blocks: int = 16, block_size: int = 4, *, max_num_batched_tokens: int = 64,
                   max_num_seqs: int = 8, prefix_caching: bool = False, chunked_prefill: bool = True,
                   max_model_len: int = 64, clock=None, **config) -> Scheduler:
    """config: further SchedulerConfig fields (the fairness weights and limits)."""
    kv_cache = KVCacheManager(num_blocks, block_size, enable_prefix_caching=prefix_caching)
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
                             enable_chunked_prefill=chunked_prefill, **config)
    return Scheduler(config, kv_cache, max_model_len, eos_token_ids=(2,), clock=clock or FakeClock())


def run_step(scheduler: Scheduler, next_token: int = 7):
    """One schedule + update with a fixed sampled token (no model)."""
    out = scheduler.schedule()
    scheduler.update(out, [next_token] * len(out.sampled_seqs))
    return out
