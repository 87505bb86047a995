"""The decode step's memory roofline: the bytes one step must move and the device's copy bandwidth.

A decode step of a dense model reads every weight once (the lm_head matrix in full, the embedding
table only for the batch's rows, unless the two are tied and the table is the lm_head) and, per
sequence, the K and V of every cached token in every layer, and writes one new token's K and V per
sequence and layer. Its time cannot be below those bytes over the device's bandwidth: the roofline.
Activations and logits are left out (a few MB against GBs of weights): a step at the roofline
reads nothing twice and overlaps everything. The bandwidth is that of one large device-to-device
copy measured in the same run (bytes read + written over time), what a streaming kernel can reach.

Counts come from the engine's own reading of config.json (ModelConfig), so head_dim, biases and
tied embeddings are the ones the engine serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.worker.models.hf_config import ModelConfig

COPY_BYTES = 2**30  # the copied buffer: well past any L2 (H100/H200: 50-60 MB)


@dataclass(frozen=True, slots=True)
class ParameterCounts:
    embedding: int  # vocab x hidden: the input table
    layers: int  # every decoder layer's projections, biases and norms
    final_norm: int
    lm_head: int  # 0 when tied to the embedding table

    @property
    def total(self) -> int:
        return self.embedding + self.layers + self.final_norm + self.lm_head


def parameter_counts(config: ModelConfig) -> ParameterCounts:
    """Parameters of a Llama/Qwen2-style decoder (what `transformers` builds for the config)."""
    hidden, q_size, kv_size = config.hidden_size, config.q_size, config.kv_size
    attention = hidden * (q_size + 2 * kv_size) + q_size * hidden
    attention += (q_size + 2 * kv_size) * config.qkv_bias + hidden * config.o_bias
    mlp = 3 * hidden * config.intermediate_size + (2 * config.intermediate_size + hidden) * config.mlp_bias
    per_layer = attention + mlp + 2 * hidden  # input and post-attention RMSNorm weights
    embedding = config.vocab_size * hidden
    return ParameterCounts(
        embedding=embedding, layers=config.num_layers * per_layer, final_norm=hidden,
        lm_head=0 if config.tie_word_embeddings else embedding,
    )


def kv_bytes_per_token(config: ModelConfig, kv_elem_bytes: int) -> int:
    """K and V of one token in every layer."""
    return config.num_layers * 2 * config.kv_size * kv_elem_bytes


@dataclass(frozen=True, slots=True)
class StepBytes:
    weights: int
    kv_read: int
    kv_written: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_read + self.kv_written


def decode_step_bytes(config: ModelConfig, batch_size: int, mean_context_len: float, weight_elem_bytes: int,
                      kv_elem_bytes: int) -> StepBytes:
    """What one decode step of batch_size sequences must move, at mean_context_len cached tokens a
    sequence (the new token included: attention reads it too)."""
    counts = parameter_counts(config)
    lm_head = counts.lm_head or counts.embedding  # tied: the table is read in full as the lm_head
    gathered_rows = 0 if config.tie_word_embeddings else batch_size * config.hidden_size
    weights = (counts.layers + counts.final_norm + lm_head + gathered_rows) * weight_elem_bytes
    per_token = kv_bytes_per_token(config, kv_elem_bytes)
    return StepBytes(weights=weights, kv_read=round(batch_size * mean_context_len * per_token),
                     kv_written=batch_size * per_token)


def roofline_ms(step_bytes: StepBytes, bandwidth_bytes_per_s: float) -> float:
    return step_bytes.total / bandwidth_bytes_per_s * 1e3


def copy_bandwidth_bytes_per_s(device: torch.device, num_bytes: int = COPY_BYTES, iterations: int = 20) -> float:
    """Device-to-device copy of a num_bytes buffer: (read + write) bytes per second, the best of
    `iterations` timed copies after warm-up (the best is the device's capability; later ones only add noise)."""
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    for _ in range(3):
        target.copy_(source)
    if device.type != "cuda":  # --smoke on the CPU: wall clock
        import time

        best_s = float("inf")
        for _ in range(iterations):
            started = time.perf_counter()
            target.copy_(source)
            best_s = min(best_s, time.perf_counter() - started)
        return 2 * num_bytes / best_s
    torch.cuda.synchronize(device)
    times_ms = []
    for _ in range(iterations):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        target.copy_(source)
        end.record()
        end.synchronize()
        times_ms.append(start.elapsed_time(end))
    return 2 * num_bytes / (min(times_ms) / 1e3)
