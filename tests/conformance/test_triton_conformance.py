"""The same tritonclient.grpc calls against real Triton and against tensoryard's router, compared.

Every comparison goes through `assert_conforms`: it walks both replies (as proto dicts) over the
fields both servers set, matches repeated entries by name, and fails on any difference whose path
is not in ALLOWED_DIFFERENCES. Error cases compare status codes, not messages.
"""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import json_format
from tritonclient.utils import InferenceServerException

pytestmark = pytest.mark.conformance

EMBED = "all-MiniLM-L6-v2"
LLM = "SmolLM2-135M-Instruct"
PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "hi", "", "naïve café 🚀 猫はソファ"]
GREEDY = {"temperature": 0, "max_tokens": 8}
STREAM_TIMEOUT_S = 120.0
# Triton (through PyTriton) flags no response final unless asked to (see ALLOWED_DIFFERENCES), so
# its streams end when nothing more comes for this long.
STREAM_IDLE_S = 5.0

# Where the two servers may differ, and why. Keys are the paths `differences` reports.
ALLOWED_DIFFERENCES = {
    "server_metadata.name": "each server names itself: 'triton' and 'tensoryard'",
    "server_metadata.version": "each server's own version",
    "server_metadata.extensions": "tensoryard implements a subset of Triton's extensions (checked as a subset)",
    "model_metadata.platform": "Triton reports the backend ('python'); tensoryard its own platform names",
    "model_metadata.inputs[input_ids]": "tensoryard's encoder also accepts pre-tokenized input",
    "model_metadata.inputs[attention_mask]": "tensoryard's encoder also accepts pre-tokenized input",
    "model_config.platform": "Triton reports the backend ('python'); tensoryard its own platform names",
    "model_config.backend": "'python' (PyTriton) and 'tensoryard'",
    "model_config.input[input_ids]": "tensoryard's encoder also accepts pre-tokenized input",
    "model_config.input[attention_mask]": "tensoryard's encoder also accepts pre-tokenized input",
    "model_config.parameters": "backend-specific: PyTriton's workspace path, tensoryard's max_seq_length/max_model_len",
    "model_config.dynamic_batching.preferred_batch_size": "PyTriton fills it in from max_batch_size",
    "repository_index.models": (
        "PyTriton loads models from config content, not from repository folders, and Triton's index "
        "lists repository folders only: Triton's index is empty"
    ),
    "repository_index.restricted": (
        "PyTriton guards the repository and statistics RPCs with an access token; tensoryard does not"
    ),
    "infer.decoupled_model": (
        "tensoryard answers ModelInfer on its decoupled LLM with the whole text; Triton refuses it "
        "(UNIMPLEMENTED: ModelInfer doesn't support decoupled models)"
    ),
    "stream.final_without_empty_final_response": (
        "PyTriton ends each decoupled request with a separate empty response, which Triton drops "
        "unless triton_enable_empty_final_response is set: its streams then carry no final flag"
    ),
    "stream.parameters.finish_reason": "tensoryard's usage parameters on the final response",
    "stream.parameters.prompt_tokens": "tensoryard's usage parameters on the final response",
    "stream.parameters.completion_tokens": "tensoryard's usage parameters on the final response",
    "stream.pieces": (
        "transformers' text streamer sends whole words, tensoryard each token's text: the joined "
        "text is compared, not the number of responses"
    ),
}


# -- comparing ----------------------------------------------------------------------------------


def as_dict(message) -> dict:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def differences(expected, actual, path: str) -> list[str]:
    """Paths where `actual` (tensoryard) differs from `expected` (Triton), over fields both set."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        # A parameters map is compared whole: a name only one server sends is a difference.
        found = [f"{path}.{key}" for key in expected.keys() ^ actual.keys()] if path.endswith(".parameters") else []
        for key in expected.keys() & actual.keys():
            found += differences(expected[key], actual[key], f"{path}.{key}")
        return found
    if isinstance(expected, list) and isinstance(actual, list):
        if bool(expected) != bool(actual):
            return [path]
        if all(isinstance(e, dict) and "name" in e for e in expected + actual):
            by_name = {e["name"]: e for e in expected}, {a["name"]: a for a in actual}
            found = [f"{path}[{name}]" for name in by_name[0].keys() ^ by_name[1].keys()]
            for name in by_name[0].keys() & by_name[1].keys():
                found += differences(by_name[0][name], by_name[1][name], f"{path}[{name}]")
            return found
        if len(expected) != len(actual):
            return [path]
        found = []
        for index, (e, a) in enumerate(zip(expected, actual)):
            found += differences(e, a, f"{path}[{index}]")
        return found
    return [] if expected == actual else [path]


def is_allowed(path: str) -> bool:
    """A path is allowed when it, or a field that holds it, is in ALLOWED_DIFFERENCES."""
    return any(path == key or path.startswith((key + ".", key + "[")) for key in ALLOWED_DIFFERENCES)


def assert_conforms(expected, actual, path: str) -> None:
    found = differences(expected, actual, path)
    unexpected = sorted(p for p in found if not is_allowed(p))
    assert not unexpected, (
        f"tensoryard differs from Triton at {unexpected}\nTriton:     {expected}\ntensoryard: {actual}"
    )


def status_of(call) -> str:
    """'OK', or the gRPC status code name that the call failed with."""
    try:
        call()
    except InferenceServerException as error:
        return str(error.status()).removeprefix("StatusCode.")
    return "OK"


# -- fixtures and builders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def servers(peer, stack):
    """(Triton client, tensoryard client), plus the header each needs for restricted RPCs."""
    with triton.InferenceServerClient(peer.address) as real, triton.InferenceServerClient(stack.router) as yard:
        yield (real, peer.headers), (yard, None)


def text_input(texts: list[str], typed: bool = False) -> triton.InferInput:
    tensor = triton.InferInput("text", [len(texts), 1], "BYTES")
    if typed:
        tensor._get_tensor().contents.bytes_contents.extend(t.encode() for t in texts)
    else:
        tensor.set_data_from_numpy(np.array([[t.encode()] for t in texts], dtype=object))
    return tensor


def raw_input(name: str, shape: list[int], datatype: str, raw: bytes) -> triton.InferInput:
    tensor = triton.InferInput(name, shape, datatype)
    tensor._raw_content = raw  # sent as is: lets a test send a malformed buffer
    return tensor


def llm_inputs(prompt: str, stream: bool = True, max_tokens: int | None = None, typed: bool = False):
    text = triton.InferInput("text_input", [1], "BYTES")
    flag = triton.InferInput("stream", [1], "BOOL")
    inputs = [text, flag]
    if max_tokens is not None:
        inputs.append(triton.InferInput("max_tokens", [1], "INT32"))
    if typed:
        text._get_tensor().contents.bytes_contents.append(prompt.encode())
        flag._get_tensor().contents.bool_contents.append(stream)
        if max_tokens is not None:
            inputs[2]._get_tensor().contents.int_contents.append(max_tokens)
    else:
        text.set_data_from_numpy(np.array([prompt.encode()], dtype=object))
        flag.set_data_from_numpy(np.array([stream]))
        if max_tokens is not None:
            inputs[2].set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    return inputs


class Stream:
    """One ModelStreamInfer call; responses and in-stream errors arrive on a queue."""

    def __init__(self, client: triton.InferenceServerClient):
        self.client = client
        self.events: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: self.events.put((result, error)))

    def send(self, model: str, inputs, request_id: str, parameters: dict | None = None) -> None:
        self.client.async_stream_infer(model, inputs, request_id=request_id, parameters=parameters)

    def collect(self, until_final_of: str | None = None) -> list:
        """(response proto or None, error or None) pairs until `until_final_of` sees its final
        flag, the call itself ends, or nothing more comes (for STREAM_IDLE_S when no final flag is
        awaited)."""
        events, deadline = [], time.monotonic() + STREAM_TIMEOUT_S
        idle_s = STREAM_IDLE_S if until_final_of is None else STREAM_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                result, error = self.events.get(timeout=idle_s)
            except queue.Empty:
                break
            response = result.get_response() if result is not None else None
            events.append((response, error))
            if error is not None and error.status() is not None:
                break  # the call itself ended: no more events come on this stream
            if response is not None and response.id == until_final_of and is_final(response):
                break
        return events

    def close(self) -> None:
        self.client.stop_stream()


def is_final(response) -> bool:
    return response.parameters["triton_final_response"].bool_param


def text_of(responses) -> str:
    pieces = []
    for response in responses:
        for index, output in enumerate(response.outputs):
            raw = response.raw_output_contents[index]
            pieces += [raw[4:].decode()] if raw else []  # one BYTES element: 4-byte length + text
    return "".join(pieces)


def stream_once(client, model: str, inputs, parameters: dict, wait_for_final: bool = True):
    stream = Stream(client)
    try:
        stream.send(model, inputs, "req-1", parameters)
        events = stream.collect(until_final_of="req-1" if wait_for_final else None)
    finally:
        stream.close()
    errors = [error for _, error in events if error is not None]
    assert not errors, errors
    return [response for response, _ in events]


def response_fields(response, drop_parameters: tuple[str, ...] = ()) -> dict:
    fields = as_dict(response)
    fields.pop("raw_output_contents", None)
    parameters = fields.get("parameters", {})
    for name in drop_parameters:
        parameters.pop(name, None)
    return fields


# -- health and metadata ------------------------------------------------------------------------


def test_live_and_ready_match(servers):
    (real, _), (yard, _) = servers
    assert (yard.is_server_live(), yard.is_server_ready()) == (real.is_server_live(), real.is_server_ready())


@pytest.mark.parametrize("model, version", [
    (EMBED, ""), (EMBED, "1"), (EMBED, "99"), (LLM, ""), (LLM, "1"), ("no-such-model", ""),
])
def test_model_ready_matches(servers, model, version):
    (real, _), (yard, _) = servers
    assert yard.is_model_ready(model, version) == real.is_model_ready(model, version)


def test_server_metadata_matches(servers):
    (real, _), (yard, _) = servers
    expected, actual = real.get_server_metadata(), yard.get_server_metadata()
    assert_conforms(as_dict(expected), as_dict(actual), "server_metadata")
    assert set(actual.extensions) <= set(expected.extensions)


@pytest.mark.parametrize("model", [EMBED, LLM])
def test_model_metadata_matches(servers, model):
    (real, _), (yard, _) = servers
    assert_conforms(as_dict(real.get_model_metadata(model)), as_dict(yard.get_model_metadata(model)),
                    "model_metadata")


@pytest.mark.parametrize("model", [EMBED, LLM])
def test_model_config_matches_on_fields_both_set(servers, model):
    (real, _), (yard, _) = servers
    assert_conforms(as_dict(real.get_model_config(model).config), as_dict(yard.get_model_config(model).config),
                    "model_config")


def test_repository_index_matches(servers):
    (real, headers), (yard, _) = servers
    assert status_of(lambda: real.get_model_repository_index()) == "UNAVAILABLE"
    assert "repository_index.restricted" in ALLOWED_DIFFERENCES
    assert status_of(lambda: yard.get_model_repository_index()) == "OK"
    expected = as_dict(real.get_model_repository_index(headers=headers))
    actual = as_dict(yard.get_model_repository_index())
    assert_conforms(expected, actual, "repository_index")
    served = {(m["name"], m["version"]): m["state"] for m in actual["models"]}
    assert served[(EMBED, "1")] == served[(LLM, "1")] == "READY"


def shape_of(message) -> dict:
    """The fields a statistics reply sets, nested; repeated fields by their first entry."""
    shape = {}
    for field, value in message.ListFields():
        if field.message_type is None:
            shape[field.name] = field.type
        elif field.is_repeated:
            shape[field.name] = [shape_of(value[0])] if len(value) else []
        else:
            shape[field.name] = shape_of(value)
    return shape


def shape_paths(shape, path: str) -> set[str]:
    if isinstance(shape, dict):
        return {path}.union(*(shape_paths(v, f"{path}.{k}") for k, v in shape.items()))
    if isinstance(shape, list):
        return {f"{path}[]"}.union(*(shape_paths(v, f"{path}[]") for v in shape))
    return {f"{path}:{shape}"}


def assert_same_shape(expected: dict, actual: dict, path: str) -> None:
    missing = sorted(shape_paths(expected, path) - shape_paths(actual, path))
    extra = sorted(shape_paths(actual, path) - shape_paths(expected, path))
    assert not missing and not extra, f"only Triton sets {missing}; only tensoryard sets {extra}"


def test_statistics_have_the_same_shape(servers):
    (real, headers), (yard, _) = servers
    for client, h in servers:
        client.infer(EMBED, [text_input(["warm up the statistics"])], headers=h)
    expected = real.get_inference_statistics(EMBED, headers=headers)
    actual = yard.get_inference_statistics(EMBED)
    assert_same_shape(shape_of(expected), shape_of(actual), "statistics")
    assert [(s.name, s.version) for s in actual.model_stats] == [(s.name, s.version) for s in expected.model_stats]


def test_statistics_for_all_models_name_the_same_models(servers):
    (real, headers), (yard, _) = servers
    expected = real.get_inference_statistics(headers=headers)
    actual = yard.get_inference_statistics()
    assert sorted((s.name, s.version) for s in actual.model_stats) == \
        sorted((s.name, s.version) for s in expected.model_stats)


# -- inference ----------------------------------------------------------------------------------


@pytest.mark.parametrize("typed", [False, True], ids=["raw", "typed"])
def test_bytes_in_fp32_out_infer_matches(servers, typed):
    (real, _), (yard, _) = servers
    expected = real.infer(EMBED, [text_input(TEXTS, typed)], request_id="embed-1")
    actual = yard.infer(EMBED, [text_input(TEXTS, typed)], request_id="embed-1")
    assert_conforms(response_fields(expected.get_response()), response_fields(actual.get_response()), "infer")
    assert actual.get_response().outputs[0].shape == [len(TEXTS), 384]
    np.testing.assert_allclose(actual.as_numpy("embedding"), expected.as_numpy("embedding"), atol=1e-4)


@pytest.mark.parametrize("requested", [None, ["embedding"]], ids=["all-outputs", "requested"])
def test_requested_outputs_match(servers, requested):
    (real, _), (yard, _) = servers
    outputs = [triton.InferRequestedOutput(name) for name in requested] if requested else None
    expected = real.infer(EMBED, [text_input(["hello"])], outputs=outputs)
    actual = yard.infer(EMBED, [text_input(["hello"])], outputs=outputs)
    assert_conforms(response_fields(expected.get_response()), response_fields(actual.get_response()), "infer")


BAD_REQUESTS = {
    "unknown model": lambda c: c.infer("no-such-model", [text_input(["a"])]),
    "unknown version": lambda c: c.infer(EMBED, [text_input(["a"])], model_version="7"),
    "wrong datatype": lambda c: c.infer(EMBED, [raw_input("text", [1, 1], "FP32", b"\0" * 4)]),
    "wrong shape": lambda c: c.infer(EMBED, [raw_input("text", [1, 2], "BYTES", b"\1\0\0\0a" * 2)]),
    "byte length longer than the buffer": lambda c: c.infer(EMBED, [raw_input("text", [1, 1], "BYTES", b"\x10\0\0\0abc")]),
    "fewer elements than the shape": lambda c: c.infer(EMBED, [raw_input("text", [2, 1], "BYTES", b"\1\0\0\0a")]),
    "missing input": lambda c: c.infer(EMBED, []),
    "unknown input": lambda c: c.infer(EMBED, [text_input(["a"]), raw_input("bogus", [1, 1], "FP32", b"\0" * 4)]),
    "unknown output": lambda c: c.infer(EMBED, [text_input(["a"])], outputs=[triton.InferRequestedOutput("nope")]),
    "metadata of an unknown model": lambda c: c.get_model_metadata("no-such-model"),
    "metadata of an unknown version": lambda c: c.get_model_metadata(EMBED, "7"),
    "config of an unknown model": lambda c: c.get_model_config("no-such-model"),
    "config of an unknown version": lambda c: c.get_model_config(EMBED, "7"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_status_matches(servers, case):
    (real, _), (yard, _) = servers
    expected = status_of(lambda: BAD_REQUESTS[case](real))
    assert expected != "OK"
    assert status_of(lambda: BAD_REQUESTS[case](yard)) == expected


def test_statistics_of_an_unknown_model_status_matches(servers):
    (real, headers), (yard, _) = servers
    expected = status_of(lambda: real.get_inference_statistics("no-such-model", headers=headers))
    assert status_of(lambda: yard.get_inference_statistics("no-such-model")) == expected


def test_model_infer_on_the_decoupled_llm(servers):
    (real, _), (yard, _) = servers
    assert status_of(lambda: real.infer(LLM, llm_inputs(PROMPT, stream=False), parameters=GREEDY)) == "UNIMPLEMENTED"
    assert "infer.decoupled_model" in ALLOWED_DIFFERENCES
    result = yard.infer(LLM, llm_inputs(PROMPT, stream=False), parameters=GREEDY)
    assert is_final(result.get_response())


# -- decoupled streaming ------------------------------------------------------------------------

FINAL_FLAG = ("triton_final_response",)  # checked on its own, response by response


def assert_stream_conforms(expected: list, actual: list) -> None:
    """The joined text, then each tensoryard response's fields against Triton's first response
    (the two split the text differently: see "stream.pieces")."""
    assert text_of(actual) == text_of(expected)
    body = response_fields(expected[0], drop_parameters=FINAL_FLAG)
    for response in actual:
        assert_conforms(body, response_fields(response, drop_parameters=FINAL_FLAG), "stream")


def test_stream_with_empty_final_response_matches(servers):
    (real, _), (yard, _) = servers
    parameters = {**GREEDY, "triton_enable_empty_final_response": True}
    expected = stream_once(real, LLM, llm_inputs(PROMPT), parameters)
    actual = stream_once(yard, LLM, llm_inputs(PROMPT), parameters)
    assert len(expected) > 2 and len(actual) > 2
    assert [is_final(r) for r in actual] == [False] * (len(actual) - 1) + [True]
    assert [is_final(r) for r in expected] == [False] * (len(expected) - 1) + [True]
    assert_stream_conforms(expected[:-1], actual[:-1])
    # The empty final response: no outputs, the final flag, the request's id.
    final_expected, final_actual = as_dict(expected[-1]), as_dict(actual[-1])
    assert_conforms(final_expected, final_actual, "stream")
    assert final_actual.keys() == final_expected.keys(), (
        f"the empty final response sets other fields: Triton {final_expected}, tensoryard {final_actual}"
    )


def test_stream_without_empty_final_response(servers):
    (real, _), (yard, _) = servers
    expected = stream_once(real, LLM, llm_inputs(PROMPT), GREEDY, wait_for_final=False)
    actual = stream_once(yard, LLM, llm_inputs(PROMPT), GREEDY)
    assert not any(is_final(r) for r in expected)
    assert "stream.final_without_empty_final_response" in ALLOWED_DIFFERENCES
    assert [is_final(r) for r in actual] == [False] * (len(actual) - 1) + [True]
    assert_stream_conforms(expected, actual)


def test_stream_with_typed_contents_matches(servers):
    (real, _), (yard, _) = servers
    parameters = {"temperature": 0, "triton_enable_empty_final_response": True}
    inputs = lambda: llm_inputs(PROMPT, max_tokens=5, typed=True)  # noqa: E731
    expected = stream_once(real, LLM, inputs(), parameters)
    actual = stream_once(yard, LLM, inputs(), parameters)
    assert text_of(actual) == text_of(expected)
    assert_stream_conforms(expected[:-1], actual[:-1])


def test_stream_false_over_model_stream_infer_matches(servers):
    (real, _), (yard, _) = servers
    parameters = {**GREEDY, "triton_enable_empty_final_response": True}
    expected = stream_once(real, LLM, llm_inputs(PROMPT, stream=False), parameters)
    actual = stream_once(yard, LLM, llm_inputs(PROMPT, stream=False), parameters)
    assert len(actual) == len(expected) == 2
    assert_conforms(response_fields(expected[0]), response_fields(actual[0]), "stream")
    assert text_of(actual) == text_of(expected)


def stream_events(client, requests: list[tuple[str, list, str, dict]]) -> list[tuple[str | None, bool]]:
    """Sends `requests` on one stream; (request id or None, is error) for each event, in order."""
    stream = Stream(client)
    try:
        for model, inputs, request_id, parameters in requests:
            stream.send(model, inputs, request_id, parameters)
        events = stream.collect(until_final_of=requests[-1][2])
    finally:
        stream.close()
    return [(response.id if response is not None else None, error is not None) for response, error in events]


def embed_request(request_id: str):
    return (EMBED, [text_input(["hello"])], request_id, {})


def llm_request(request_id: str):
    return (LLM, llm_inputs(PROMPT, max_tokens=3), request_id, {"temperature": 0, "triton_enable_empty_final_response": True})


def bad_dtype_request(request_id: str):
    return (LLM, [raw_input("text_input", [1], "FP32", b"\0" * 4)], request_id, {})


def byte_size_mismatch_request(request_id: str):
    inputs = llm_inputs(PROMPT)
    inputs.append(raw_input("max_tokens", [1], "INT32", b"\0" * 3))
    return (LLM, inputs, request_id, {})


def unknown_model_request(request_id: str):
    return ("no-such-model", [text_input(["a"])], request_id, {})


@pytest.mark.parametrize(
    "first", [bad_dtype_request, byte_size_mismatch_request, unknown_model_request],
    ids=["wrong-datatype", "byte-size-mismatch", "unknown-model"],
)
def test_an_error_in_a_stream_leaves_the_stream_open(servers, first):
    """Triton reports a bad request inside the stream (error_message) and serves the next one."""
    (real, _), (yard, _) = servers
    requests = [first("bad-1"), llm_request("good-1")]
    expected = stream_events(real, requests)
    actual = stream_events(yard, requests)
    assert expected[0][1] and expected[-1] == ("good-1", False)
    assert actual[0] == expected[0] and set(actual[1:]) == set(expected[1:]), (
        f"(request id, is error) per event: Triton {expected}, tensoryard {actual}"
    )


def test_one_stream_serves_several_models(servers):
    (real, _), (yard, _) = servers
    requests = [embed_request("embed-1"), llm_request("llm-1")]
    expected = stream_events(real, requests)
    actual = stream_events(yard, requests)
    assert not any(is_error for _, is_error in expected)
    assert set(actual) == set(expected), f"(request id, is error) per event: Triton {expected}, tensoryard {actual}"


# -- Prometheus ---------------------------------------------------------------------------------

def metric_families(port: int) -> dict[str, tuple[str, frozenset]]:
    """name as written -> (type, label names) of every nv_inference_* family with a sample."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    types = dict(line.split()[2:4] for line in text.splitlines() if line.startswith("# TYPE "))
    found = {}
    for family in text_string_to_metric_families(text):
        name = f"{family.name}_total" if f"{family.name}_total" in types else family.name
        if name.startswith("nv_inference_") and family.samples:
            found[name] = (types[name], frozenset(family.samples[0].labels))
    return found


def test_inference_metric_families_are_named_typed_and_labelled_as_tritons(peer, servers, stack):
    """Every nv_inference_* family real Triton exports for a model, the worker exports too: same name
    as written (counters without _total), same type, Triton's labels plus `worker`."""
    (real, headers), _ = servers
    real.infer(EMBED, [text_input(["count me"])], headers=headers)
    expected = metric_families(peer.metrics_port)
    from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc
    import grpc

    with grpc.insecure_channel(stack.registry) as channel:
        instances = discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service="worker", model_name=EMBED), timeout=5).instances
    actual = metric_families(int(instances[0].metadata["metrics_port"]))
    assert expected, "Triton exported no nv_inference_* family"
    for name, (kind, labels) in sorted(expected.items()):
        assert name in actual, f"Triton exports {name} ({kind}); tensoryard does not"
        assert actual[name][0] == kind, f"{name}: Triton's is a {kind}, tensoryard's a {actual[name][0]}"
        assert actual[name][1] == labels | {"worker"}, f"{name}: labels {sorted(actual[name][1])}, Triton's {sorted(labels)}"
