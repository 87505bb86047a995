"""The quality gate of an optimised LLM version: greedy agreement and perplexity against float32.

An optimised version serves the same files as its float32 parent with another `weight_dtype` /
`kv_cache_dtype` in its config. `evaluate` loads both into engines in this process and measures:
- greedy agreement: for each prompt, the share of the reference's greedy tokens the candidate
  reproduces before its first different token (after a divergence the two continue from different
  texts, so later tokens say nothing), averaged over the prompts; and how many prompts match whole;
- perplexity on a held-out text, scored by teacher forcing in one pass per chunk (every position's
  logits), and the candidate's ratio to the reference's.
`QualityReport.labels()` is what goes into the version's metadata (`VersionMetadata.labels`, e.g.
`tensoryard models push ... --label quality.ppl_ratio=1.004`); `passes` checks it against bounds.

    python -m services.rollout.quality MODEL_DIR --weight-dtype int8 --held-out text.txt [--prompts p.txt]
prints the report as JSON and the `--label` arguments for the push.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kernels.ops import AttentionMetadata
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.kv_cache import allocate_kv_tensors
from services.worker.engine.sampler import SamplingParams

SCORE_CHUNK_TOKENS = 128  # rows of logits [chunk, vocab] float32 held at once while scoring
SCORE_BLOCK_SIZE = 16


@dataclass(frozen=True, slots=True)
class QualityBounds:
    min_greedy_agreement: float
    max_ppl_ratio: float


@dataclass(frozen=True, slots=True)
class QualityReport:
    weight_dtype: str
    kv_cache_dtype: str
    greedy_agreement: float  # mean over prompts of the matching share of the reference's tokens
    num_prompts_identical: int
    num_prompts: int
    ppl_reference: float
    ppl_candidate: float
    num_scored_tokens: int

    @property
    def ppl_ratio(self) -> float:
        return self.ppl_candidate / self.ppl_reference

    def passes(self, bounds: QualityBounds) -> bool:
        return self.greedy_agreement >= bounds.min_greedy_agreement and self.ppl_ratio <= bounds.max_ppl_ratio

    def labels(self) -> dict[str, str]:
        """The figures as version metadata labels (strings, fixed precision)."""
        return {
            "quality.reference": "float32",
            "quality.weight_dtype": self.weight_dtype,
            "quality.kv_cache_dtype": self.kv_cache_dtype,
            "quality.greedy_agreement": f"{self.greedy_agreement:.4f}",
            "quality.prompts_identical": f"{self.num_prompts_identical}/{self.num_prompts}",
            "quality.ppl_reference": f"{self.ppl_reference:.4f}",
            "quality.ppl_candidate": f"{self.ppl_candidate:.4f}",
            "quality.ppl_ratio": f"{self.ppl_ratio:.4f}",
        }


def make_engine(model_dir: str | Path, weight_dtype: str = "float32", kv_cache_dtype: str = "auto",
                max_model_len: int = 512, num_blocks: int | None = None, max_num_seqs: int = 16,
                max_num_batched_tokens: int = 512, block_size: int = 16) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model_dir=str(model_dir), weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype, backend="torch",
        max_model_len=max_model_len,
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=False,
                          kv_cache_memory_bytes=64 * 2**20),
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens),
    ))


def greedy_tokens(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Each prompt's greedy continuation (EOS may end it early), all prompts batched together."""
    tokens: dict[str, list[int]] = {}
    for i, prompt in enumerate(prompts):
        engine.add_request(f"quality-{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens))
        tokens[f"quality-{i}"] = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
    return [tokens[f"quality-{i}"] for i in range(len(prompts))]


def agreement(reference: list[list[int]], candidate: list[list[int]]) -> tuple[float, int]:
    """(mean matching-prefix share of the reference's tokens, prompts matching whole)."""
    shares, identical = [], 0
    for ref, cand in zip(reference, candidate, strict=True):
        matched = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), min(len(ref), len(cand)))
        shares.append(matched / len(ref) if ref else 1.0)
        identical += ref == cand
    return sum(shares) / len(shares), identical


def negative_log_likelihood(engine: LLMEngine, token_ids: list[int]) -> tuple[float, int]:
    """(summed NLL of token_ids[1:] given their prefixes, tokens scored), through the engine's model
    and a private paged cache of the engine's KV dtype: the same kernels serving uses."""
    model = engine.runner.model
    config = model.config
    num_tokens = min(len(token_ids), engine.max_model_len)
    num_blocks = -(-num_tokens // SCORE_BLOCK_SIZE)
    kv_caches = allocate_kv_tensors(config.num_layers, num_blocks, SCORE_BLOCK_SIZE, config.num_kv_heads,
                                    config.head_dim, engine.dtypes.kv_cache_dtype, engine.config.device)
    ids = torch.tensor(token_ids[:num_tokens], dtype=torch.int64)
    total = 0.0
    for start in range(0, num_tokens, SCORE_CHUNK_TOKENS):
        end = min(start + SCORE_CHUNK_TOKENS, num_tokens)
        positions = torch.arange(start, end)
        metadata = AttentionMetadata(
            slot_mapping=positions.clone(),  # block b of the one sequence is block b of the cache
            cu_seqlens_q=torch.tensor([0, end - start], dtype=torch.int32),
            context_lens=torch.tensor([end], dtype=torch.int32),
            block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
            max_seqlen_q=end - start,
            max_context_len=end,
        )
        logits = model(ids[start:end], positions, kv_caches, metadata, torch.arange(end - start))
        targets = ids[start + 1 : end + 1]  # the last row of the last chunk predicts nothing
        log_probs = torch.log_softmax(logits[: len(targets)].double(), dim=-1)
        total -= float(log_probs.gather(1, targets[:, None]).sum())
    return total, num_tokens - 1


def perplexity(engine: LLMEngine, token_ids: list[int]) -> float:
    nll, count = negative_log_likelihood(engine, token_ids)
    return math.exp(nll / count)


@dataclass(frozen=True, slots=True)
class ReferenceFigures:
    """The float32 reference's side of the gate, computed once for several candidates."""

    greedy_tokens: list[list[int]]
    perplexity: float
    max_tokens: int


def reference_figures(reference: LLMEngine, prompts: list[list[int]], held_out_ids: list[int],
                      max_tokens: int = 32) -> ReferenceFigures:
    if len(held_out_ids) < 2:
        raise ValueError("the held-out text must have at least 2 tokens")
    if not prompts:
        raise ValueError("at least one prompt is needed")
    return ReferenceFigures(greedy_tokens(reference, prompts, max_tokens), perplexity(reference, held_out_ids),
                            max_tokens)


def evaluate(reference: LLMEngine | ReferenceFigures, candidate: LLMEngine, prompts: list[list[int]],
             held_out_ids: list[int], max_tokens: int = 32) -> QualityReport:
    """The candidate's quality against the (float32) reference engine of the same model, or against
    figures already taken from it with the same prompts, text and max_tokens."""
    if isinstance(reference, LLMEngine):
        reference = reference_figures(reference, prompts, held_out_ids, max_tokens)
    if reference.max_tokens != max_tokens or len(reference.greedy_tokens) != len(prompts):
        raise ValueError("the reference figures were taken with other prompts or max_tokens")
    share, identical = agreement(reference.greedy_tokens, greedy_tokens(candidate, prompts, max_tokens))
    ppl_candidate = perplexity(candidate, held_out_ids)
    return QualityReport(
        weight_dtype=candidate.dtypes.weight_dtype, kv_cache_dtype=candidate.dtypes.kv_cache_dtype_name,
        greedy_agreement=share, num_prompts_identical=identical, num_prompts=len(prompts),
        ppl_reference=reference.perplexity, ppl_candidate=ppl_candidate,
        num_scored_tokens=min(len(held_out_ids), candidate.max_model_len) - 1,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.rollout.quality", description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", type=Path,
                        help="a Hugging Face folder the worker serves (config, safetensors, tokenizer)")
    parser.add_argument("--weight-dtype", required=True, choices=("float32", "float16", "bfloat16", "int8", "int4"))
    parser.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    parser.add_argument("--held-out", type=Path, required=True, help="a text file scored for perplexity")
    parser.add_argument("--prompts", type=Path, help="one prompt a line (default: lines of the held-out text)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--min-greedy-agreement", type=float, default=0.0)
    parser.add_argument("--max-ppl-ratio", type=float, default=math.inf)
    args = parser.parse_args(argv)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    text = args.held_out.read_text()
    lines = (args.prompts.read_text() if args.prompts else text).splitlines()
    prompts = [tokenizer.encode(line).ids for line in lines if line.strip()][:16]
    report = evaluate(make_engine(args.model_dir, "float32"),
                      make_engine(args.model_dir, args.weight_dtype, args.kv_cache_dtype),
                      prompts, tokenizer.encode(text).ids, args.max_tokens)
    passed = report.passes(QualityBounds(args.min_greedy_agreement, args.max_ppl_ratio))
    print(json.dumps({**asdict(report), "ppl_ratio": report.ppl_ratio, "passed": passed}, indent=2))
    print(" ".join(f"--label {k}={v}" for k, v in report.labels().items()))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
