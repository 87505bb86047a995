"""LLM decode on the GPU: our engine with and without CUDA graphs against transformers and vLLM, and
against the memory roofline, in one run.

    .venv/bin/python -m bench.bench_llm_gpu [--models smollm2,llama-1b] [--batch-sizes 1,32,128]
        [--cuda-graphs on,off] [--prompt-tokens 512] [--decode-steps 32] [--warmup-steps 4]
        [--dtype bfloat16] [--skip-transformers] [--skip-vllm] [--out-dir DIR] [--smoke]

Models: SmolLM2-135M-Instruct (the demo model, imported from its GGUF as bench/bench_dtypes.py does)
and a random-weight model of Llama-3.2-1B's shape (16 layers, hidden 2048, 32 query / 8 KV heads of
64, intermediate 8192, vocab 128,256, tied embeddings), built with transformers' LlamaForCausalLM
and saved as safetensors. Every system decodes the same thing: batch_size prompts of
--prompt-tokens random token ids, greedy, exactly the new tokens asked for.

- ours: an in-process LLMEngine (backend "auto": triton on CUDA), all prompts prefilled first, then
  --warmup-steps and --decode-steps timed decode steps; the median step is the step time. With and
  without CUDA graphs (EngineConfig.cuda_graphs) where the engine has the option; "not available"
  where it has not. The JSON records whether graphs were in use (the engine captures them only on
  CUDA with the triton backend).
- transformers: the same batch (static, no padding needed: equal lengths), attn_implementation
  "sdpa", model.generate with min_new_tokens = max_new_tokens; a decode step is
  (time for N + 1 new tokens - time for 1) / N, so the prefill drops out.
- vLLM where it imports: LLM.generate on the same token ids, CUDA graphs on (its default) and off
  (enforce_eager) as --cuda-graphs says, the decode step derived the same way.
- roofline (bench/llm_roofline.py): weights + KV bytes of a step at the points' mean context over
  the device's copy bandwidth, measured first in the same run; target: ours <= 1.5x.

Writes bench/results/llm-gpu-<UTC>/ (results.json, decode.png, ratios.md) and prints the ratio table.
Needs CUDA; --smoke runs a tiny random model on the CPU end to end (its figures mean nothing) to
check the script itself.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from bench import llm_gpu_report as report
from bench import llm_roofline as roofline
from bench.machine import machine_info
from bench.result_files import RESULTS_DIR
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.models.hf_config import ModelConfig

# Llama-3.2-1B's shape; the weights are random (the benchmark moves bytes, it does not read text).
LLAMA_1B = dict(
    vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_theta=500000.0, bos_token_id=128000, eos_token_id=128001,
    rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=8192),
)
SMOKE_MODEL = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16, bos_token_id=1, eos_token_id=2)
MODELS = ("smollm2", "llama-1b")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BLOCK_SIZE = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {MODELS}")
    parser.add_argument("--batch-sizes", default="1,32,128")
    parser.add_argument("--cuda-graphs", default="on,off", help="our engine's settings to run: on, off or both")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--decode-steps", type=int, default=32, help="timed decode steps (new tokens) per point")
    parser.add_argument("--warmup-steps", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--out-dir", type=Path, help="default: bench/results/llm-gpu-<UTC>/")
    parser.add_argument("--smoke", action="store_true", help="a tiny random model on the CPU: checks the script")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.models = args.models.split(",")
    for name in args.models:
        if name not in MODELS:
            parser.error(f"--models: {name!r} is not one of {MODELS}")
    graphs = {"on": True, "off": False}
    try:
        args.cuda_graphs = [graphs[g] for g in args.cuda_graphs.split(",")]
    except KeyError:
        parser.error(f"--cuda-graphs must list 'on' and/or 'off', got {args.cuda_graphs!r}")
    if args.decode_steps < 2 or args.warmup_steps < 0 or args.prompt_tokens < 1:
        parser.error("--decode-steps must be >= 2, --warmup-steps >= 0, --prompt-tokens >= 1")
    return args


# ---------------------------------------------------------------------------------------- models

def build_random_llama(folder: Path, config_fields: dict, dtype: torch.dtype, device: torch.device) -> Path:
    """A random-weight LlamaForCausalLM of this shape, saved as config.json + safetensors."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device(device):  # initialised on the device: a 1B model inits in seconds there
        model = LlamaForCausalLM(LlamaConfig(**config_fields)).to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    return folder


def model_folder(name: str, tmp: Path, dtype: torch.dtype, device: torch.device, smoke: bool) -> Path:
    if smoke:
        return build_random_llama(tmp / "smoke", SMOKE_MODEL, dtype, device)
    if name == "llama-1b":
        return build_random_llama(tmp / "llama-1b", LLAMA_1B, dtype, device)
    from services.worker.models.gguf_import import find_demo_gguf, import_gguf

    return import_gguf(find_demo_gguf(), tmp / "smollm2")


def prompts(batch_size: int, prompt_tokens: int, vocab_size: int, seed: int) -> list[list[int]]:
    """Random token ids, distinct per sequence (no prefix shared), clear of the low special ids."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(16, vocab_size, (batch_size, prompt_tokens), generator=generator).tolist()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------- ours

def engine_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(EngineConfig)}


def measure_engine(folder: Path, batch_size: int, args, device: torch.device, cuda_graphs: bool | None) -> dict:
    """Our engine's median decode step at batch_size; cuda_graphs None: the engine has no such option."""
    from services.worker.engine.engine import LLMEngine
    from services.worker.engine.sampler import SamplingParams

    total_steps = args.warmup_steps + args.decode_steps
    max_model_len = args.prompt_tokens + total_steps + 8
    fields = dict(
        model_dir=str(folder), dtype=args.dtype, device=str(device), backend="auto", max_model_len=max_model_len,
        cache=CacheConfig(block_size=BLOCK_SIZE, num_blocks=batch_size * (-(-max_model_len // BLOCK_SIZE) + 1),
                          enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=batch_size, max_num_batched_tokens=max(2048, args.prompt_tokens)),
    )
    if cuda_graphs is not None:
        fields["cuda_graphs"] = cuda_graphs
    engine = LLMEngine(EngineConfig(**fields))
    params = SamplingParams(temperature=0.0, max_tokens=total_steps + 2, ignore_eos=True)
    for i, prompt in enumerate(prompts(batch_size, args.prompt_tokens, engine.model_config.vocab_size, seed=0)):
        engine.add_request(f"b{i}", prompt, params)
    while engine.stats().num_queued_prompt_tokens:
        engine.step()  # prefill, and each sequence's first token
    step_s = []
    for step in range(total_steps):
        sync(device)
        started = time.perf_counter()
        outputs = engine.step()  # returns host token ids: the step has finished on the device
        elapsed = time.perf_counter() - started
        if sum(len(o.new_token_ids) for o in outputs) != batch_size:
            raise RuntimeError(f"a decode step at batch {batch_size} sampled for fewer sequences: preempted?")
        if step >= args.warmup_steps:
            step_s.append(elapsed)
    result = {
        "system": "ours", "cuda_graphs": cuda_graphs, "batch_size": batch_size,
        "backend": engine.runner.model.ops.name,
        "cuda_graphs_in_use": getattr(engine.runner, "graphs", None) is not None,
        "decode_step_ms": statistics.median(step_s) * 1e3, "decode_step_min_ms": min(step_s) * 1e3,
        # cached tokens a sequence has, on average over the timed steps (the new one included)
        "mean_context_len": args.prompt_tokens + 1 + args.warmup_steps + (args.decode_steps + 1) / 2,
    }
    del engine
    free_memory()
    return result


# ----------------------------------------------------------------------------------- transformers

def measure_transformers(folder: Path, batch_sizes: list[int], args, device: torch.device) -> list[dict]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[args.dtype],
                                                 attn_implementation="sdpa").to(device).eval()
    results = []
    for batch_size in batch_sizes:
        input_ids = torch.tensor(prompts(batch_size, args.prompt_tokens, model.config.vocab_size, seed=0),
                                 device=device)

        def generate_s(num_new_tokens: int) -> float:
            sync(device)
            started = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                     max_new_tokens=num_new_tokens, min_new_tokens=num_new_tokens, pad_token_id=0)
            sync(device)
            if out.shape[1] != input_ids.shape[1] + num_new_tokens:
                raise RuntimeError(f"generate made {out.shape[1] - input_ids.shape[1]} tokens, not {num_new_tokens}")
            return time.perf_counter() - started

        generate_s(2)  # warm-up: the first call at a shape costs more
        prefill_s = min(generate_s(1) for _ in range(2))
        full_s = min(generate_s(args.decode_steps + 1) for _ in range(2))
        results.append({"system": "transformers", "cuda_graphs": False, "batch_size": batch_size,
                        "decode_step_ms": (full_s - prefill_s) / args.decode_steps * 1e3,
                        "mean_context_len": args.prompt_tokens + 1 + (args.decode_steps + 1) / 2})
    del model
    free_memory()
    return results


# ------------------------------------------------------------------------------------------- vLLM

def measure_vllm(folder: Path, batch_sizes: list[int], args, cuda_graphs: bool) -> list[dict]:
    """vLLM's decode step at each batch size; raises ImportError where vLLM is not installed."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(folder), dtype=args.dtype, skip_tokenizer_init=True, enforce_eager=not cuda_graphs,
              max_model_len=args.prompt_tokens + args.decode_steps + 16, gpu_memory_utilization=0.5,
              enable_prefix_caching=False, max_num_seqs=max(batch_sizes), seed=0)
    vocab_size = ModelConfig.from_dir(folder).vocab_size
    results = []
    for batch_size in batch_sizes:
        batch = [{"prompt_token_ids": p} for p in prompts(batch_size, args.prompt_tokens, vocab_size, seed=0)]

        def generate_s(num_new_tokens: int) -> float:
            params = SamplingParams(temperature=0.0, max_tokens=num_new_tokens, min_tokens=num_new_tokens,
                                    ignore_eos=True, detokenize=False)
            started = time.perf_counter()
            llm.generate(batch, params, use_tqdm=False)
            return time.perf_counter() - started

        generate_s(2)
        prefill_s = min(generate_s(1) for _ in range(2))
        full_s = min(generate_s(args.decode_steps + 1) for _ in range(2))
        results.append({"system": "vllm", "cuda_graphs": cuda_graphs, "batch_size": batch_size,
                        "decode_step_ms": (full_s - prefill_s) / args.decode_steps * 1e3,
                        "mean_context_len": args.prompt_tokens + 1 + (args.decode_steps + 1) / 2})
    del llm
    free_memory()
    return results


# ------------------------------------------------------------------------------------------- main

def add_roofline(point: dict, config: ModelConfig, elem_bytes: int, bandwidth: float) -> dict:
    step = roofline.decode_step_bytes(config, point["batch_size"], point["mean_context_len"], elem_bytes, elem_bytes)
    point["decode_tokens_per_s"] = point["batch_size"] / point["decode_step_ms"] * 1e3
    point["roofline_bytes"] = dataclasses.asdict(step) | {"total": step.total}
    point["roofline_ms"] = roofline.roofline_ms(step, bandwidth)
    point["vs_roofline"] = point["decode_step_ms"] / point["roofline_ms"]
    return point


def run_model(name: str, folder: Path, args, device: torch.device, bandwidth: float, log) -> dict:
    config = ModelConfig.from_dir(folder)
    elem_bytes = DTYPES[args.dtype].itemsize
    graph_settings = args.cuda_graphs if "cuda_graphs" in engine_fields() else [None]
    points, errors = [], {}
    for batch_size in args.batch_sizes:
        for graphs in graph_settings:
            points.append(measure_engine(folder, batch_size, args, device, graphs))
            log(report.point_line(name, points[-1]))
    if not args.skip_transformers:
        points += measure_transformers(folder, args.batch_sizes, args, device)
    if not args.skip_vllm and device.type == "cuda":
        for graphs in args.cuda_graphs:
            try:
                points += measure_vllm(folder, args.batch_sizes, args, graphs)
            except ImportError as error:
                errors["vllm"] = f"not installed: {error}"
                break
            except Exception as error:  # recorded, not fatal: the other systems' figures stand
                errors[f"vllm_cuda_graphs_{'on' if graphs else 'off'}"] = f"{type(error).__name__}: {error}"
    for point in points:
        add_roofline(point, config, elem_bytes, bandwidth)
    counts = roofline.parameter_counts(config)
    return {
        "model": name, "folder_config": {k: getattr(config, k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
            "tie_word_embeddings")},
        "num_parameters": counts.total, "kv_bytes_per_token": roofline.kv_bytes_per_token(config, elem_bytes),
        "cuda_graphs_option": "available" if graph_settings != [None] else "not available",
        "points": points, "errors": errors,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke:
        device = torch.device("cpu")
        args.models = ["smoke"]
    elif not torch.cuda.is_available():
        print("bench_llm_gpu needs a CUDA device and none is visible (torch.cuda.is_available() is False); "
              "run it on a GPU machine, or pass --smoke to check the script on the CPU.", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
    created = datetime.now(timezone.utc)
    out_dir = args.out_dir or RESULTS_DIR / f"llm-gpu{'-smoke' if args.smoke else ''}-{created:%Y%m%dT%H%M%SZ}"

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    bandwidth = roofline.copy_bandwidth_bytes_per_s(device, 2**24 if args.smoke else roofline.COPY_BYTES)
    log(f"copy bandwidth: {bandwidth / 1e9:.0f} GB/s")
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = model_folder(name, Path(tmp), DTYPES[args.dtype], device, args.smoke)
            models.append(run_model(name, folder, args, device, bandwidth, log))
            free_memory()
    results = {
        "benchmark": "llm-gpu", "created_utc": created.isoformat(), "smoke": args.smoke,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "copy_bandwidth_bytes_per_s": bandwidth, "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
        "decode_steps": args.decode_steps, "warmup_steps": args.warmup_steps, "target_vs_roofline": report.TARGET,
        "models": models, "machine": machine_info(("torch", "triton", "transformers", "vllm")),
    }
    print(report.write(results, out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
