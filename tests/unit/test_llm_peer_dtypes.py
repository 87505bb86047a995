"""bench/llm_peer_dtypes.py: which systems run in which dtype, the weight-bytes gauge as the worker
exposes it, and the issue's targets read off a run's points."""

from __future__ import annotations

import pytest

from bench.llm_peer_dtypes import (check_targets, parse_dtypes, stack_env, system_key, targets_in,
                                   weight_bytes_from_metrics)

MODEL = "SmolLM2-135M-Instruct"
EXPOSITION = f"""# HELP tensoryard_worker_weight_bytes Resident bytes of the LLM's weights.
# TYPE tensoryard_worker_weight_bytes gauge
tensoryard_worker_weight_bytes{{model="other",version="1",worker="w0",dtype="float32"}} 5.0
tensoryard_worker_weight_bytes{{model="{MODEL}",version="1",worker="w1",dtype="int4"}} 1.2345678e+08
tensoryard_model_weight_bytes{{model="{MODEL}",version="1",worker="w1"}} 9.0
"""


def test_dtypes_parse_in_order_once_and_refuse_unknown_names():
    assert parse_dtypes("bfloat16, float32,bfloat16,int8") == ["bfloat16", "float32", "int8"]
    with pytest.raises(ValueError, match="--dtypes"):
        parse_dtypes("float32,fp8")
    with pytest.raises(ValueError):
        parse_dtypes(" , ")


def test_vllm_runs_in_float_dtypes_only_and_llamacpp_once():
    targets = ["tensoryard", "vllm", "llamacpp"]
    assert targets_in("bfloat16", targets, first=True) == targets
    assert targets_in("float32", targets, first=False) == ["tensoryard", "vllm"]
    assert targets_in("int8", targets, first=False) == ["tensoryard"]
    assert system_key("vllm", "bfloat16") == "vllm:bfloat16" and system_key("llamacpp", "float32") == "llamacpp"


def test_quantized_weights_get_a_bfloat16_cache_and_float_ones_their_own():
    assert stack_env("int4", "auto")["TENSORYARD_KV_CACHE_DTYPE"] == "bfloat16"
    env = stack_env("float32", "cpu")
    assert {k: env[k] for k in ("TENSORYARD_WEIGHT_DTYPE", "TENSORYARD_KV_CACHE_DTYPE", "TENSORYARD_KERNELS")} == {
        "TENSORYARD_WEIGHT_DTYPE": "float32", "TENSORYARD_KV_CACHE_DTYPE": "float32", "TENSORYARD_KERNELS": "cpu"}
    assert float(env["TENSORYARD_MAX_QUEUE_WAIT_S"]) >= 60  # queues like the peers, no shedding


def test_the_weight_bytes_gauge_is_read_for_the_model_asked_for():
    assert weight_bytes_from_metrics(EXPOSITION, MODEL) == {"weight_bytes": 123456780, "weight_dtype_reported": "int4"}
    with pytest.raises(RuntimeError, match="absent"):
        weight_bytes_from_metrics(EXPOSITION, "absent")


def _point(target, dtype, concurrency, tokens_per_s, ttft_ms=10.0):
    return {"target": target, "dtype": dtype, "loop": "closed", "concurrency": concurrency,
            "output_tokens_per_s": tokens_per_s, "ttft_p50_ms": ttft_ms}


def test_targets_are_judged_on_the_runs_own_numbers_and_unknown_where_a_system_did_not_run():
    points = [_point("tensoryard", "bfloat16", 32, 300.0, ttft_ms=12.0), _point("vllm", "bfloat16", 32, 180.0),
              _point("tensoryard", "bfloat16", 1, 50.0), _point("tensoryard", "int8", 1, 60.0)]
    systems = {"tensoryard:int4": {"weight_bytes": 25}, "tensoryard:float32": {"weight_bytes": 100}}
    rows = {row["target"]: row for row in check_targets(points, systems)}
    bf16 = rows["bfloat16 c=32 tok/s, tensoryard / vLLM"]
    assert bf16["value"] == pytest.approx(300 / 180) and bf16["met"] is True
    assert rows["bfloat16 c=32 TTFT p50, tensoryard / vLLM"]["met"] is False  # 12 ms against 10: worse
    assert rows["float32 c=32 tok/s, tensoryard / vLLM"] == {**rows["float32 c=32 tok/s, tensoryard / vLLM"],
                                                              "value": None, "met": None}
    assert rows["int8 c=1 tok/s / tensoryard bfloat16 c=1"]["met"] is False  # 1.2x < 1.3x
    assert rows["int4 resident weight bytes / float32"]["value"] == pytest.approx(0.25)
    assert rows["int4 resident weight bytes / float32"]["met"] is True
