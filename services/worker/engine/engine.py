"""`LLMEngine`: requests in, a step at a time, RequestOutputs out. Single-threaded: whoever owns it
(the `EngineLoop` thread, later perhaps a process) is the only caller."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from kernels.ops import Ops, get_ops
from services.common.errors import AlreadyExists, InvalidArgument, Overloaded
from services.worker.engine.config import EngineConfig
from services.worker.engine.detokenizer import IncrementalDetokenizer, Tokenizer
from services.worker.engine.device_sampler import DeviceSampler
from services.worker.engine.kv_cache import KVCacheManager, KVEvents, allocate_kv_tensors, num_blocks_for_budget
from services.worker.engine.outputs import (
    EngineStats,
    RequestOutput,
    RequestTimings,
    StepRecord,
    TenantQueue,
    Usage,
)
from services.worker.engine.runner import ModelRunner
from services.worker.engine.sampler import Sampler, SamplerOutput, SamplingParams, TokenLogprobs
from services.worker.engine.scheduler import Scheduler, SchedulerOutput
from services.worker.engine.sequence import FinishReason, Sequence
from services.worker.engine.step_cost import StepCostModel
from services.worker.engine.tp_runner import start_tensor_parallel
from services.worker.models import weight_dtypes
from services.worker.models.hf_config import ModelConfig
from services.worker.models.llama import load_model
from services.worker.models.tensor_parallel import kv_heads_per_rank

# The engine's outputs live in outputs.py; importing them from here keeps working.
__all__ = ["EngineStats", "LLMEngine", "RequestOutput", "RequestTimings", "StepRecord", "TenantQueue", "Usage"]


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None):
        self.config = config
        self.model_config = model_config = ModelConfig.from_dir(config.model_dir)
        self.dtypes = dtypes = weight_dtypes.resolve(
            config.dtype, config.weight_dtype, config.kv_cache_dtype, model_config.dtype
        )
        cache = config.cache
        num_blocks = cache.num_blocks or num_blocks_for_budget(
            cache.kv_cache_memory_bytes, cache.block_size, model_config.num_layers,
            kv_heads_per_rank(model_config, config.tensor_parallel_size), model_config.head_dim,
            dtypes.kv_cache_dtype,
        )
        self.max_model_len = _max_model_len(config, model_config, num_blocks * cache.block_size)
        if config.tensor_parallel_size > 1:  # rank 0's shard and cache here, the other ranks in their processes
            model, kv_caches = start_tensor_parallel(config, model_config, dtypes, num_blocks, self.max_model_len)
        else:
            model = load_model(
                config.model_dir, dtype=dtypes.compute_dtype, device=config.device, ops=get_ops(config.backend),
                max_positions=self.max_model_len, weight_dtype=dtypes.weight_dtype,
            )
            kv_caches = allocate_kv_tensors(
                model_config.num_layers, num_blocks, cache.block_size, model_config.num_kv_heads,
                model_config.head_dim, dtypes.kv_cache_dtype, config.device,
            )
        self.kv_cache = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, self.max_model_len, model_config.eos_token_ids)
        self.runner = ModelRunner(
            model, kv_caches, cache.block_size, config.device, max_num_seqs=config.scheduler.max_num_seqs,
            max_model_len=self.max_model_len, max_num_batched_tokens=config.scheduler.max_num_batched_tokens,
        )
        if _captures_decode_graphs(config, model.ops):
            self.runner.enable_decode_graphs()
        if model.ops.sample is not None:
            self.sampler = DeviceSampler(model.ops.sample, config.seed)
        else:
            self.sampler = Sampler(config.seed, config.device)
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config.model_dir)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.step_cost = StepCostModel()
        self.num_generated_tokens = 0
        self.last_step: StepRecord | None = None  # the latest step, if it ran a batch
        self._output_fraction = _RunningMean(initial=1.0)

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        deadline_s: float | None = None,
        tenant: str = "",
        output_token_ids: list[int] | tuple[int, ...] = (),
    ) -> None:
        """Queues a request. deadline_s is absolute, on time.monotonic()'s clock.

        output_token_ids resumes a generation begun elsewhere (another replica that died or drained):
        those tokens count as already generated and sent. The request continues from the same state
        an uninterrupted run would have — the same seeded draws, penalties, stop-string window and
        max_tokens — and reports only the tokens after them.
        """
        self._validate(request_id, prompt_token_ids, params, output_token_ids)
        generator, draw_seed = self.sampler.seed_request(params, len(output_token_ids), self.model_config.vocab_size)
        seq = Sequence(
            request_id=request_id, token_ids=[*prompt_token_ids, *output_token_ids],
            num_prompt_tokens=len(prompt_token_ids), params=params, priority=priority, tenant=tenant,
            deadline_s=deadline_s, generator=generator, draw_seed=draw_seed, arrival_time_s=time.monotonic(),
        )
        if self.tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self.tokenizer, list(prompt_token_ids), params.stop)
            for token_id in output_token_ids:  # their text was sent by the replica that made them
                detokenizer.add_token(token_id)
            self._detokenizers[request_id] = detokenizer
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Cancels a request; its blocks are freed and its final output ("abort") comes next step."""
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        started_s = time.monotonic()
        self.last_step = None
        num_preemptions_before = self.scheduler.num_preemptions
        scheduled = self.scheduler.schedule()
        for seq in scheduled.scheduled_seqs:
            if seq.first_scheduled_time_s is None:
                seq.first_scheduled_time_s = started_s
        logits = self.runner.run(scheduled.inputs)
        sampled = self.sampler.sample(logits, scheduled.inputs.sampling)
        self.scheduler.update(scheduled, sampled.token_ids)
        inter_token_latencies_s = self._stamp_tokens(scheduled.sampled_seqs)
        outputs = self._outputs(scheduled, sampled)
        duration_s = time.monotonic() - started_s
        self._observe_step(scheduled, len(sampled.token_ids), duration_s)
        if scheduled.scheduled_seqs:
            self.last_step = StepRecord(
                started_s, duration_s, len(scheduled.scheduled_seqs), scheduled.num_batched_tokens,
                sum(n for n in scheduled.num_scheduled_tokens if n > 1), len(sampled.token_ids),
                self.scheduler.num_preemptions - num_preemptions_before, inter_token_latencies_s,
            )
        return outputs

    @staticmethod
    def _stamp_tokens(sampled_seqs: list[Sequence]) -> tuple[float, ...]:
        now_s = time.monotonic()
        latencies = []
        for seq in sampled_seqs:
            if seq.first_token_time_s is None:
                seq.first_token_time_s = now_s
            else:
                latencies.append(now_s - seq.last_token_time_s)
            seq.last_token_time_s = now_s
        return tuple(latencies)

    def take_kv_events(self) -> KVEvents:
        """Blocks stored in and removed from the prefix cache since the last call."""
        return self.kv_cache.take_events()

    def cached_block_hashes(self) -> list[bytes]:
        return self.kv_cache.cached_block_hashes()

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.kv_cache
        fraction = self._output_fraction.value
        tenants: dict[str, list[int]] = {}
        num_queued_prompt_tokens = 0
        for seq in s.waiting:
            queue = tenants.setdefault(seq.tenant, [0, 0, 0, 0])
            queue[0] += 1
            queue[1] += seq.num_uncomputed_tokens
            queue[2] += _expected_remaining(seq, fraction)
            num_queued_prompt_tokens += seq.num_uncomputed_tokens
        num_context_tokens = 0
        for seq in s.running:
            tenants.setdefault(seq.tenant, [0, 0, 0, 0])[3] += 1
            num_context_tokens += seq.num_tokens
            if seq.num_uncomputed_tokens > 1:  # mid-prefill: the rest of its prompt is still queued work
                num_queued_prompt_tokens += seq.num_uncomputed_tokens
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_used_blocks=kv.num_used_blocks,
            num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.num_blocks, num_preemptions=s.num_preemptions,
            num_chunked_prefills=s.num_chunked_prefills, num_prefix_query_tokens=kv.num_query_tokens,
            num_prefix_hit_tokens=kv.num_hit_tokens, max_num_seqs=self.config.scheduler.max_num_seqs,
            max_num_batched_tokens=self.config.scheduler.max_num_batched_tokens,
            block_size=kv.block_size, num_queued_prompt_tokens=num_queued_prompt_tokens,
            num_context_tokens=num_context_tokens,
            num_generated_tokens=self.num_generated_tokens,
            running_remaining_tokens=tuple(sorted(_expected_remaining(seq, fraction) for seq in s.running)),
            tenant_queues={t: TenantQueue(*q) for t, q in tenants.items()},
            expected_output_fraction=fraction, step_cost=self.step_cost.current(),
        )

    def _observe_step(self, scheduled: SchedulerOutput, num_sampled: int, duration_s: float) -> None:
        if not scheduled.scheduled_seqs:
            return
        num_prefill_tokens = sum(n for n in scheduled.num_scheduled_tokens if n > 1)
        self.step_cost.observe(len(scheduled.scheduled_seqs), num_prefill_tokens, duration_s)
        self.num_generated_tokens += num_sampled
        for seq in scheduled.sampled_seqs:
            if seq.is_finished and not seq.params.ignore_eos and seq.finish_reason in _NATURAL_ENDS:
                self._output_fraction.add(seq.num_output_tokens / seq.params.max_tokens)

    def _outputs(self, scheduled: SchedulerOutput, sampled: SamplerOutput) -> list[RequestOutput]:
        outputs = [self._output(seq, [], None) for seq in scheduled.finished_seqs]
        for seq, token_id, logprobs in zip(scheduled.sampled_seqs, sampled.token_ids, sampled.logprobs):
            outputs.append(self._output(seq, [token_id], logprobs))
        return outputs

    def _output(self, seq: Sequence, token_ids: list[int], logprobs: TokenLogprobs | None) -> RequestOutput:
        """Detokenizes the new token; a stop string finishes the sequence here."""
        text = ""
        detokenizer = self._detokenizers.get(seq.request_id)
        if detokenizer is not None:
            text = "".join(detokenizer.add_token(t) for t in token_ids)
            if detokenizer.stopped:
                self.scheduler.finish(seq, FinishReason.STOP)
                seq.finish_reason = FinishReason.STOP
            if seq.is_finished:
                text += detokenizer.flush()
                del self._detokenizers[seq.request_id]
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=token_ids,
            text_delta=text,
            finish_reason=seq.finish_reason.value if seq.finish_reason is not None else None,
            usage=Usage(seq.num_prompt_tokens, seq.num_output_tokens, seq.num_cached_tokens),
            logprobs=[logprobs] if logprobs is not None else None,
            timings=_timings(seq) if seq.is_finished else None,
        )

    def _validate(self, request_id: str, prompt_token_ids, params: SamplingParams, output_token_ids) -> None:
        if not isinstance(params, SamplingParams):
            raise InvalidArgument(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.scheduler.requests:
            raise AlreadyExists(f"request_id {request_id!r} is already in flight")
        if not prompt_token_ids:
            raise InvalidArgument("prompt_token_ids must not be empty")
        vocab_size = self.model_config.vocab_size
        for name, token_ids in (("prompt_token_ids", prompt_token_ids), ("output_token_ids", output_token_ids)):
            if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in token_ids):
                raise InvalidArgument(f"{name} must be integers in [0, {vocab_size})")
        num_prompt = len(prompt_token_ids)
        if num_prompt >= self.max_model_len:
            raise InvalidArgument(
                f"prompt has {num_prompt} tokens; this model takes at most {self.max_model_len - 1}"
            )
        if num_prompt + params.max_tokens > self.max_model_len:
            raise InvalidArgument(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                f"{num_prompt + params.max_tokens} ({num_prompt} in the prompt, max_tokens {params.max_tokens}): "
                f"ask for at most {self.max_model_len - num_prompt} tokens"
            )
        if len(output_token_ids) >= params.max_tokens:
            raise InvalidArgument(
                f"{len(output_token_ids)} output tokens to resume from, but max_tokens is {params.max_tokens}"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidArgument("stop strings need a tokenizer, and this model has none")
        if len(self.scheduler.waiting) >= self.config.scheduler.max_num_waiting:
            raise Overloaded(f"{len(self.scheduler.waiting)} requests are waiting already; retry later")


_NATURAL_ENDS = (FinishReason.STOP, FinishReason.LENGTH)


def _captures_decode_graphs(config: EngineConfig, ops: Ops) -> bool:
    """CUDA graphs where a graph can hold the step: on CUDA, with the triton backend (the torch one
    builds its plan's tensors per step), and one rank (a replay would not reach the other ranks)."""
    return (config.cuda_graphs and torch.device(config.device).type == "cuda" and ops.name == "triton"
            and config.tensor_parallel_size == 1)


def _timings(seq: Sequence) -> RequestTimings:
    return RequestTimings(seq.arrival_time_s, seq.first_scheduled_time_s, seq.first_token_time_s,
                          time.monotonic(), seq.num_preemptions)


def _expected_remaining(seq: Sequence, output_fraction: float) -> int:
    """Output tokens seq is still expected to generate: all of max_tokens under ignore_eos, else the
    share of it that finished requests have used on average."""
    remaining = seq.params.max_tokens - seq.num_output_tokens
    if seq.params.ignore_eos:
        return remaining
    return max(1, min(remaining, round(seq.params.max_tokens * output_fraction) - seq.num_output_tokens))


class _RunningMean:
    """An exponentially weighted mean over the last hundred or so values."""

    WEIGHT = 0.02

    def __init__(self, initial: float):
        self.value = initial

    def add(self, value: float) -> None:
        self.value += self.WEIGHT * (value - self.value)


def _max_model_len(config: EngineConfig, model_config: ModelConfig, pool_tokens: int) -> int:
    """The configured limit (or the model's), which one sequence's blocks must fit in the pool."""
    limit = config.max_model_len or min(model_config.max_position_embeddings, pool_tokens)
    if limit > model_config.max_position_embeddings:
        raise ValueError(f"max_model_len {limit} exceeds the model's {model_config.max_position_embeddings} positions")
    if limit > pool_tokens:
        raise ValueError(f"max_model_len {limit} exceeds the KV pool's {pool_tokens} tokens")
    if not config.scheduler.enable_chunked_prefill and config.scheduler.max_num_batched_tokens < limit:
        raise ValueError("max_num_batched_tokens must be >= max_model_len without chunked prefill")
    return limit


def _load_tokenizer(model_dir: str) -> Tokenizer | None:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(path))
