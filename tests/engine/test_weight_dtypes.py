"""Weight and KV-cache dtypes of the engine against float32, on a random-weight Llama checkpoint.

Quality: greedy agreement (the matching share of float32's greedy tokens before the first difference,
averaged over the 16 test prompts, 24 tokens each) and the perplexity ratio to float32 on a held-out
text: 256 tokens the float32 model itself samples (temperature 1), so the reference finds it likely
and a damaged model shows as a higher ratio. int8 and int4 compute in bfloat16 (their kernels' fast
path), so they carry bf16's error too. Measured on this checkpoint (agreement / ppl ratio):
bfloat16 0.88 / 0.9995, float32 weights + bf16 cache 1.00 / 0.9999, int8 0.61 / 1.003,
int4 0.11 / 1.094. Random Gaussian weights at initializer_range 0.15 are the hard case for 4 bits
(no outliers to spend the range on, near-flat logits); tests/engine/test_weight_dtypes_smollm2.py
shows int4 on real weights. Bounds sit below the measured figures with room for kernel rounding.
"""

from __future__ import annotations

import pytest
import torch

from services.rollout import quality
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampler import SamplingParams
from services.worker.models.weight_dtypes import resident_bytes_by_dtype, resolve
from tests.engine.checkpoints import byte_tokenizer, save_checkpoint
from tests.engine.test_engine_greedy import make_prompts, run_staggered

MAX_TOKENS = 24
# (weight_dtype, kv_cache_dtype) -> (min greedy agreement, max perplexity ratio)
BOUNDS = {
    ("bfloat16", "auto"): (0.75, 1.02),
    ("float32", "bfloat16"): (0.9, 1.01),
    ("int8", "auto"): (0.5, 1.02),
    ("int8", "float32"): (0.5, 1.02),
    ("int4", "auto"): (0.0, 1.20),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama")
    save_checkpoint(directory, "llama", seed=5)
    byte_tokenizer().save(str(directory / "tokenizer.json"))
    return directory


@pytest.fixture(scope="module")
def reference(checkpoint):
    return quality.make_engine(checkpoint, "float32")


@pytest.fixture(scope="module")
def figures(reference, held_out):
    return quality.reference_figures(reference, make_prompts(seed=11), held_out, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def held_out(reference):
    reference.add_request("held-out", [1, 40, 50], SamplingParams(temperature=1.0, seed=9, max_tokens=256,
                                                                   ignore_eos=True))
    tokens = [1, 40, 50]
    while reference.has_unfinished():
        for output in reference.step():
            tokens += output.new_token_ids
    return tokens


@pytest.mark.parametrize("weight_dtype,kv_cache_dtype", list(BOUNDS), ids=lambda v: v)
def test_quality_against_float32_is_within_bounds(checkpoint, figures, held_out, weight_dtype, kv_cache_dtype):
    candidate = quality.make_engine(checkpoint, weight_dtype, kv_cache_dtype)
    report = quality.evaluate(figures, candidate, make_prompts(seed=11), held_out, max_tokens=MAX_TOKENS)
    min_agreement, max_ratio = BOUNDS[weight_dtype, kv_cache_dtype]
    print(f"\n{weight_dtype} weights, {kv_cache_dtype} cache: greedy agreement {report.greedy_agreement:.3f} "
          f"({report.num_prompts_identical}/{report.num_prompts} whole), perplexity {report.ppl_candidate:.3f} "
          f"vs {report.ppl_reference:.3f} (ratio {report.ppl_ratio:.4f})")
    assert report.greedy_agreement >= min_agreement
    assert report.ppl_ratio <= max_ratio
    assert report.passes(quality.QualityBounds(min_agreement, max_ratio))


def test_float32_against_itself_is_perfect(checkpoint, reference, held_out):
    report = quality.evaluate(reference, quality.make_engine(checkpoint, "float32"), make_prompts(seed=11)[:4],
                              held_out, max_tokens=8)
    assert report.greedy_agreement == 1.0 and report.num_prompts_identical == 4
    assert report.ppl_ratio == pytest.approx(1.0, abs=1e-9)
    labels = report.labels()
    assert labels["quality.ppl_ratio"] == "1.0000" and labels["quality.weight_dtype"] == "float32"


def small_engine(directory, weight_dtype: str, kv_cache_dtype: str, batched: bool, backend: str = "torch") -> LLMEngine:
    """batched: a pool and token budget too small for the load (chunked prefill, preemption);
    else one sequence at a time with room to spare."""
    return LLMEngine(EngineConfig(
        model_dir=str(directory), backend=backend, weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype,
        max_model_len=96,
        cache=CacheConfig(block_size=4, num_blocks=32 if batched else 64, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=8 if batched else 1, max_num_batched_tokens=16 if batched else 128),
    ))


def run_both_ways(directory, weight_dtype: str, kv_cache_dtype: str, backend: str = "torch",
                  seed: int = 11) -> tuple[list[list[int]], list[list[int]]]:
    """(tokens under continuous batching with chunked prefill and preemption, tokens one at a time)."""
    prompts = make_prompts(seed=seed)
    max_tokens = [8 + (i * 5) % 17 for i in range(len(prompts))]
    batched_engine = small_engine(directory, weight_dtype, kv_cache_dtype, batched=True, backend=backend)
    batched = run_staggered(batched_engine, prompts, max_tokens)
    stats = batched_engine.stats()
    assert stats.num_preemptions > 0 and stats.num_chunked_prefills > 0
    alone = small_engine(directory, weight_dtype, kv_cache_dtype, batched=False, backend=backend)
    one_at_a_time = [quality.greedy_tokens(alone, [prompt], max_tokens[i])[0] for i, prompt in enumerate(prompts)]
    return [batched[f"r{i}"] for i in range(len(prompts))], one_at_a_time


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("weight_dtype", ["bfloat16", "int8", "int4"])
def test_batching_with_preemption_is_greedy_identical_to_one_at_a_time(checkpoint, weight_dtype, backend):
    """The linear kernels (oneDNN bf16, int8 and int4 weight-only) give each row the same result
    whatever the batch, and int8 layers choose their kernel by row (prompt or generated token), so
    with a float32 cache the batch changes no token: three prompt sets, the reference attention and
    the default one (the CPU decode kernel where built)."""
    for seed in (11, 12, 13):
        batched, one_at_a_time = run_both_ways(checkpoint, weight_dtype, "float32", backend=backend, seed=seed)
        for i, (got, expected) in enumerate(zip(batched, one_at_a_time)):
            assert got == expected, f"prompt set {seed}, request r{i}"


@pytest.mark.parametrize("weight_dtype", ["bfloat16", "int8", "int4", "float32"])
def test_batching_with_a_bfloat16_cache_stays_close_to_one_at_a_time_on_the_reference_path(checkpoint, weight_dtype):
    """On the torch reference path a bf16 cache's decode attention runs in bf16 through SDPA, whose
    rounding depends on how far a row is padded (the other sequences of its step): a rare last-bit
    difference can flip a greedy token. Measured agreement here is 0.9 to 1.0; the bound is the
    documented one. The CPU kernel (the default on CPU) is exact: the next test."""
    batched, one_at_a_time = run_both_ways(checkpoint, weight_dtype, "bfloat16")
    share, _ = quality.agreement(one_at_a_time, batched)
    print(f"\n{weight_dtype} weights, bf16 cache: batched vs one at a time, agreement {share:.3f}")
    assert share >= 0.75


@pytest.mark.parametrize("weight_dtype", ["bfloat16", "int8", "float32"])
def test_batching_with_a_bfloat16_cache_stays_close_to_one_at_a_time_on_the_cpu_kernel(checkpoint, weight_dtype):
    """The CPU decode kernel reads each sequence's blocks in place and accumulates in float32 in the
    same order whatever else the step holds; prompt attention runs in the cache's dtype through SDPA,
    whose bf16 rounding depends on how a prompt is chunked and on whether a token is decoded or
    recomputed after a preemption (docs/ENGINE.md). Measured agreement 0.92 to 1.0 over three prompt
    sets; with a float32 cache the tokens are identical (the test above)."""
    from kernels import paged_decode_cpu

    if paged_decode_cpu.load() is None:
        pytest.skip(f"the CPU decode kernel is not built here: {paged_decode_cpu.unavailable_reason()}")
    shares = []
    for seed in (11, 12, 13):
        batched, one_at_a_time = run_both_ways(checkpoint, weight_dtype, "bfloat16", backend="cpu", seed=seed)
        shares.append(quality.agreement(one_at_a_time, batched)[0])
    print(f"\n{weight_dtype} weights, bf16 cache, CPU kernel: agreement " + " ".join(f"{x:.3f}" for x in shares))
    assert min(shares) >= 0.85


def test_resident_weight_bytes_shrink_with_the_dtype(checkpoint):
    def layer_bytes(weight_dtype: str) -> int:
        model = quality.make_engine(checkpoint, weight_dtype).runner.model
        return sum(resident_bytes_by_dtype(model.model.layers).values())

    float32 = layer_bytes("float32")
    assert layer_bytes("bfloat16") == float32 // 2
    # int8: a byte a weight and a float32 scale a row; int4: half a byte and 8 bytes per 32 weights.
    assert layer_bytes("int8") <= 0.30 * float32
    assert layer_bytes("int4") <= 0.22 * float32


def test_kv_cache_dtype_sets_the_pool_and_its_size(checkpoint):
    engine = LLMEngine(EngineConfig(model_dir=str(checkpoint), backend="torch", weight_dtype="int8",
                                    kv_cache_dtype="bfloat16", cache=CacheConfig(kv_cache_memory_bytes=2**20)))
    k_cache, _ = engine.runner.kv_caches[0]
    assert k_cache.dtype is torch.bfloat16
    float32_blocks = LLMEngine(EngineConfig(model_dir=str(checkpoint), backend="torch",
                                            cache=CacheConfig(kv_cache_memory_bytes=2**20))).kv_cache.num_blocks
    assert engine.kv_cache.num_blocks == 2 * float32_blocks  # the same budget holds twice the tokens


def test_unknown_or_conflicting_dtypes_are_refused():
    with pytest.raises(ValueError, match="weight_dtype"):
        EngineConfig(model_dir="m", weight_dtype="int3")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(model_dir="m", kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="differ"):
        resolve("float32", "bfloat16", "auto", torch.float32)
    resolved = resolve("auto", "int4", "auto", torch.float32)
    assert resolved.compute_dtype is torch.bfloat16 and resolved.kv_cache_dtype is torch.bfloat16
    assert resolve("float32", "int8", "auto", torch.float32).compute_dtype is torch.float32


def test_quality_command_prints_the_labels_for_the_version(checkpoint, tmp_path, capsys):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("The river rises in the hills.\nA bridge was built across it.\n")
    code = quality.main([str(checkpoint), "--weight-dtype", "int8", "--held-out", str(held_out), "--max-tokens", "6",
                         "--max-ppl-ratio", "1.5"])
    out = capsys.readouterr().out
    assert code == 0
    assert '"weight_dtype": "int8"' in out and "--label quality.ppl_ratio=" in out
    assert quality.main([str(checkpoint), "--weight-dtype", "int8", "--held-out", str(held_out), "--max-tokens", "6",
                         "--max-ppl-ratio", "0.5"]) == 1  # a bound it cannot meet fails the gate
