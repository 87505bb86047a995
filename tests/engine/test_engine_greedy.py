"""Greedy decoding under continuous batching gives exactly transformers' greedy tokens.

16 prompts of mixed lengths arrive at staggered steps into a KV pool far too small for all of them,
with a token budget smaller than most prompts: the run must chunk prefills and preempt (asserted via
the scheduler's counters), and every request must still produce generate(do_sample=False)'s tokens.
"""

from __future__ import annotations

import pytest
import torch

from kernels import paged_decode_cpu
from kernels.ops import get_ops
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampler import SamplingParams
from tests.engine.checkpoints import save_checkpoint

NUM_PROMPTS = 16
EOS = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    model = save_checkpoint(directory, "llama", seed=5)
    return directory, model


def make_prompts(seed: int, shared_prefix: list[int] | None = None) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 30, (NUM_PROMPTS,), generator=generator).tolist()
    prefix = shared_prefix or []
    return [prefix + torch.randint(3, 256, (n,), generator=generator).tolist() for n in lengths]


def reference_tokens(model, prompt: list[int], max_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), max_new_tokens=max_tokens, do_sample=False,
            eos_token_id=EOS, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        )
    return out[0, len(prompt):].tolist()


def run_staggered(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, list[int]]:
    """Adds two requests per step (four at the start) and steps until everything finishes."""
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished():
        for _ in range(4 if step == 0 else 2):
            if pending:
                i, prompt = pending.pop(0)
                engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens[i]))
                tokens[f"r{i}"] = []
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
        step += 1
        assert step < 2000
    return tokens


@pytest.fixture(params=["torch", "auto"], ids=["torch-decode", "cpu-decode-kernel"])
def backend(request) -> str:
    """The torch reference path, and "auto", which on the CPU serves decode rows with the compiled kernel."""
    if request.param == "auto" and paged_decode_cpu.load(build=True) is None:
        pytest.skip(f"the CPU decode kernel cannot be built here: {paged_decode_cpu.unavailable_reason()}")
    if request.param == "auto" and not torch.cuda.is_available():
        assert get_ops("auto").name == "cpu"
    return request.param


def small_engine(directory, prefix_caching: bool, backend: str = "torch") -> LLMEngine:
    return LLMEngine(
        EngineConfig(
            model_dir=str(directory),
            backend=backend,
            max_model_len=96,
            cache=CacheConfig(block_size=4, num_blocks=32, enable_prefix_caching=prefix_caching),
            scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16),
        )
    )


def test_greedy_matches_transformers_with_chunked_prefill_and_preemption(checkpoint, backend):
    directory, model = checkpoint
    prompts = make_prompts(seed=11)
    max_tokens = [8 + (i * 5) % 17 for i in range(NUM_PROMPTS)]
    engine = small_engine(directory, prefix_caching=False, backend=backend)
    got = run_staggered(engine, prompts, max_tokens)
    stats = engine.stats()
    assert stats.num_chunked_prefills > 0
    assert stats.num_preemptions > 0
    assert stats.num_used_blocks == 0 and stats.num_running == stats.num_waiting == 0
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == reference_tokens(model, prompt, max_tokens[i]), f"request r{i}"


def test_greedy_matches_transformers_with_prefix_cache_hits(checkpoint, backend):
    directory, model = checkpoint
    shared = torch.randint(3, 256, (13,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = make_prompts(seed=12, shared_prefix=shared)
    max_tokens = [6 + (i * 3) % 11 for i in range(NUM_PROMPTS)]
    engine = small_engine(directory, prefix_caching=True, backend=backend)
    got = run_staggered(engine, prompts, max_tokens)
    stats = engine.stats()
    assert stats.num_prefix_hit_tokens >= 12 * 8  # most requests reuse the 3 shared full blocks
    assert stats.num_chunked_prefills > 0
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == reference_tokens(model, prompt, max_tokens[i]), f"request r{i}"
