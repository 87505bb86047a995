"""How an LLM deployment's weight and KV-cache dtypes are chosen and reported: the version's config,
the worker's flag or TENSORYARD_ variable over it, and the resident-bytes gauge labelled by dtype."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

from services.common.config import WorkerConfig, build_config
from services.worker.engine.engine import EngineStats
from services.worker.engine_settings import engine_config_for
from services.worker.metrics import WorkerCollector
from services.worker.model_files import FetchedVersion
from services.worker.state import WorkerState
from services.worker.statistics import StatisticsRecorder
from tests.unit.test_metrics import registry_of, samples


def fetched(config: dict) -> FetchedVersion:
    return FetchedVersion("llm", 3, "generation", config, Path("/models/llm/3"))


def test_the_version_config_chooses_the_dtypes():
    engine = engine_config_for(fetched({"weight_dtype": "int8", "kv_cache_dtype": "bfloat16"}),
                               WorkerConfig(model_name="llm"))
    assert (engine.weight_dtype, engine.kv_cache_dtype) == ("int8", "bfloat16")


def test_a_version_without_dtypes_serves_its_checkpoint_dtype():
    engine = engine_config_for(fetched({}), WorkerConfig(model_name="llm"))
    assert (engine.weight_dtype, engine.kv_cache_dtype) == ("auto", "auto")


def test_the_worker_flag_or_environment_overrides_the_version():
    flags = build_config(WorkerConfig, flags={"model_name": "llm", "weight_dtype": "int4"})
    engine = engine_config_for(fetched({"weight_dtype": "int8", "kv_cache_dtype": "bfloat16"}), flags)
    assert (engine.weight_dtype, engine.kv_cache_dtype) == ("int4", "bfloat16")
    env = build_config(WorkerConfig, flags={"model_name": "llm"},
                       env={"TENSORYARD_WEIGHT_DTYPE": "bfloat16", "TENSORYARD_KV_CACHE_DTYPE": "float32"})
    engine = engine_config_for(fetched({"weight_dtype": "int8"}), env)
    assert (engine.weight_dtype, engine.kv_cache_dtype) == ("bfloat16", "float32")


def test_resident_weight_bytes_gauge_carries_the_weight_dtype():
    stats = EngineStats(num_running=0, num_waiting=0, num_used_blocks=0, num_free_blocks=10, num_total_blocks=10,
                        num_preemptions=0, num_chunked_prefills=0, num_prefix_query_tokens=0,
                        num_prefix_hit_tokens=0)
    loop = SimpleNamespace(stats=lambda: stats, last_progress_s=time.monotonic())
    model = SimpleNamespace(name="llm", version="3", statistics=StatisticsRecorder().snapshot, loop=loop,
                            weight_bytes=94_835_328, kv_cache_bytes=20, reports_load=True, queue_depth=0,
                            weight_dtype="int4", kv_cache_dtype="bfloat16")
    got = samples(registry_of(WorkerCollector(WorkerState(worker_id="w1", model_name="llm", model=model))))
    labels = frozenset({"model": "llm", "version": "3", "worker": "w1", "dtype": "int4"}.items())
    assert got[("tensoryard_worker_weight_bytes", labels)] == 94_835_328
