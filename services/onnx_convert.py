"""Making ONNX versions: int8 dynamic quantization, and a BERT-family sentence encoder exported.

`export_sentence_encoder` writes the encoder as the worker serves it on the torch path
(services/worker/models/sentence_encoder.py): BertModel, then mean or CLS pooling, then L2
normalisation, one graph `input_ids, attention_mask [B, T] int64 -> embedding [B, dim] float32`
with B and T dynamic. The torch path packs real tokens with data-dependent shapes (`nonzero`),
which a traced export would bake in; the export runs the same layers and weights on the padded
[B, T, H] layout instead, masking padding in attention as the torch path does, so both compute
the same embedding for every real token.

Tokenization stays outside the graph: an ONNX encoder version keeps the source version's
tokenizer and sentence-transformers files, and the worker tokenizes as on the torch path
(services/worker/onnx_encoder.py). One tokenizer implementation serves both paths, so the two
can only differ in the model, which is what the quality check measures.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from services.worker.models.bert import BertModel, load_bert
from services.worker.models.sentence_encoder import SentencePipeline

OPSET_VERSION = 17  # LayerNormalization is an op from 17; onnxruntime >= 1.14 runs it
ENCODER_INPUTS = ("input_ids", "attention_mask")
ENCODER_OUTPUT = "embedding"
QUANTIZATION_INT8 = "int8_dynamic"


def quantize_int8(source: Path, target: Path) -> Path:
    """Weights of MatMul/Gemm (and friends) to int8, activations quantized on the fly at run time
    (onnxruntime.quantization.quantize_dynamic): no calibration data needed. Per-channel scales:
    with one scale per tensor, all-MiniLM-L6-v2's embeddings kept only 0.91-0.96 cosine similarity
    with float32; per channel, 0.98-0.995."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if any(source.parent.glob(f"{source.name}.data")) or any(source.parent.glob(f"{source.name}_data")):
        # The quantized file would name its own external data after the temporary file.
        raise ValueError(f"{source.name} keeps its weights in an external-data file; quantizing such "
                         "models (over 2 GB) is not supported yet")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    quantize_dynamic(str(source), str(partial), weight_type=QuantType.QInt8, per_channel=True)
    partial.replace(target)  # only a complete file ever carries the target's name
    return target


class _PaddedSentenceEncoder(nn.Module):
    """The torch path's encoder on the padded layout: no data-dependent shapes, so it traces."""

    def __init__(self, bert: BertModel, pipeline: SentencePipeline):
        super().__init__()
        self.bert = bert
        self.pooling_mode = pipeline.pooling_mode
        self.normalize = pipeline.normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.bert.embeddings(input_ids, torch.zeros_like(input_ids))  # [B, T, H]
        batch_size, num_tokens, hidden_size = hidden.shape
        # [B, 1, 1, T]: 0 for tokens, the most negative float for padding (as PackedBatch.from_mask)
        additive_mask = (1.0 - attention_mask[:, None, None, :].to(hidden.dtype)) * torch.finfo(hidden.dtype).min
        for layer in self.bert.layers:
            qkv = torch.cat([layer.query(hidden), layer.key(hidden), layer.value(hidden)], dim=-1)
            # [B, T, 3H] -> three [B, heads, T, head_dim]
            query, key, value = qkv.view(batch_size, num_tokens, 3, layer.num_heads, -1).permute(2, 0, 3, 1, 4)
            attended = F.scaled_dot_product_attention(query, key, value, attn_mask=additive_mask)
            attended = attended.transpose(1, 2).reshape(batch_size, num_tokens, hidden_size)
            hidden = layer.attention_norm(hidden + layer.attention_out(attended))
            hidden = layer.mlp_norm(hidden + layer.mlp_out(layer.activation(layer.mlp_in(hidden))))
        if self.pooling_mode == "cls":
            pooled = hidden[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # [B, T, 1]
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2.0, dim=-1) if self.normalize else pooled


def export_sentence_encoder(folder: Path, target: Path) -> Path:
    """The sentence encoder in `folder` (a sentence-transformers or BERT folder, as the worker
    loads it) as one float32 ONNX file at `target`, batch and sequence axes dynamic."""
    pipeline = SentencePipeline.from_folder(Path(folder))
    bert = load_bert(pipeline.transformer_folder, device="cpu", pack_linears=False)
    module = _PaddedSentenceEncoder(bert, pipeline).eval()
    example_ids = torch.tensor([[101, 7592, 2088, 102], [101, 2088, 102, 0]], dtype=torch.int64)
    example_mask = (example_ids != 0).to(torch.int64)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    dynamic = {"batch": 0, "sequence": 1}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        # The TorchScript exporter: the torch.export-based one needs onnxscript, and this graph
        # (no control flow) exports the same either way.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            module, (example_ids, example_mask), str(partial), input_names=list(ENCODER_INPUTS),
            output_names=[ENCODER_OUTPUT], opset_version=OPSET_VERSION, dynamo=False,
            dynamic_axes={"input_ids": {v: k for k, v in dynamic.items()},
                          "attention_mask": {v: k for k, v in dynamic.items()},
                          ENCODER_OUTPUT: {0: "batch"}},
        )
    _name_output_width(partial, bert.config.hidden_size)
    partial.replace(target)
    return target


def _name_output_width(path: Path, width: int) -> None:
    """The exporter leaves the embedding's width symbolic ("Divembedding_dim_1"); it is the hidden
    size, and the config read from the graph should say so."""
    import onnx

    model = onnx.load(str(path))
    dim = model.graph.output[0].type.tensor_type.shape.dim[1]
    dim.Clear()
    dim.dim_value = width
    onnx.save(model, str(path))
