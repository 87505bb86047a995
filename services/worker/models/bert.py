"""BERT encoder for inference: config, model and a safetensors loader.

The model is the plain Hugging Face `BertModel` computation (post-LayerNorm
encoder, absolute positions) without dropout, pooler or heads, so a checkpoint
saved by `transformers` or `sentence-transformers` loads and gives the same last
hidden state. Weights are read with `safetensors` only: a pickle in a model
folder can run code on load, a safetensors file cannot.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from kernels import linear_cpu

_ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


@dataclass(frozen=True, slots=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "max_position_embeddings",
            "type_vocab_size",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if not self.layer_norm_eps > 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps!r}")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not one of {sorted(_ACTIVATIONS)}")
        if not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is outside vocab_size {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_json(cls, path: str | Path) -> BertConfig:
        """Reads a Hugging Face `config.json`; keys other than ours are ignored."""
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
        model_type = raw.get("model_type", "bert")
        if model_type != "bert":
            raise ValueError(f"model_type must be 'bert', got {model_type!r}")
        # Relative position variants change the attention scores; refuse them
        # rather than silently computing something else.
        position_type = raw.get("position_embedding_type", "absolute")
        if position_type != "absolute":
            raise ValueError(f"position_embedding_type must be 'absolute', got {position_type!r}")
        fields = {name: raw[name] for name in cls.__dataclass_fields__ if raw.get(name) is not None}
        try:
            return cls(**fields)
        except TypeError as error:  # a required field is absent
            raise ValueError(f"{path}: {error}") from error


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        # Padding is on the right, so positions count from 0 in every row.
        position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)
        hidden = self.word(input_ids) + self.position(position_ids) + self.token_type(token_type_ids)
        return self.norm(hidden)  # [B, T, H]


@dataclass(frozen=True, slots=True)
class PackedBatch:
    """Where a batch's real tokens sit in its padded [B, T] grid.

    The linear layers, norms and the activation run on the real tokens only, packed as [N, H]; only
    attention needs the padded [B, heads, T, head_dim] layout. Short texts of mixed lengths carry
    about 20% padding when batched in arrival order, and skipping it made such batches of 32 18%
    faster on CPU; the serving path sorts a batch by length first (length buckets), which leaves
    less padding, and there the gain was ~5%."""

    batch_size: int
    num_tokens: int  # T, the padded length
    token_rows: torch.Tensor | None  # [N] int64 indices into the flattened [B * T] grid; None: no padding
    additive_mask: torch.Tensor  # [B, 1, 1, T]: 0 for tokens, the dtype's most negative value for padding

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor, dtype: torch.dtype) -> PackedBatch:
        batch_size, num_tokens = attention_mask.shape
        is_token = attention_mask.bool()
        # The most negative value, not -inf: a row with no real token stays finite instead of NaN.
        additive_mask = torch.zeros((batch_size, 1, 1, num_tokens), dtype=dtype, device=attention_mask.device)
        additive_mask.masked_fill_(~is_token[:, None, None, :], torch.finfo(dtype).min)
        token_rows = None if bool(is_token.all()) else is_token.flatten().nonzero().squeeze(1)
        return cls(batch_size, num_tokens, token_rows, additive_mask)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B * T, D] -> [N, D]"""
        return padded if self.token_rows is None else padded.index_select(0, self.token_rows)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[N, D] -> [B * T, D], zeros at the padding."""
        if self.token_rows is None:
            return packed
        padded = packed.new_zeros(self.batch_size * self.num_tokens, packed.shape[1])
        return padded.index_copy_(0, self.token_rows, packed)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)
        self.attention_out = nn.Linear(hidden_size, hidden_size)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.mlp_in = nn.Linear(hidden_size, config.intermediate_size)
        self.mlp_out = nn.Linear(config.intermediate_size, hidden_size)
        self.mlp_norm = nn.LayerNorm(hidden_size, eps=config.layer_norm_eps)
        self.activation = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor, batch: PackedBatch) -> torch.Tensor:
        """[N, H] packed tokens -> [N, H]"""
        hidden_size = hidden.shape[1]
        qkv = batch.unpack(torch.cat([self.query(hidden), self.key(hidden), self.value(hidden)], dim=1))
        # [B * T, 3H] -> three [B, heads, T, head_dim]
        query, key, value = qkv.view(batch.batch_size, batch.num_tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=batch.additive_mask)
        attended = batch.pack(attended.transpose(1, 2).reshape(-1, hidden_size))
        hidden = self.attention_norm(hidden + self.attention_out(attended))
        return self.mlp_norm(hidden + self.mlp_out(self.activation(self.mlp_in(hidden))))


class BertModel(nn.Module):
    """Embeddings and encoder layers; returns the last hidden state."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T] int64
        attention_mask: torch.Tensor,  # [B, T] int64, 1 = token, 0 = padding
        token_type_ids: torch.Tensor | None = None,  # [B, T] int64, zeros when None
    ) -> torch.Tensor:
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        hidden = self.embeddings(input_ids, token_type_ids)  # [B, T, H]
        batch = PackedBatch.from_mask(attention_mask, hidden.dtype)
        hidden = batch.pack(hidden.flatten(0, 1))
        for layer in self.layers:
            hidden = layer(hidden, batch)
        return batch.unpack(hidden).view(input_ids.shape[0], input_ids.shape[1], -1)  # [B, T, H], 0 at padding


# Our parameter names -> checkpoint names (Hugging Face layout).
_EMBEDDING_NAMES = {
    "embeddings.word.": "embeddings.word_embeddings.",
    "embeddings.position.": "embeddings.position_embeddings.",
    "embeddings.token_type.": "embeddings.token_type_embeddings.",
    "embeddings.norm.": "embeddings.LayerNorm.",
}
_LAYER_NAMES = {
    "query.": "attention.self.query.",
    "key.": "attention.self.key.",
    "value.": "attention.self.value.",
    "attention_out.": "attention.output.dense.",
    "attention_norm.": "attention.output.LayerNorm.",
    "mlp_in.": "intermediate.dense.",
    "mlp_out.": "output.dense.",
    "mlp_norm.": "output.LayerNorm.",
}
# Heads and buffers that a BERT-with-head checkpoint carries and we do not use.
_IGNORED_PREFIXES = ("pooler.", "cls.", "classifier.", "qa_outputs.")
_IGNORED_SUFFIXES = ("position_ids",)


def _checkpoint_name(our_name: str) -> str:
    for ours, theirs in _EMBEDDING_NAMES.items():
        if our_name.startswith(ours):
            return theirs + our_name.removeprefix(ours)
    _, layer_index, rest = our_name.split(".", 2)  # "layers.<i>.<rest>"
    for ours, theirs in _LAYER_NAMES.items():
        if rest.startswith(ours):
            return f"encoder.layer.{layer_index}.{theirs}{rest.removeprefix(ours)}"
    # Reached only if the tables above miss a parameter of BertModel.
    raise RuntimeError(f"no checkpoint name for parameter {our_name}")


def _canonical_name(stored_name: str) -> str:
    """Stored tensor name as a bare BertModel would save it."""
    name = stored_name.removeprefix("bert.")
    # TF-converted checkpoints name LayerNorm parameters gamma/beta.
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)


def _safetensors_files(folder: Path) -> list[Path]:
    index_path = folder / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise ValueError(f"{folder} holds no model.safetensors (other weight formats are not loaded)")


def _read_state_dict(folder: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Reads tensors for the parameters in `expected`, checking names and shapes."""
    our_names = {_checkpoint_name(name): name for name in expected}
    state_dict: dict[str, torch.Tensor] = {}
    for path in _safetensors_files(folder):
        with safe_open(str(path), framework="pt") as checkpoint:
            for stored_name in checkpoint.keys():
                name = _canonical_name(stored_name)
                if name.startswith(_IGNORED_PREFIXES) or name.endswith(_IGNORED_SUFFIXES):
                    continue
                if name not in our_names:
                    raise ValueError(f"unexpected tensor {stored_name!r} in {path.name}")
                tensor = checkpoint.get_tensor(stored_name)
                want_shape = expected[our_names[name]].shape
                if tensor.shape != want_shape:
                    raise ValueError(
                        f"tensor {stored_name!r} has shape {tuple(tensor.shape)}, expected {tuple(want_shape)}"
                    )
                state_dict[our_names[name]] = tensor
    missing = sorted(name for name, ours in our_names.items() if ours not in state_dict)
    if missing:
        raise ValueError(f"checkpoint in {folder} is missing tensors: {', '.join(missing)}")
    return state_dict


def load_bert(
    folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
    pack_linears: bool = True,
) -> BertModel:
    """Builds a BertModel from `config.json` and safetensors weights in `folder`.

    `pack_linears=False` keeps plain nn.Linear layers on the CPU: an ONNX export traces them, and
    the oneDNN-reordered weights have no ONNX form."""
    folder = Path(folder)
    config = BertConfig.from_json(folder / "config.json")
    # Built on the meta device: no memory or time spent on an init we overwrite.
    with torch.device("meta"):
        model = BertModel(config)
    state_dict = _read_state_dict(folder, model.state_dict())
    state_dict = {name: t.to(device=device, dtype=dtype) for name, t in state_dict.items()}
    model.load_state_dict(state_dict, assign=True)
    if pack_linears and torch.device(device).type == "cpu":
        # oneDNN-reordered weights: ~5% faster linears at the row counts of embedding batches.
        linear_cpu.pack_linear_layers(model)
    return model.eval()
