"""Prefill logits of our Llama-family model against transformers on random-weight checkpoints.

Tolerance: fp32 throughout, atol 1e-4 and rtol 1e-4 on logits (observed differences are ~2e-6).
Several prompts go through one flat batch, so the paged layout and per-sequence masking are checked
together with the maths.
"""

from __future__ import annotations

import pytest
import torch

from kernels.ops import AttentionMetadata, get_ops
from services.common.errors import InvalidArgument
from services.worker.models.hf_config import ModelConfig
from services.worker.models.llama import load_model
from tests.engine.checkpoints import save_checkpoint

ATOL = RTOL = 1e-4
BLOCK_SIZE = 4
PROMPT_LENS = (13, 1, 22)

VARIANTS = {
    "llama": ("llama", {}),
    "llama_tied": ("llama", {"tie_word_embeddings": True}),
    "llama_llama3_rope": (
        "llama",
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 32}},
    ),
    "llama_linear_rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "llama_attention_bias": ("llama", {"attention_bias": True, "mlp_bias": True}),
    "mistral_sliding_window": ("mistral", {"sliding_window": 5}),
    "qwen2": ("qwen2", {}),
    "qwen2_tied": ("qwen2", {"tie_word_embeddings": True}),
}


def run_prefill(model, prompts: list[torch.Tensor], chunks: int = 1) -> list[torch.Tensor]:
    """Every position's logits for each prompt, prefilled through the paged cache in `chunks` steps."""
    config = model.config
    max_blocks = max(-(-len(p) // BLOCK_SIZE) for p in prompts)
    num_blocks = max_blocks * len(prompts)
    kv = torch.zeros(config.num_layers, 2, num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    kv_caches = [(kv[i, 0], kv[i, 1]) for i in range(config.num_layers)]
    # Sequence b owns blocks b, b + B, b + 2B, ...: interleaved, so a wrong block table shows.
    tables = [[b + j * len(prompts) for j in range(max_blocks)] for b in range(len(prompts))]
    logits = [[] for _ in prompts]
    bounds = [[len(p) * c // chunks for c in range(chunks + 1)] for p in prompts]
    for c in range(chunks):
        ids, positions, slots, cu, context_lens = [], [], [], [0], []
        for b, prompt in enumerate(prompts):
            start, end = bounds[b][c], bounds[b][c + 1]
            ids += prompt[start:end].tolist()
            positions += list(range(start, end))
            slots += [tables[b][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]
            cu.append(cu[-1] + end - start)
            context_lens.append(end)
        metadata = AttentionMetadata(
            slot_mapping=torch.tensor(slots),
            cu_seqlens_q=torch.tensor(cu, dtype=torch.int32),
            context_lens=torch.tensor(context_lens, dtype=torch.int32),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            max_seqlen_q=max(b - a for a, b in zip(cu, cu[1:])),
            max_context_len=max(context_lens),
        )
        out = model(torch.tensor(ids), torch.tensor(positions), kv_caches, metadata, torch.arange(len(ids)))
        for b in range(len(prompts)):
            logits[b].append(out[cu[b] : cu[b + 1]])
    return [torch.cat(rows) for rows in logits]


@pytest.fixture(scope="module")
def prompts() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(3, 256, (n,), generator=generator) for n in PROMPT_LENS]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_logits_match_transformers(variant, tmp_path, prompts):
    kind, overrides = VARIANTS[variant]
    reference = save_checkpoint(tmp_path, kind, **overrides)
    model = load_model(tmp_path, ops=get_ops("torch"), max_positions=64)
    ours = run_prefill(model, prompts)
    with torch.no_grad():
        for prompt, logits in zip(prompts, ours):
            expected = reference(prompt[None]).logits[0]
            torch.testing.assert_close(logits, expected, atol=ATOL, rtol=RTOL)


def test_chunked_prefill_matches_one_pass(tmp_path, prompts):
    save_checkpoint(tmp_path, "mistral", sliding_window=5)
    model = load_model(tmp_path, ops=get_ops("torch"), max_positions=64)
    for whole, chunked in zip(run_prefill(model, prompts), run_prefill(model, prompts, chunks=3)):
        torch.testing.assert_close(chunked, whole, atol=ATOL, rtol=RTOL)


def test_sliding_window_changes_the_logits(tmp_path, prompts):
    """Guards the Mistral parity case: with a window shorter than the prompt, the window matters."""
    windowed = save_checkpoint(tmp_path / "w", "mistral", sliding_window=5)
    full = save_checkpoint(tmp_path / "f", "mistral", sliding_window=None)
    with torch.no_grad():
        a = windowed(prompts[2][None]).logits[0, -1]
        b = full(prompts[2][None]).logits[0, -1]
    assert not torch.allclose(a, b, atol=1e-3)


def test_sharded_checkpoint_loads_like_single_file(tmp_path, prompts):
    save_checkpoint(tmp_path / "one", "qwen2", seed=3)
    save_checkpoint(tmp_path / "sharded", "qwen2", seed=3, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    one = run_prefill(load_model(tmp_path / "one", ops=get_ops("torch"), max_positions=64), prompts)
    sharded = run_prefill(load_model(tmp_path / "sharded", ops=get_ops("torch"), max_positions=64), prompts)
    for a, b in zip(one, sharded):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_pickled_checkpoints_are_refused(tmp_path):
    save_checkpoint(tmp_path, "llama")
    for path in tmp_path.glob("*.safetensors"):
        path.rename(path.with_suffix(".bin"))
    with pytest.raises(InvalidArgument, match="safetensors"):
        load_model(tmp_path, ops=get_ops("torch"))


def test_old_and_new_rope_config_layouts_agree():
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    old = {**base, "rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}}
    new = {**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "linear", "factor": 2.0}}
    assert ModelConfig.from_dict(old).rope == ModelConfig.from_dict(new).rope


def test_unsupported_config_names_the_field():
    with pytest.raises(InvalidArgument, match="model_type"):
        ModelConfig.from_dict({"model_type": "gpt2"})
    raw = {"model_type": "llama", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 1, "num_attention_heads": 2, "rope_scaling": {"rope_type": "yarn", "factor": 2.0}}
    with pytest.raises(InvalidArgument, match="rope_scaling"):
        ModelConfig.from_dict(raw)


def test_qwen2_sliding_window_applies_from_max_window_layers():
    raw = {"model_type": "qwen2", "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8,
           "num_hidden_layers": 3, "num_attention_heads": 2, "sliding_window": 4,
           "use_sliding_window": True, "max_window_layers": 1}
    assert ModelConfig.from_dict(raw).sliding_windows == (None, 4, 4)
    assert ModelConfig.from_dict({**raw, "use_sliding_window": False}).sliding_windows == (None, None, None)
