"""Engine configuration: one frozen dataclass per component, checked once when built."""

from __future__ import annotations

from dataclasses import dataclass, field

_DTYPES = ("auto", "float32", "float16", "bfloat16")
_WEIGHT_DTYPES = (*_DTYPES, "int8", "int4")
_BACKENDS = ("auto", "torch", "cpu", "triton")


@dataclass(frozen=True, slots=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    kv_cache_memory_bytes: int = 512 * 2**20  # budget for K and V of all layers; sets num_blocks
    num_blocks: int | None = None  # overrides the budget when set (tests, profiling)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.kv_cache_memory_bytes < 1:
            raise ValueError(f"kv_cache_memory_bytes must be >= 1, got {self.kv_cache_memory_bytes}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # sequences running at once
    max_num_batched_tokens: int = 2048  # tokens computed per step: decodes, then prefill chunks
    max_num_waiting: int = 1024  # add_request raises Overloaded past this
    enable_chunked_prefill: bool = True
    # Fair sharing between tenants (virtual token counters): the service a tenant is charged per token.
    fair_prompt_token_weight: float = 1.0  # per prompt token computed (prefix-cache hits are free)
    fair_output_token_weight: float = 2.0  # per token sampled
    max_fair_preemptions_per_step: int = 1  # running sequences sent back to seat a tenant under its share; 0: none
    fair_idle_counter_ttl_s: float = 300.0  # an idle tenant's excess service (its debt) is forgotten after this

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_num_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("fair_prompt_token_weight", "fair_output_token_weight", "max_fair_preemptions_per_step",
                     "fair_idle_counter_ttl_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model_dir: str
    dtype: str = "auto"  # compute dtype; "auto": the checkpoint's own torch_dtype (see weight_dtype)
    # Weights: "auto" (follow dtype), a float dtype, or weight-only "int8" / "int4"; KV cache: "auto"
    # (the compute dtype) or a float dtype. What each means: services/worker/models/weight_dtypes.py.
    weight_dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    device: str = "cpu"
    # kernels (kernels/ops.py get_ops): "torch" (the reference), "cpu" (the compiled CPU decode
    # kernel), "triton", or "auto" (triton on CUDA, else cpu when the kernel is built, else torch)
    backend: str = "auto"
    # Decode-only steps replayed from CUDA graphs (services/worker/engine/cuda_graphs.py) where they
    # can be: a CUDA device and the triton backend. Elsewhere (CPU, the torch backend) always eager.
    cuda_graphs: bool = True
    max_model_len: int | None = None  # prompt + output tokens; None: the model's limit, capped by the pool
    seed: int = 0  # for requests that sample without a seed of their own
    # Ranks (devices) one replica's model is split over (engine/tp_runner.py); weights float only.
    tensor_parallel_size: int = 1
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.weight_dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be one of {_WEIGHT_DTYPES}, got {self.weight_dtype!r}")
        if self.kv_cache_dtype not in _DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1 and self.weight_dtype in ("int8", "int4"):
            raise ValueError(f"weight_dtype {self.weight_dtype!r} is not supported with tensor_parallel_size > 1 "
                             "(float weights only)")
