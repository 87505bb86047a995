"""Sentence embeddings: the sentence-transformers pipeline on our BertModel.

A sentence-transformers folder describes its pipeline in `modules.json`:
Transformer -> Pooling -> optional Normalize. We support the modules that
BERT-family embedding models use (mean or CLS pooling, L2 normalisation) and
refuse any other module, because skipping one (a Dense projection, say) would
return embeddings that look fine and are wrong.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, normalizers

from kernels import pooling
from services.worker.models.bert import BertModel, load_bert

_MIN_BUCKET_NUM_TOKENS = 16


@dataclass(frozen=True, slots=True)
class SentencePipeline:
    """What `modules.json` and the module configs in a model folder ask for."""

    transformer_folder: Path  # holds config.json, tokenizer.json, model.safetensors
    max_seq_length: int | None  # None: take the tokenizer's model_max_length
    do_lower_case: bool
    pooling_mode: str  # "mean" or "cls"
    normalize: bool

    @classmethod
    def from_folder(cls, folder: Path) -> SentencePipeline:
        modules_path = folder / "modules.json"
        # A plain transformers folder: sentence-transformers falls back to mean pooling.
        modules = json.loads(modules_path.read_text(encoding="utf-8")) if modules_path.exists() else []
        by_type = {module["type"].rsplit(".", 1)[-1]: folder / module["path"] for module in modules}
        unsupported = sorted(set(by_type) - {"Transformer", "Pooling", "Normalize"})
        if unsupported:
            raise ValueError(f"{modules_path}: unsupported modules {unsupported}")
        transformer_folder = by_type.get("Transformer", folder)
        sbert = _read_json(transformer_folder / "sentence_bert_config.json")
        pooling_mode = "mean"
        if "Pooling" in by_type:
            pooling_mode = _pooling_mode(_read_json(by_type["Pooling"] / "config.json"))
        return cls(
            transformer_folder=transformer_folder,
            max_seq_length=sbert.get("max_seq_length"),
            do_lower_case=bool(sbert.get("do_lower_case", False)),
            pooling_mode=pooling_mode,
            normalize="Normalize" in by_type,
        )


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _pooling_mode(pooling_config: dict) -> str:
    """Accepts both the `pooling_mode` key and the older `pooling_mode_*_token(s)` flags."""
    mode = pooling_config.get("pooling_mode")
    if mode is None:
        flags = {key for key, value in pooling_config.items() if key.startswith("pooling_mode_") and value}
        legacy = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls"}
        modes = [legacy.get(flag, flag) for flag in sorted(flags)] or ["mean"]
        mode = modes[0] if len(modes) == 1 else modes
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if mode not in ("mean", "cls"):
        raise ValueError(f"pooling_mode {mode!r} is not supported (only 'mean' or 'cls')")
    return mode


def _load_tokenizer(folder: Path, max_seq_length: int, do_lower_case: bool) -> tuple[Tokenizer, int]:
    """Tokenizer that truncates like sentence-transformers and never pads; also the pad id."""
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    # tokenizer.json may carry its own fixed padding and truncation (128 for
    # all-MiniLM-L6-v2); sentence-transformers overrides both, so do we.
    pad_id = (tokenizer.padding or {}).get("pad_id", 0)
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=max_seq_length, strategy="longest_first", direction="right")
    if do_lower_case:
        # sentence-transformers prepends a Lowercase normalizer in this case.
        inner = tokenizer.normalizer
        tokenizer.normalizer = normalizers.Sequence([normalizers.Lowercase()] + ([inner] if inner else []))
    return tokenizer, pad_id


def pad_token_ids(
    token_id_lists: list[list[int]], pad_id: int, num_tokens: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads to `num_tokens` (default: the longest list): input_ids, attention_mask [B, T] int64."""
    longest = max((len(ids) for ids in token_id_lists), default=0)
    num_tokens = longest if num_tokens is None else num_tokens
    if num_tokens < longest:
        raise ValueError(f"num_tokens {num_tokens} is shorter than the longest sequence ({longest})")
    input_ids = np.full((len(token_id_lists), num_tokens), pad_id, dtype=np.int64)
    attention_mask = np.zeros((len(token_id_lists), num_tokens), dtype=np.int64)
    for row, ids in enumerate(token_id_lists):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def length_buckets(
    lengths: list[int], max_seq_length: int, max_num_batched_tokens: int
) -> list[tuple[list[int], int]]:
    """Groups indices by bucket length (next power of two, at least 16, capped
    at max_seq_length) so a short text never shares a batch with a long one;
    each group is split to keep rows * bucket length within max_num_batched_tokens.
    Returns (indices, bucket length) per batch, indices sorted by length."""
    groups: dict[int, list[int]] = {}
    for index in sorted(range(len(lengths)), key=lengths.__getitem__):
        padded = max(_MIN_BUCKET_NUM_TOKENS, 1 << max(lengths[index] - 1, 0).bit_length())
        groups.setdefault(min(padded, max_seq_length), []).append(index)
    batches = []
    for num_tokens, indices in groups.items():
        max_num_rows = max(1, max_num_batched_tokens // num_tokens)
        for start in range(0, len(indices), max_num_rows):
            batches.append((indices[start : start + max_num_rows], num_tokens))
    return batches


class SentenceEncoder:
    def __init__(
        self,
        model: BertModel,
        tokenizer: Tokenizer,
        pipeline: SentencePipeline,
        max_seq_length: int,
        pad_id: int,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.pad_id = pad_id
        self._max_seq_length = max_seq_length

    @classmethod
    def from_folder(
        cls, folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
    ) -> SentenceEncoder:
        pipeline = SentencePipeline.from_folder(Path(folder))
        model = load_bert(pipeline.transformer_folder, device=device, dtype=dtype)
        max_seq_length = pipeline.max_seq_length
        if max_seq_length is None:
            tokenizer_config = _read_json(pipeline.transformer_folder / "tokenizer_config.json")
            max_seq_length = tokenizer_config.get("model_max_length", model.config.max_position_embeddings)
        # Positions past the table would index out of range.
        max_seq_length = min(int(max_seq_length), model.config.max_position_embeddings)
        tokenizer, pad_id = _load_tokenizer(pipeline.transformer_folder, max_seq_length, pipeline.do_lower_case)
        return cls(model, tokenizer, pipeline, max_seq_length, pad_id)

    @functools.cached_property
    def mean_pool(self):
        """Mean pooling (+ L2 normalisation): the Triton kernel on CUDA, one launch for the batch; its
        torch reference elsewhere (the arithmetic this encoder has always done)."""
        return mean_pool_for(self.device)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def max_seq_length(self) -> int:
        return self._max_seq_length

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    @property
    def device(self) -> torch.device:
        return self.model.embeddings.word.weight.device

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids per text, special tokens included, truncated to max_seq_length."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts), add_special_tokens=True)]

    def pad_batch(
        self, token_id_lists: list[list[int]], num_tokens: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return pad_token_ids(token_id_lists, self.pad_id, num_tokens)

    @torch.inference_mode()
    def embed_token_ids(
        self, input_ids: torch.Tensor | np.ndarray, attention_mask: torch.Tensor | np.ndarray
    ) -> np.ndarray:
        """[B, T] int64 ids and mask -> [B, dim] float32 embeddings."""
        input_ids = torch.as_tensor(input_ids, dtype=torch.int64, device=self.device)
        attention_mask = torch.as_tensor(attention_mask, dtype=torch.int64, device=self.device)
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and attention_mask {tuple(attention_mask.shape)} "
                "must be the same [B, T] shape"
            )
        if input_ids.shape[1] > self.model.config.max_position_embeddings:
            raise ValueError(
                f"input_ids has {input_ids.shape[1]} tokens, more than "
                f"max_position_embeddings {self.model.config.max_position_embeddings}"
            )
        hidden = self.model(input_ids, attention_mask)  # [B, T, H] in the compute dtype
        if self.pipeline.pooling_mode == "cls":
            pooled = hidden[:, 0].float()  # right padding: the first token is [CLS]
            if self.pipeline.normalize:
                pooled = F.normalize(pooled, p=2, dim=-1)
        else:  # in float32 either way; the kernel reads the compute dtype and normalises in place
            pooled = self.mean_pool(hidden, attention_mask, normalize=self.pipeline.normalize)
        return pooled.cpu().numpy()

    def embed_texts(self, texts: list[str], max_num_batched_tokens: int = 2048) -> np.ndarray:
        """[N, dim] float32 embeddings, in the order of `texts`.

        Each batch is padded to its longest member, not to the bucket length:
        on CPU the extra bucket padding cost about 40% of throughput on short
        texts, and nothing here needs stable shapes."""
        return self.embed_token_lists(self.tokenize(texts), max_num_batched_tokens)

    def embed_token_lists(
        self, token_id_lists: list[list[int]], max_num_batched_tokens: int = 2048
    ) -> np.ndarray:
        """[N, dim] float32 embeddings of already tokenized texts, in their order."""
        embeddings = np.empty((len(token_id_lists), self.dim), dtype=np.float32)
        lengths = [len(ids) for ids in token_id_lists]
        for indices, _ in length_buckets(lengths, self.max_seq_length, max_num_batched_tokens):
            input_ids, attention_mask = self.pad_batch([token_id_lists[i] for i in indices])
            embeddings[indices] = self.embed_token_ids(input_ids, attention_mask)
        return embeddings


def mean_pool_for(device: torch.device):
    """kernels/pooling.py's kernel on CUDA, its torch reference elsewhere."""
    return pooling.mean_pool if device.type == "cuda" else pooling.mean_pool_ref
