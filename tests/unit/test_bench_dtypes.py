"""bench/bench_dtypes.py's whole-request timing on a tiny engine: every round serves its request to
the end, and the first token comes before the request ends."""

from __future__ import annotations

from bench.bench_dtypes import request_times_s
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from tests.engine.checkpoints import save_checkpoint


def test_whole_requests_are_timed_to_their_last_token(tmp_path):
    save_checkpoint(tmp_path, "llama", seed=3, num_hidden_layers=1, eos_token_id=None)
    engines = {name: LLMEngine(EngineConfig(
        model_dir=str(tmp_path), weight_dtype=weight_dtype, max_model_len=64,
        cache=CacheConfig(block_size=16, num_blocks=8), scheduler=SchedulerConfig(max_num_seqs=1),
    ), tokenizer=None) for name, weight_dtype in (("float32", "float32"), ("int8", "int8"))}
    medians = request_times_s(engines, [[5, 6, 7, 8], [9, 10, 11]], output_tokens=6, warmup=1)
    for name, engine in engines.items():
        total_s, first_s = medians[name]
        assert 0 < first_s < total_s
        assert not engine.has_unfinished()
        assert engine.num_generated_tokens == 3 * 6  # the warm-up round and two timed ones
