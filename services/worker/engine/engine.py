"""`LLMEngine`: requests in, a step at a time, RequestOutputs out. Single-threaded: whoever owns it
(the `EngineLoop` thread, later perhaps a process) is the only caller."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kernels.ops import get_ops
from services.common.errors import AlreadyExists, InvalidArgument, Overloaded
from services.worker.engine.config import EngineConfig
from services.worker.engine.detokenizer import IncrementalDetokenizer, Tokenizer
from services.worker.engine.kv_cache import KVCacheManager, allocate_kv_tensors, num_blocks_for_budget
from services.worker.engine.runner import ModelRunner
from services.worker.engine.sampler import Sampler, SamplerOutput, SamplingParams, TokenLogprobs
from services.worker.engine.scheduler import Scheduler, SchedulerOutput
from services.worker.engine.sequence import FinishReason, Sequence
from services.worker.models.hf_config import ModelConfig
from services.worker.models.llama import load_model

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(slots=True)
class Usage:
    num_prompt_tokens: int
    num_completion_tokens: int
    num_cached_tokens: int  # prompt tokens served from the prefix cache


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # tokens sampled this step (at most one today)
    text_delta: str  # whole characters only; never text at or past a stop string
    finish_reason: str | None  # "stop", "length", "abort", "deadline"; None while running
    usage: Usage
    logprobs: list[TokenLogprobs] | None = None  # one per new token, when the request asked

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


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


class LLMEngine:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None):
        self.config = config
        self.model_config = model_config = ModelConfig.from_dir(config.model_dir)
        dtype = model_config.dtype if config.dtype == "auto" else _DTYPES[config.dtype]
        cache = config.cache
        num_blocks = cache.num_blocks or num_blocks_for_budget(
            cache.kv_cache_memory_bytes, cache.block_size, model_config.num_layers,
            model_config.num_kv_heads, model_config.head_dim, dtype,
        )
        self.max_model_len = _max_model_len(config, model_config, num_blocks * cache.block_size)
        model = load_model(
            config.model_dir, dtype=dtype, device=config.device, ops=get_ops(config.backend),
            max_positions=self.max_model_len,
        )
        kv_caches = allocate_kv_tensors(
            model_config.num_layers, num_blocks, cache.block_size, model_config.num_kv_heads,
            model_config.head_dim, dtype, config.device,
        )
        self.kv_cache = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(config.scheduler, self.kv_cache, self.max_model_len, model_config.eos_token_ids)
        self.runner = ModelRunner(model, kv_caches, cache.block_size, config.device)
        self.sampler = Sampler(config.seed, config.device)
        self.tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config.model_dir)
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        deadline_s: float | None = None,
    ) -> None:
        """Queues a request. deadline_s is absolute, on time.monotonic()'s clock."""
        self._validate(request_id, prompt_token_ids, params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.config.device).manual_seed(params.seed)
        seq = Sequence(
            request_id=request_id, token_ids=list(prompt_token_ids), num_prompt_tokens=len(prompt_token_ids),
            params=params, priority=priority, deadline_s=deadline_s, generator=generator,
        )
        if self.tokenizer is not None:
            self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, seq.token_ids, params.stop)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> None:
        """Cancels a request; its blocks are freed and its final output ("abort") comes next step."""
        self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        logits = self.runner.run(scheduled)
        sampled = self.sampler.sample(logits, scheduled.sampled_seqs)
        self.scheduler.update(scheduled, sampled.token_ids)
        return self._outputs(scheduled, sampled)

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.kv_cache
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_used_blocks=kv.num_used_blocks,
            num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.num_blocks, num_preemptions=s.num_preemptions,
            num_chunked_prefills=s.num_chunked_prefills, num_prefix_query_tokens=kv.num_query_tokens,
            num_prefix_hit_tokens=kv.num_hit_tokens,
        )

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
        )

    def _validate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not isinstance(params, SamplingParams):
            raise InvalidArgument(f"params must be SamplingParams, got {type(params).__name__}")
        if request_id in self.scheduler.requests:
            raise AlreadyExists(f"request_id {request_id!r} is already in flight")
        if not prompt_token_ids:
            raise InvalidArgument("prompt_token_ids must not be empty")
        vocab_size = self.model_config.vocab_size
        if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in prompt_token_ids):
            raise InvalidArgument(f"prompt_token_ids must be integers in [0, {vocab_size})")
        if len(prompt_token_ids) >= self.max_model_len:
            raise InvalidArgument(
                f"prompt has {len(prompt_token_ids)} tokens; this model takes at most {self.max_model_len - 1}"
            )
        if params.stop and self.tokenizer is None:
            raise InvalidArgument("stop strings need a tokenizer, and this model has none")
        if len(self.scheduler.waiting) >= self.config.scheduler.max_num_waiting:
            raise Overloaded(f"{len(self.scheduler.waiting)} requests are waiting already; retry later")


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
