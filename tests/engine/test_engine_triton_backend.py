"""The engine on the `triton` backend matches Hugging Face greedy decoding under continuous batching
with chunked prefill and preemption, and draws seeded tokens on the device that do not depend on the
batch. Without a GPU the kernels run under triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so the model and the load are tiny; on CUDA the same
test runs the compiled kernels."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.ops import get_ops
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampler import SamplingParams
from tests.engine.checkpoints import save_checkpoint
from tests.engine.test_engine_greedy import make_prompts, reference_tokens, run_staggered

NUM_PROMPTS = 6

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="the triton backend needs CUDA, or TRITON_INTERPRET=1 to run its kernels on the CPU",
)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-triton")
    model = save_checkpoint(directory, "llama", seed=5, num_hidden_layers=1)
    return directory, model


def test_the_triton_backend_is_what_the_engine_runs():
    assert get_ops("triton").name == "triton"


def test_greedy_matches_transformers_on_the_triton_backend(checkpoint):
    directory, model = checkpoint
    prompts = make_prompts(seed=11)[:NUM_PROMPTS]
    max_tokens = [4 + (i * 3) % 7 for i in range(NUM_PROMPTS)]
    engine = LLMEngine(EngineConfig(
        model_dir=str(directory), backend="triton", max_model_len=64,
        cache=CacheConfig(block_size=16, num_blocks=5, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
    ))
    got = run_staggered(engine, prompts, max_tokens)
    stats = engine.stats()
    assert stats.num_chunked_prefills > 0
    for i, prompt in enumerate(prompts):
        assert got[f"r{i}"] == reference_tokens(model, prompt, max_tokens[i]), f"request r{i}"


def small_engine(directory, num_blocks: int = 8) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model_dir=str(directory), backend="triton", max_model_len=64,
        cache=CacheConfig(block_size=16, num_blocks=num_blocks, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=16),
    ), tokenizer=None)


def generate(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
             resume: dict[str, list[int]] | None = None) -> dict[str, list[int]]:
    tokens = {}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params, output_token_ids=(resume or {}).get(request_id, ()))
        tokens[request_id] = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
    return tokens


def test_seeded_sampling_on_the_device_is_the_same_alone_batched_preempted_or_resumed(checkpoint):
    """The sampler of this backend draws on the device from each request's seed and token count."""
    directory, _ = checkpoint
    prompts = make_prompts(seed=3)[:4]
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10)
    alone = generate(small_engine(directory), {"seeded": (prompts[0], seeded)})["seeded"]
    assert len(alone) == 10
    others = {f"other-{i}": (prompt, SamplingParams(temperature=0.8, max_tokens=12)) for i, prompt in
              enumerate(prompts[1:])}
    crowded = small_engine(directory, num_blocks=5)  # too few blocks for all four: someone is preempted
    batched = generate(crowded, {**others, "seeded": (prompts[0], seeded)})
    assert crowded.stats().num_preemptions > 0
    assert batched["seeded"] == alone
    resumed = generate(small_engine(directory), {"seeded": (prompts[0], seeded)}, resume={"seeded": alone[:4]})
    assert resumed["seeded"] == alone[4:]
