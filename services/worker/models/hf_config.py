"""`ModelConfig`: the facts the Llama-family model code needs, read once from a Hugging Face config.json.

Accepts both the older layout (`rope_theta` and `rope_scaling` at the top level, scaling type under
`type` or `rope_type`) and the newer one (`rope_parameters` holding theta and the scaling type).
Anything the model code cannot honour is refused here with InvalidArgument naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from services.common.errors import InvalidArgument

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True, slots=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"  # one of SUPPORTED_ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only

    def inv_freq(self, head_dim: int) -> torch.Tensor:
        """[head_dim // 2] float32 inverse frequencies with the scaling folded in."""
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        if self.rope_type == "linear":
            return inv_freq / self.factor
        if self.rope_type == "llama3":
            return self._llama3(inv_freq)
        return inv_freq

    def _llama3(self, inv_freq: torch.Tensor) -> torch.Tensor:
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between blended.
        low_freq_wavelen = self.original_max_position_embeddings / self.low_freq_factor
        high_freq_wavelen = self.original_max_position_embeddings / self.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / self.factor, inv_freq)
        smooth = (self.original_max_position_embeddings / wavelen - self.low_freq_factor) / (
            self.high_freq_factor - self.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / self.factor + smooth * scaled
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # q/k/v projections carry a bias (Qwen2; Llama with attention_bias)
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # per layer: attend to the last W tokens, or None
    dtype: torch.dtype  # the checkpoint's own dtype
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "ModelConfig":
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise InvalidArgument(f"model directory {model_dir} has no config.json")
        config = cls.from_dict(json.loads(path.read_text()))
        # generation_config.json may name more end-of-sequence tokens (chat models often end a
        # turn with one that config.json does not list): generation stops at any of them.
        generation_path = Path(model_dir) / "generation_config.json"
        if generation_path.is_file():
            eos = json.loads(generation_path.read_text()).get("eos_token_id")
            extra = eos if isinstance(eos, list) else ([] if eos is None else [eos])
            merged = tuple(dict.fromkeys([*config.eos_token_ids, *(int(e) for e in extra)]))
            config = dataclasses.replace(config, eos_token_ids=merged)
        return config

    @classmethod
    def from_dict(cls, raw: dict) -> "ModelConfig":
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise InvalidArgument(f"config.json model_type must be one of {SUPPORTED_MODEL_TYPES}, got {model_type!r}")
        if raw.get("hidden_act", "silu") != "silu":
            raise InvalidArgument(f"config.json hidden_act must be 'silu', got {raw['hidden_act']!r}")
        num_heads = int(raw["num_attention_heads"])
        num_kv_heads = int(raw.get("num_key_value_heads") or num_heads)
        if num_heads % num_kv_heads:
            raise InvalidArgument("config.json num_attention_heads must be a multiple of num_key_value_heads")
        head_dim = int(raw.get("head_dim") or raw["hidden_size"] // num_heads)
        num_layers = int(raw["num_hidden_layers"])
        dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        if dtype_name not in _DTYPES:
            raise InvalidArgument(f"config.json torch_dtype must be one of {tuple(_DTYPES)}, got {dtype_name!r}")
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        is_qwen2 = model_type == "qwen2"
        return cls(
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope=_rope_config(raw),
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=True if is_qwen2 else bool(raw.get("attention_bias", False)),
            o_bias=False if is_qwen2 else bool(raw.get("attention_bias", False)),
            mlp_bias=False if is_qwen2 else bool(raw.get("mlp_bias", False)),
            sliding_windows=_sliding_windows(raw, model_type, num_layers),
            dtype=_DTYPES[dtype_name],
            eos_token_ids=eos_ids,
            bos_token_id=raw.get("bos_token_id"),
        )


def _rope_config(raw: dict) -> RopeConfig:
    params = dict(raw.get("rope_parameters") or {})
    params.update(raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise InvalidArgument(f"config.json rope_scaling type must be one of {SUPPORTED_ROPE_TYPES}, got {rope_type!r}")
    if rope_type == "default":
        return RopeConfig(theta=theta)
    if "factor" not in params:
        raise InvalidArgument(f"config.json rope_scaling of type {rope_type!r} needs 'factor'")
    if rope_type == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=float(params["factor"]))
    return RopeConfig(
        theta=theta,
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(
            params.get("original_max_position_embeddings", raw.get("max_position_embeddings", 8192))
        ),
    )


def _sliding_windows(raw: dict, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = raw.get("sliding_window")
    if model_type == "llama" or window is None:
        return (None,) * num_layers
    if model_type == "mistral":
        return (int(window),) * num_layers
    # qwen2: the window is off unless use_sliding_window; then layers from max_window_layers use it,
    # unless layer_types spells each layer out.
    if not raw.get("use_sliding_window", False):
        return (None,) * num_layers
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if i >= int(raw.get("max_window_layers", num_layers)) else "full_attention"
        for i in range(num_layers)
    ]
    return tuple(int(window) if t == "sliding_attention" else None for t in layer_types)
