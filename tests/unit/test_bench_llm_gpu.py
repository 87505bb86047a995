"""The GPU LLM benchmark's roofline byte counts (bench/llm_roofline.py) and its command line.

The counts are checked against models transformers builds and against published parameter counts;
the benchmark itself needs CUDA, so here only --help, the no-CUDA message and a --smoke run on the
CPU (a tiny random model end to end, figures meaningless) are exercised.
"""

from __future__ import annotations

import json

import pytest
import torch

from bench import llm_roofline as roofline
from bench.bench_llm_gpu import LLAMA_1B, main, parse_args
from services.worker.models.hf_config import ModelConfig

SMOLLM2 = dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
               num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def config(**fields) -> ModelConfig:
    return ModelConfig.from_dict({"model_type": "llama", **fields})


@pytest.mark.parametrize("model_type, fields", [
    ("llama", dict(tie_word_embeddings=True)),
    ("llama", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)),
    ("llama", dict(head_dim=24, num_key_value_heads=1)),  # head_dim apart from hidden / heads
    ("qwen2", dict(tie_word_embeddings=False)),  # q/k/v biases, none on o
])
def test_parameter_count_is_what_transformers_builds(model_type, fields):
    import transformers

    shape = {**dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2), **fields}
    classes = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
               "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}
    config_class, model_class = classes[model_type]
    hf_config = config_class(**shape)
    model = model_class(hf_config)
    expected = sum(p.numel() for p in model.parameters())  # a tied table counts once
    counts = roofline.parameter_counts(ModelConfig.from_dict({**hf_config.to_dict(), "model_type": model_type}))
    assert counts.total == expected


def test_parameter_counts_of_the_benchmarked_models():
    assert roofline.parameter_counts(config(**SMOLLM2)).total == 134_515_008  # SmolLM2-135M
    assert roofline.parameter_counts(config(**LLAMA_1B)).total == 1_235_814_400  # Llama-3.2-1B


def test_a_tied_models_step_reads_the_table_once_as_lm_head():
    llama = config(**LLAMA_1B)
    step = roofline.decode_step_bytes(llama, batch_size=32, mean_context_len=100.5, weight_elem_bytes=2,
                                      kv_elem_bytes=2)
    assert step.weights == 1_235_814_400 * 2
    kv_per_token = 16 * 2 * 8 * 64 * 2  # layers x (K, V) x KV heads x head_dim x bfloat16
    assert roofline.kv_bytes_per_token(llama, 2) == kv_per_token
    assert step.kv_read == 32 * 100.5 * kv_per_token
    assert step.kv_written == 32 * kv_per_token
    assert step.total == step.weights + step.kv_read + step.kv_written


def test_an_untied_models_step_reads_only_the_batchs_embedding_rows():
    untied = config(**{**SMOLLM2, "tie_word_embeddings": False})
    counts = roofline.parameter_counts(untied)
    step = roofline.decode_step_bytes(untied, batch_size=8, mean_context_len=0, weight_elem_bytes=4, kv_elem_bytes=2)
    assert counts.lm_head == counts.embedding == 49152 * 576
    assert step.weights == (counts.total - counts.embedding + 8 * 576) * 4
    assert step.kv_read == 0


def test_roofline_is_bytes_over_bandwidth():
    step = roofline.StepBytes(weights=3_000_000_000, kv_read=900_000_000, kv_written=100_000_000)
    assert roofline.roofline_ms(step, 4e12) == pytest.approx(1.0)


def test_help_describes_the_run(capsys):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--help"])
    assert exited.value.code == 0
    assert "--cuda-graphs" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["--models", "gpt2"], ["--cuda-graphs", "maybe"], ["--decode-steps", "1"]])
def test_bad_flags_are_refused(argv):
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    assert exited.value.code == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where CUDA is absent")
def test_without_cuda_it_says_so(capsys):
    assert main([]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err


def test_smoke_run_writes_the_results(tmp_path):
    out_dir = tmp_path / "run"
    assert main(["--smoke", "--batch-sizes", "1,2", "--prompt-tokens", "8", "--decode-steps", "2", "--warmup-steps",
                 "0", "--cuda-graphs", "off", "--out-dir", str(out_dir)]) == 0
    results = json.loads((out_dir / "results.json").read_text())
    points = results["models"][0]["points"]
    assert {(p["system"], p["batch_size"]) for p in points} == {(s, b) for s in ("ours", "transformers") for b in (1, 2)}
    # timings on a loaded CPU mean nothing (a derived transformers step can even come out negative)
    assert all(p["roofline_ms"] > 0 and "vs_roofline" in p and "decode_tokens_per_s" in p for p in points)
    assert "x roofline" in (out_dir / "ratios.md").read_text()
