"""Sampling: from each sampling sequence's logits row to its next token.

Order of operations on a row: repetition penalty (HF: divides positive logits of every token seen in
prompt or output, multiplies negative ones), frequency and presence penalties (OpenAI: subtract
per-occurrence and once-per-token amounts for output tokens), then greedy argmax when temperature is
0, else temperature, top-k, top-p, min-p and one draw. A request with a seed draws from its own
torch.Generator with the exponential-race trick (argmax of probs / Exp(1) noise), one draw per token,
so its tokens do not depend on which other requests share the batch. Logprobs, when asked for, are
those of the model's own distribution (log-softmax of the raw logits, before penalties and temperature).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from services.common.errors import InvalidArgument

MAX_LOGPROBS = 20
# Bounds on stop conditions: each stop string is matched against the text of every step, so a
# request's cost grows with their number and length (10,000 stop strings once took 28 s to answer).
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 256


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0 or -1: off
    top_p: float = 1.0  # 1: off
    min_p: float = 0.0  # 0: off
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings; the text returned ends before the first one
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k: the sampled token's logprob and the k most likely

    def __post_init__(self) -> None:
        # Lists are accepted and stored as tuples, so params stay hashable and immutable.
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        _check(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1", self.max_tokens)
        _check(_is_real(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0", self.temperature)
        _check(_is_int(self.top_k) and self.top_k >= -1, "top_k", "-1, 0 (off) or an integer >= 1", self.top_k)
        _check(_is_real(self.top_p) and 0 < self.top_p <= 1, "top_p", "in (0, 1]", self.top_p)
        _check(_is_real(self.min_p) and 0 <= self.min_p <= 1, "min_p", "in [0, 1]", self.min_p)
        _check(
            _is_real(self.repetition_penalty) and self.repetition_penalty > 0,
            "repetition_penalty", "a number > 0", self.repetition_penalty,
        )
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(_is_real(value) and -2 <= value <= 2, name, "in [-2, 2]", value)
        _check(self.seed is None or _is_int(self.seed), "seed", "an integer", self.seed)
        _check(
            all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings", list(self.stop)
        )
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidArgument(f"stop holds {len(self.stop)} strings; at most {MAX_STOP_STRINGS} are allowed")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise InvalidArgument(
                f"a stop string has {longest} characters; at most {MAX_STOP_STRING_CHARS} are allowed"
            )
        _check(
            all(_is_int(t) and t >= 0 for t in self.stop_token_ids),
            "stop_token_ids", "a list of token ids >= 0", list(self.stop_token_ids),
        )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise InvalidArgument(
                f"stop_token_ids holds {len(self.stop_token_ids)} ids; at most {MAX_STOP_TOKEN_IDS} are allowed"
            )
        _check(
            self.logprobs is None or (_is_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
            "logprobs", f"an integer in [0, {MAX_LOGPROBS}]", self.logprobs,
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise InvalidArgument(f"{name} must be {expected}, got {value!r}")


@dataclass(slots=True)
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), most likely first


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per sampling sequence, in order
    logprobs: list[TokenLogprobs | None]


class SamplingRequest(Protocol):
    """What sampling reads of one row: the engine passes `step_inputs.SamplingRow`s (a `Sequence`
    has the same attributes). token_ids and output_token_ids are read only for the penalties."""

    @property
    def params(self) -> SamplingParams: ...
    @property
    def generator(self) -> torch.Generator | None: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def output_token_ids(self) -> list[int]: ...


class Sampler:
    def __init__(self, seed: int = 0, device: str | torch.device = "cpu"):
        # Draws for requests without a seed of their own.
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def seed_request(self, params: SamplingParams, num_sampled: int,
                     vocab_size: int) -> tuple[torch.Generator | None, int]:
        """(generator, draw seed) for a new request: a seeded one gets its own generator, moved past
        the draws of the num_sampled tokens it has already sampled elsewhere, so a resumed generation
        draws what the uninterrupted one would have. The draw seed is the device sampler's."""
        if params.seed is None:
            return None, 0
        generator = torch.Generator(device=self.generator.device).manual_seed(params.seed)
        if not params.greedy:  # one draw per token already sampled
            for _ in range(num_sampled):
                _seeded_noise(generator, vocab_size, generator.device)
        return generator, 0

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor | None, seqs: list[SamplingRequest]) -> SamplerOutput:
        """logits [S, vocab_size] float32, one row per sequence in seqs."""
        if logits is None or not seqs:
            return SamplerOutput([], [])
        params = [seq.params for seq in seqs]
        penalized = apply_penalties(logits.clone(), seqs)
        greedy = torch.tensor([p.greedy for p in params], device=logits.device)
        token_ids = penalized.argmax(dim=-1)
        if not bool(greedy.all()):
            probs = processed_probs(penalized, params)
            token_ids = torch.where(greedy, token_ids, self._draw(probs, seqs))
        return SamplerOutput(token_ids.tolist(), token_logprobs(logits, token_ids, params))

    def _draw(self, probs: torch.Tensor, seqs: list[SamplingRequest]) -> torch.Tensor:
        noise = torch.empty_like(probs).exponential_(generator=self.generator)  # [S, V]
        for i, seq in enumerate(seqs):
            if seq.generator is not None and not seq.params.greedy:
                noise[i] = _seeded_noise(seq.generator, probs.shape[-1], probs.device)
        return (probs / noise.clamp_(min=1e-30)).argmax(dim=-1)


def _seeded_noise(generator: torch.Generator, vocab_size: int, device) -> torch.Tensor:
    """One token's draw for a seeded request: Exp(1) noise over the vocabulary, [V] float32."""
    return torch.empty(vocab_size, dtype=torch.float32, device=device).exponential_(generator=generator)



def token_logprobs(
    logits: torch.Tensor, token_ids: torch.Tensor, params: list[SamplingParams]
) -> list[TokenLogprobs | None]:
    """The raw distribution's logprob of each sampled token, and its top-k, for rows that ask."""
    if all(p.logprobs is None for p in params):
        return [None] * len(params)
    logprobs = logits.log_softmax(dim=-1)
    result: list[TokenLogprobs | None] = []
    for i, p in enumerate(params):
        if p.logprobs is None:
            result.append(None)
            continue
        token_id = int(token_ids[i])
        top = logprobs[i].topk(p.logprobs) if p.logprobs else None
        result.append(
            TokenLogprobs(
                token_id=token_id,
                logprob=float(logprobs[i, token_id]),
                top=list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
            )
        )
    return result


def processed_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """[S, V] probabilities after temperature, top-k, top-p and min-p."""
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=logits.device)
    logits = logits / temperature[:, None]
    if any(p.top_k > 0 for p in params):
        logits = apply_top_k(logits, torch.tensor([p.top_k for p in params], device=logits.device))
    if any(p.top_p < 1 for p in params):
        logits = apply_top_p(logits, torch.tensor([p.top_p for p in params], device=logits.device))
    if any(p.min_p > 0 for p in params):
        logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=logits.device))
    return logits.softmax(dim=-1)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keeps each row's top_k largest logits (ties at the k-th value kept too); top_k <= 0 keeps all."""
    vocab_size = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)
    kth = logits.sort(dim=-1, descending=True).values.gather(-1, (k - 1)[:, None])  # [S, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keeps the smallest set of most likely tokens whose probability reaches top_p (at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cumulative <= 1 - top_p[:, None]
    drop[:, -1] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return sorted_logits.scatter(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens less likely than min_p times the row's most likely token."""
    probs = logits.softmax(dim=-1)
    threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
    return logits.masked_fill(probs < threshold, float("-inf"))


def apply_penalties(logits: torch.Tensor, seqs: list[SamplingRequest]) -> torch.Tensor:
    """In place on logits [S, V]; rows without penalties are left alone."""
    vocab_size = logits.shape[-1]
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.int64, device=logits.device)
            scores = logits[i, seen]
            logits[i, seen] = torch.where(scores > 0, scores / p.repetition_penalty, scores * p.repetition_penalty)
        if p.frequency_penalty or p.presence_penalty:
            output = torch.tensor(seq.output_token_ids, dtype=torch.int64, device=logits.device)
            counts = torch.bincount(output, minlength=vocab_size)[:vocab_size].to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits
