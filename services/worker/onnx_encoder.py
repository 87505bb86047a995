"""A sentence encoder whose model is an ONNX graph (`models export-onnx`), run by onnxruntime.

The graph takes `input_ids, attention_mask [B, T] int64` and returns `embedding [B, dim]` float32,
pooled and normalised inside (services/onnx_convert.py). Everything else is the torch path's
SentenceEncoder: the same tokenizer files, truncation, length buckets and padding, so an ONNX
version answers `text` requests, the Embeddings API and the gate exactly as the torch version does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from services.common.errors import FailedPrecondition
from services.onnx_convert import ENCODER_INPUTS, ENCODER_OUTPUT
from services.worker.models.bert import BertConfig
from services.worker.models.sentence_encoder import SentenceEncoder, SentencePipeline, _load_tokenizer, _read_json
from services.worker.onnx_session import session_device, session_signature


class OnnxSentenceEncoder(SentenceEncoder):
    def __init__(self, session: ort.InferenceSession, config: BertConfig, tokenizer, pipeline: SentencePipeline,
                 max_seq_length: int, pad_id: int):
        super().__init__(None, tokenizer, pipeline, max_seq_length, pad_id)
        self.session = session
        self.config = config

    @classmethod
    def from_session(cls, folder: Path, session: ort.InferenceSession) -> OnnxSentenceEncoder:
        _check_encoder_graph(session)
        pipeline = SentencePipeline.from_folder(folder)
        config = BertConfig.from_json(pipeline.transformer_folder / "config.json")
        max_seq_length = pipeline.max_seq_length
        if max_seq_length is None:  # as SentenceEncoder.from_folder
            tokenizer_config = _read_json(pipeline.transformer_folder / "tokenizer_config.json")
            max_seq_length = tokenizer_config.get("model_max_length", config.max_position_embeddings)
        max_seq_length = min(int(max_seq_length), config.max_position_embeddings)
        tokenizer, pad_id = _load_tokenizer(pipeline.transformer_folder, max_seq_length, pipeline.do_lower_case)
        return cls(session, config, tokenizer, pipeline, max_seq_length, pad_id)

    @property
    def dim(self) -> int:
        return self.config.hidden_size

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def device(self) -> torch.device:
        return torch.device(session_device(self.session))

    def embed_token_ids(self, input_ids, attention_mask) -> np.ndarray:
        """[B, T] int64 ids and mask -> [B, dim] float32 embeddings."""
        feeds = {"input_ids": np.ascontiguousarray(input_ids, dtype=np.int64),
                 "attention_mask": np.ascontiguousarray(attention_mask, dtype=np.int64)}
        return self.session.run([ENCODER_OUTPUT], feeds)[0]


def _check_encoder_graph(session: ort.InferenceSession) -> None:
    signature = session_signature(session)
    inputs = {t.name: t.datatype for t in signature.inputs}
    outputs = {t.name: t.datatype for t in signature.outputs}
    if inputs != dict.fromkeys(ENCODER_INPUTS, "INT64") or outputs.get(ENCODER_OUTPUT) != "FP32":
        raise FailedPrecondition(
            f"an ONNX embedding version needs inputs {list(ENCODER_INPUTS)} (INT64) and output "
            f"'{ENCODER_OUTPUT}' (FP32), as `models export-onnx` writes; this graph has inputs {inputs}, "
            f"outputs {outputs}"
        )
