"""The engine on the `triton` backend matches Hugging Face greedy decoding under continuous batching
with chunked prefill and preemption. Without a GPU the kernels run under triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1), so the model and the load are tiny; on CUDA the same
test runs the compiled kernels."""

from __future__ import annotations

import os

import pytest
import torch

from kernels.ops import get_ops
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
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
