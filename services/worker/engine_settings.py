"""An LLM version's engine settings: the version's config (set at registration) under the
worker's own flags, and what the loaded weights occupy.

Apart from loading.py so that what only reads settings does not import the serving stack (its
batcher and the `inference` protos, which a test process that uses tritonclient cannot load).
"""

from __future__ import annotations

import torch

from services.common.config import WorkerConfig
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.model_files import FetchedVersion


def engine_config_for(fetched: FetchedVersion, config: WorkerConfig) -> EngineConfig:
    version_config = fetched.config

    def pick(flag_value, key: str, default):
        return flag_value or version_config.get(key) or default

    cache = CacheConfig(kv_cache_memory_bytes=int(pick(config.kv_cache_bytes, "kv_cache_bytes", 512 * 2**20)))
    scheduler_defaults = SchedulerConfig()
    scheduler = SchedulerConfig(
        max_num_seqs=int(pick(config.max_num_seqs, "max_num_seqs", scheduler_defaults.max_num_seqs)),
        max_num_batched_tokens=int(
            pick(config.max_num_batched_tokens, "max_num_batched_tokens", scheduler_defaults.max_num_batched_tokens)
        ),
        max_num_waiting=int(pick(config.max_queue_size, "max_queue_size", scheduler_defaults.max_num_waiting)),
    )
    max_model_len = pick(config.max_model_len, "max_model_len", None)
    return EngineConfig(
        model_dir=str(fetched.folder),
        # "kernels", not "backend": a version's "backend" names its runtime (onnxruntime).
        backend=pick(config.kernels, "kernels", "auto"),
        dtype=pick(config.dtype, "dtype", "auto"),
        weight_dtype=pick(config.weight_dtype, "weight_dtype", "auto"),
        kv_cache_dtype=pick(config.kv_cache_dtype, "kv_cache_dtype", "auto"),
        device=config.device,
        max_model_len=int(max_model_len) if max_model_len else None,
        tensor_parallel_size=int(pick(config.tensor_parallel_size, "tensor_parallel_size", 1)),
        cache=cache,
        scheduler=scheduler,
    )


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a model's weights: its parameters and the tensors its layers hold as plain attributes
    (the CPU path's reordered linear weights), each tensor once (a tied head is one tensor)."""
    seen: set[int] = set()
    total = 0
    for layer in module.modules():
        for value in (*layer._parameters.values(), *vars(layer).values()):
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total
