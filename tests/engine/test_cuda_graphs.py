"""Decode steps padded to a batch-size bucket (services/worker/engine/cuda_graphs.py) give the tokens
of unpadded steps. Off CUDA the padded batch runs eagerly through the same buffers and padding; the
capture itself is checked where CUDA is present."""

from __future__ import annotations

import pytest
import torch

from kernels.attention_torch import paged_attention_torch, plan_torch
from kernels.ops import AttentionMetadata, StepHost
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine.cuda_graphs import batch_buckets
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampler import SamplingParams
from tests.engine.checkpoints import save_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama-graphs")
    save_checkpoint(directory, "llama", seed=3)
    return directory


def make_engine(directory, device: str = "cpu", backend: str = "torch", cuda_graphs: bool = False) -> LLMEngine:
    return LLMEngine(EngineConfig(
        model_dir=str(directory), backend=backend, device=device, max_model_len=64, cuda_graphs=cuda_graphs,
        cache=CacheConfig(block_size=4, num_blocks=64, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=12, max_num_batched_tokens=32),
    ))


def greedy_tokens(engine: LLMEngine, num_requests: int = 7) -> dict[str, list[int]]:
    generator = torch.Generator().manual_seed(4)
    tokens = {}
    for i in range(num_requests):  # 7 sequences: decode steps of 7, then fewer, padded to 8 / 4 / 2 / 1
        prompt = torch.randint(3, 256, (3 + 2 * i,), generator=generator).tolist()
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=4 + i, ignore_eos=True))
        tokens[f"r{i}"] = []
    while engine.has_unfinished():
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
    return tokens


def test_buckets_cover_every_batch_size_up_to_max_num_seqs():
    assert batch_buckets(1) == [1]
    assert batch_buckets(12) == [1, 2, 4, 8, 12]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 24, 32, 40]


def test_padded_decode_steps_give_the_greedy_tokens_of_unpadded_ones(checkpoint):
    want = greedy_tokens(make_engine(checkpoint))
    engine = make_engine(checkpoint)
    engine.runner.enable_decode_graphs(capture=False)
    assert greedy_tokens(engine) == want
    graphs = engine.runner.graphs
    assert graphs.num_runs > 0 and graphs.num_padded_rows > 0  # decode steps went the padded way


def test_attention_planned_before_the_forward_pass_reads_nothing_back():
    class NoReadBack(torch.Tensor):
        def tolist(self):
            raise AssertionError("the metadata was read back from the device")

    generator = torch.Generator().manual_seed(0)
    k_cache, v_cache = torch.randn(2, 8, 4, 2, 16, generator=generator).unbind(0)
    q = torch.randn(1 + 5, 4, 16, generator=generator)
    host = StepHost(cu_seqlens_q=[0, 1, 6], context_lens=[9, 5])
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(6), cu_seqlens_q=torch.tensor(host.cu_seqlens_q, dtype=torch.int32),
        context_lens=torch.tensor(host.context_lens, dtype=torch.int32),
        block_tables=torch.tensor([[0, 1, 2], [3, 4, 0]], dtype=torch.int32), max_seqlen_q=5, max_context_len=9)
    want = paged_attention_torch(q, k_cache, v_cache, metadata, 0.25)
    metadata.backend_plan = None
    metadata.cu_seqlens_q = metadata.cu_seqlens_q.as_subclass(NoReadBack)
    metadata.context_lens = metadata.context_lens.as_subclass(NoReadBack)
    plan_torch(metadata, host, k_cache)
    torch.testing.assert_close(paged_attention_torch(q, k_cache, v_cache, metadata, 0.25), want)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturing CUDA graphs needs a CUDA device")
def test_captured_decode_graphs_give_the_greedy_tokens_of_eager_steps(checkpoint):
    want = greedy_tokens(make_engine(checkpoint, "cuda", "triton"))
    engine = make_engine(checkpoint, "cuda", "triton", cuda_graphs=True)  # captured at start-up
    assert engine.runner.graphs is not None and engine.runner.graphs.captured
    assert greedy_tokens(engine) == want
