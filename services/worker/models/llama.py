"""The Llama family (Llama, Mistral, Qwen2) over one flat batch and a paged KV cache.

The forward takes every sequence's new tokens concatenated (input_ids [N], positions [N]) with an
`AttentionMetadata` that says where each token's K/V goes (slot_mapping) and what each sequence attends
to (cu_seqlens_q, context_lens, block_tables). All kernels go through the `Ops` the model is given, so
the torch reference and the Triton backend run the same model code.

Weights load from the Hugging Face layout (config.json, one *.safetensors or shards listed in
model.safetensors.index.json), never from pickles. q/k/v and gate/up projections are fused into one
matrix each at load time: one matmul instead of three (two).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from kernels import linear_cpu
from kernels.ops import AttentionMetadata, Ops, get_ops
from kernels.quant_linear import PromptRows
from kernels.rope import build_cos_sin_cache
from services.common.errors import InvalidArgument
from services.worker.models.hf_config import ModelConfig
from services.worker.models import weight_dtypes
from services.worker.models.tensor_parallel import TensorParallelShard

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k_cache, v_cache), each [num_blocks, block_size, Hkv, D]


class Linear(nn.Module):
    """A linear layer whose parameters are allocated but not initialised: the checkpoint fills them.
    On CPU, loading swaps it for a `linear_cpu.PackedLinear` (see `pack_for_cpu`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size, dtype=dtype), requires_grad=False)
        self.eps = eps


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ops: Ops, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.ops = ops
        self.sliding_window = config.sliding_windows[layer_idx]
        self.scale = config.head_dim**-0.5
        self.qkv_proj = Linear(config.hidden_size, config.q_size + 2 * config.kv_size, config.qkv_bias, dtype)
        self.o_proj = Linear(config.q_size, config.hidden_size, config.o_bias, dtype)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        c = self.config
        q, k, v = self.qkv_proj(x).split([c.q_size, c.kv_size, c.kv_size], dim=-1)
        q = q.view(-1, c.num_heads, c.head_dim)  # [N, Hq, D]
        k = k.view(-1, c.num_kv_heads, c.head_dim)  # [N, Hkv, D]
        v = v.view(-1, c.num_kv_heads, c.head_dim)
        q, k = self.ops.rope(q, k, positions, cos_sin_cache)
        k_cache, v_cache = kv_cache
        self.ops.write_kv(k, v, k_cache, v_cache, metadata.slot_mapping)
        # A cache in another dtype than the activations (bf16 KV under float32 weights): attention
        # runs in the cache's dtype, so its kernels see one dtype; no-ops otherwise.
        q = q.to(k_cache.dtype)
        out = self.ops.paged_attention(q, k_cache, v_cache, metadata, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(-1, c.q_size).to(x.dtype))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, config.mlp_bias, dtype)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, config.mlp_bias, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, ops: Ops, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.self_attn = LlamaAttention(config, layer_idx, ops, dtype)
        self.mlp = LlamaMLP(config, ops, dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: KVCache,
        metadata: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # The residual add is fused into the norm that follows it: (hidden, residual) travel together.
        norm = self.input_layernorm
        x, residual = self.ops.rmsnorm(hidden, norm.weight, norm.eps, residual)
        x = self.self_attn(x, positions, cos_sin_cache, kv_cache, metadata)
        norm = self.post_attention_layernorm
        x, residual = self.ops.rmsnorm(x, norm.weight, norm.eps, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, dtype: torch.dtype):
        super().__init__()
        self.ops = ops
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, dtype=dtype, _freeze=True)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i, ops, dtype) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, ops: Ops, dtype: torch.dtype, max_positions: int):
        super().__init__()
        self.config = config
        self.ops = ops
        self.model = LlamaModel(config, ops, dtype)
        self.lm_head = None
        self.prompt_rows: PromptRows | None = None  # int8 weights: which rows are prompt tokens, per step
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, False, dtype)
        cache = build_cos_sin_cache(config.rope.inv_freq(config.head_dim), max_positions)  # [P, D] float32
        self.register_buffer("cos_sin_cache", cache, persistent=False)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [N] int64
        positions: torch.Tensor,  # [N] int64
        kv_caches: list[KVCache],  # one per layer
        metadata: AttentionMetadata,
        logits_indices: torch.Tensor,  # [S] int64: rows of the flat batch to compute logits for
    ) -> torch.Tensor:
        """[S, vocab_size] logits in float32, one row per index in logits_indices."""
        try:
            hidden = self.model.embed_tokens(input_ids)
            residual = None
            for layer, kv_cache in zip(self.model.layers, kv_caches):
                hidden, residual = layer(hidden, residual, positions, self.cos_sin_cache, kv_cache, metadata)
        finally:
            if self.prompt_rows is not None:  # a plan is for one forward pass
                self.prompt_rows.clear()
        norm = self.model.norm
        hidden, _ = self.ops.rmsnorm(hidden, norm.weight, norm.eps, residual)
        if self.lm_head is not None:
            return self.lm_head(hidden[logits_indices]).float()
        return F.linear(hidden[logits_indices], self.model.embed_tokens.weight).float()

    def pack_for_cpu(self) -> None:
        """Reorders every linear weight for oneDNN (kernels/linear_cpu.py: batched decode steps run up
        to 1.65x faster); a tied head gets a reordered copy of the embedding, which the token lookup
        still reads in its plain layout."""
        if self.lm_head is None and linear_cpu.can_pack(self.model.embed_tokens.weight):
            vocab_size, hidden_size = self.model.embed_tokens.weight.shape
            self.lm_head = Linear(hidden_size, vocab_size, False, self.model.embed_tokens.weight.dtype)
            self.lm_head.weight = self.model.embed_tokens.weight
        linear_cpu.pack_linear_layers(self, layer_types=(Linear,))


def load_model(
    model_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    ops: Ops | None = None,
    max_positions: int | None = None,
    weight_dtype: str | None = None,
    shard: TensorParallelShard | None = None,
) -> LlamaForCausalLM:
    """Builds the model config.json names and fills it from the directory's safetensors files.
    weight_dtype "int8" / "int4" quantizes the loaded weights (models/weight_dtypes.py), activations
    staying in `dtype`; None or a float name keeps every weight in `dtype`. With `shard`, builds one
    rank's part of a tensor-parallel model, reading only that rank's slices (models/tensor_parallel.py)."""
    model_dir = Path(model_dir)
    config = ModelConfig.from_dir(model_dir)
    if shard is not None:
        if weight_dtype in weight_dtypes.QUANTIZED:
            raise ValueError(f"weight_dtype {weight_dtype!r} is not supported with tensor parallelism")
        config = shard.local_config(config)
    dtype = dtype or config.dtype
    with torch.device(device):
        model = LlamaForCausalLM(config, ops or get_ops("auto"), dtype, max_positions or config.max_position_embeddings)
    params = dict(model.named_parameters())
    rows_loaded = dict.fromkeys(params, 0)
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensor = f.get_tensor(name) if shard is None else shard.read(name, f.get_slice(name))
                loaded = _load_weight(model, params, name, tensor)
                if loaded is not None:
                    rows_loaded[loaded[0]] += loaded[1]
    missing = [name for name, param in params.items() if rows_loaded[name] != param.shape[0]]
    if missing:
        raise InvalidArgument(f"checkpoint in {model_dir} lacks (part of) {missing[:5]}")
    if shard is not None:
        shard.parallelize(model)  # before packing: the packed layers then sit inside its wrappers
    if weight_dtype in weight_dtypes.QUANTIZED:
        weight_dtypes.quantize_model(model, weight_dtype, dtype)
    elif torch.device(device).type == "cpu":
        model.pack_for_cpu()
    return model.eval()


# Checkpoint projection -> our fused parameter; the row offsets within it come from the config.
_FUSED = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj",
          "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}


def _load_weight(
    model: LlamaForCausalLM, params: dict[str, nn.Parameter], name: str, tensor: torch.Tensor
) -> tuple[str, int] | None:
    """Copies one checkpoint tensor into its (possibly fused) parameter: (parameter name, rows filled)."""
    if name == "lm_head.weight" and model.lm_head is None:
        return None  # tied: the embedding is the head
    if "rotary_emb." in name:
        return None  # old checkpoints store inv_freq; ours is computed from config.json
    c = model.config
    row_offsets = {"q_proj": 0, "k_proj": c.q_size, "v_proj": c.q_size + c.kv_size,
                   "gate_proj": 0, "up_proj": c.intermediate_size}
    target, dest = name, None
    for part, fused in _FUSED.items():
        if f".{part}." in name:
            target = name.replace(f".{part}.", f".{fused}.")
            if target in params:
                start = row_offsets[part]
                dest = params[target][start : start + tensor.shape[0]]
            break
    else:
        dest = params.get(name)
    if dest is None:
        raise InvalidArgument(f"checkpoint tensor {name!r} matches no parameter of {c.model_type}")
    if dest.shape != tensor.shape:
        raise InvalidArgument(
            f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(dest.shape)}"
        )
    dest.copy_(tensor)
    return target, tensor.shape[0]


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise InvalidArgument(f"{model_dir} has no *.safetensors files (pickled checkpoints are never loaded)")
    return files
