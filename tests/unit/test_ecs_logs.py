"""Log lines in Elastic Common Schema: each field has the type ECS gives it, stdlib logging comes
out in the same JSON, the access line's direct path writes what structlog's chain writes, and our
lines are what ecs-logging's own formatter writes for the same event."""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import datetime

import ecs_logging
import pytest
import structlog

from services.common import access_log, log_format
from services.common.access_log import RequestRecord, write_access_line
from services.common.config import TelemetryConfig
from services.common.telemetry import configure_telemetry, get_logger

ISO_8601_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?Z$")
HEX_32 = re.compile(r"^[0-9a-f]{32}$")
HEX_16 = re.compile(r"^[0-9a-f]{16}$")
LEVELS = {"debug", "info", "warning", "error", "critical"}
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


class Capture:
    def __init__(self):
        self.stream = io.StringIO()

    def configure(self, **fields) -> None:
        configure_telemetry("router", TelemetryConfig(**{"log_format": "json", **fields}), self.stream)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.stream.getvalue().splitlines()]

    def text(self) -> str:
        return self.stream.getvalue()


@pytest.fixture
def capture():
    capture = Capture()
    capture.configure()
    yield capture
    reset_telemetry()


def reset_telemetry() -> None:
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, log_format.StructlogHandler)]:
        root.removeHandler(handler)
    root.setLevel(logging.WARNING)
    logging.captureWarnings(False)
    log_format.set_direct_writer(None)
    access_log.configure_access_log(TelemetryConfig())
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()


def assert_ecs_base(line: dict) -> None:
    """The fields every line carries, with their ECS types."""
    assert ISO_8601_UTC.match(line["@timestamp"]), line["@timestamp"]
    assert datetime.fromisoformat(line["@timestamp"]).tzinfo is not None
    assert isinstance(line["log.level"], str) and line["log.level"] in LEVELS
    assert isinstance(line["message"], str)
    assert isinstance(line["service"]["name"], str) and line["service"]["name"]
    assert isinstance(line["ecs"]["version"], str)
    assert list(line)[:3] == ["@timestamp", "log.level", "message"]  # ECS logging: these first
    for key in line:  # nothing of ours at the root
        assert key in {"@timestamp", "log.level", "message", "service", "log", "ecs", "event", "trace", "span",
                       "error", "tensoryard"}, key


def test_json_lines_carry_the_ecs_fields_with_their_types(capture):
    structlog.contextvars.bind_contextvars(request_id="r-1", model="m", version="2", trace_id=TRACE_ID,
                                           span_id=SPAN_ID)
    get_logger("services.router.relay").info("stream_migrated", to_worker="w2", num_tokens_sent=7)
    (line,) = capture.lines()
    assert_ecs_base(line)
    assert line["message"] == "stream_migrated"
    assert line["log.level"] == "info"
    assert line["log"]["logger"] == "services.router.relay"
    assert line["service"]["name"] == "router"
    assert HEX_32.match(line["trace"]["id"]) and line["trace"]["id"] == TRACE_ID
    assert HEX_16.match(line["span"]["id"]) and line["span"]["id"] == SPAN_ID
    assert line["tensoryard"] == {"request_id": "r-1", "model": "m", "version": "2", "to_worker": "w2",
                                  "num_tokens_sent": 7}


def test_an_exception_becomes_error_type_message_and_stack_trace(capture):
    try:
        raise KeyError("no such block")
    except KeyError:
        get_logger("services.worker.engine").exception("step_failed")
    (line,) = capture.lines()
    assert_ecs_base(line)
    assert line["log.level"] == "error"
    assert line["error"]["type"] == "KeyError"
    assert line["error"]["message"] == "'no such block'"
    assert line["error"]["stack_trace"].startswith("Traceback (most recent call last):")
    assert "raise KeyError" in line["error"]["stack_trace"]


def test_an_error_string_is_the_error_message_never_a_root_string(capture):
    get_logger("services.worker.server").error("model_load_failed", error="no weights")
    (line,) = capture.lines()
    assert line["error"] == {"message": "no weights"}


def test_stdlib_logging_comes_out_in_the_same_json(capture):
    structlog.contextvars.bind_contextvars(request_id="r-2", trace_id=TRACE_ID)
    try:
        _ = 1 / 0
    except ZeroDivisionError:
        logging.getLogger("services.worker.engine.loop").exception("engine step failed")
    logging.getLogger("grpc._cython.cygrpc").warning("a %s from grpc", "warning")
    crash, warning = capture.lines()
    for line in (crash, warning):
        assert_ecs_base(line)
    assert crash["message"] == "engine step failed"
    assert crash["log.level"] == "error"
    assert crash["log"]["logger"] == "services.worker.engine.loop"
    assert crash["error"]["type"] == "ZeroDivisionError"
    assert "1 / 0" in crash["error"]["stack_trace"]
    assert crash["trace"]["id"] == TRACE_ID and crash["tensoryard"]["request_id"] == "r-2"
    assert warning["message"] == "a warning from grpc"
    assert warning["log.level"] == "warning"
    assert warning["log"]["logger"] == "grpc._cython.cygrpc"


def test_stdlib_below_the_configured_level_is_dropped(capture):
    logging.getLogger("some.library").debug("chatter")
    assert capture.lines() == []


def access_record(**fields) -> RequestRecord:
    return RequestRecord("Generate", **{"request_id": "r-3", "model": "llm", "version": "1", "worker": "w1",
                                        "queue_ns": 1_500, "compute_ns": 2_000_000, "num_prompt_tokens": 12,
                                        "num_output_tokens": 30, "trace_id": TRACE_ID, "span_id": SPAN_ID,
                                        **fields})


def test_the_access_line_has_the_request_its_times_and_its_tokens(capture):
    write_access_line(access_record(), "OK", 2_345_678, None)
    (line,) = capture.lines()
    assert_ecs_base(line)
    assert line["message"] == "access"
    assert line["log"]["logger"] == "tensoryard.access"
    assert line["event"] == {"dataset": "tensoryard.access", "outcome": "success", "duration": 2_345_678}
    assert isinstance(line["event"]["duration"], int)
    assert line["trace"]["id"] == TRACE_ID and line["span"]["id"] == SPAN_ID
    assert line["tensoryard"] == {
        "grpc_method": "Generate", "grpc_code": "OK", "request_id": "r-3", "model": "llm", "version": "1",
        "worker": "w1", "queue_ns": 1_500, "compute_ns": 2_000_000, "num_prompt_tokens": 12, "num_output_tokens": 30,
    }


def test_the_access_lines_direct_path_writes_what_structlogs_chain_writes(capture):
    record = access_record(output=None, prompt="ünïcode \"quoted\"\n")
    capture.configure(log_prompts=True)
    structlog.contextvars.bind_contextvars(trace_id=TRACE_ID, span_id=SPAN_ID)  # as the interceptor binds them
    write_access_line(record, "UNAVAILABLE", 42, "no replica")
    log_format.set_direct_writer(None)  # now through structlog's processors
    write_access_line(record, "UNAVAILABLE", 42, "no replica")
    direct, chained = capture.lines()
    direct.pop("@timestamp"), chained.pop("@timestamp")
    assert direct == chained
    assert direct["event"]["outcome"] == "failure"
    assert direct["tensoryard"]["details"] == "no replica"


def test_our_lines_are_what_ecs_loggings_formatter_writes():
    """The same event through ecs-logging's StructlogFormatter (from ECS dotted names) and through
    ours (from our keys): the same document."""
    ours = log_format.ecs_renderer("worker")(None, "info", {
        "event": "worker_ready", "level": "info", "@timestamp": "2026-01-02T03:04:05.678901Z",
        "logger_name": "services.worker.server", "trace_id": TRACE_ID, "duration_ns": 12, "address": "127.0.0.1:1",
    })
    theirs = ecs_logging.StructlogFormatter()(None, "info", {
        "event": "worker_ready", "@timestamp": "2026-01-02T03:04:05.678901Z", "log.logger": "services.worker.server",
        "service.name": "worker", "trace.id": TRACE_ID, "event.duration": 12, "tensoryard.address": "127.0.0.1:1",
    })
    theirs = _nested(json.loads(theirs))
    assert json.loads(ours) == theirs
    assert theirs["ecs"]["version"] == log_format.ECS_VERSION


def _nested(document: dict) -> dict:
    """Dotted keys as objects (ecs-logging writes `ecs.version` dotted), except ECS logging's own
    top-level `log.level`."""
    out: dict = {}
    for key, value in document.items():
        if "." in key and key != "log.level":
            head, _, rest = key.partition(".")
            out.setdefault(head, {}).update(_nested({rest: value}))
        else:
            out[key] = _nested(value) if isinstance(value, dict) else value
    return out


def test_prompts_and_outputs_stay_out_of_the_access_line_unless_enabled(capture):
    record = access_record(prompt="my secret prompt", output="its answer")
    write_access_line(record, "OK", 1, None)
    capture.configure(log_prompts=True)
    write_access_line(record, "OK", 1, None)
    hidden, shown = capture.lines()
    assert "prompt" not in hidden["tensoryard"] and "output" not in hidden["tensoryard"]
    assert "my secret" not in json.dumps(hidden)
    assert shown["tensoryard"]["prompt"] == "my secret prompt"
    assert shown["tensoryard"]["output"] == "its answer"


def test_sample_rate_zero_writes_failures_only(capture):
    capture.configure(access_log_sample_rate=0.0)
    for _ in range(20):
        write_access_line(access_record(), "OK", 1, None)
    write_access_line(access_record(), "INTERNAL", 1, "boom")
    (line,) = capture.lines()
    assert line["tensoryard"]["grpc_code"] == "INTERNAL"


def test_sample_rate_writes_about_that_share_of_successes(capture):
    capture.configure(access_log_sample_rate=0.25)
    for _ in range(2000):
        write_access_line(access_record(), "OK", 1, None)
    assert 350 < len(capture.lines()) < 650


def test_console_output_stays_readable():
    stream = io.StringIO()
    configure_telemetry("worker", TelemetryConfig(log_format="console"), stream)
    try:
        get_logger("services.worker.server").info("worker_ready", address="127.0.0.1:9")
        logging.getLogger("services.worker.engine.loop").warning("engine slow")
        write_access_line(access_record(), "OK", 5, None)
    finally:
        reset_telemetry()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3
    assert not any(line.startswith("{") for line in lines)
    assert "worker_ready" in lines[0] and "address=127.0.0.1:9" in lines[0]
    assert "engine slow" in lines[1]
    assert "access" in lines[2] and "grpc_method=Generate" in lines[2]


def test_telemetry_settings_come_from_flags_environment_and_opentelemetrys_variable():
    from services.cli import with_otel_conventions
    from services.common.config import RouterConfig, build_config

    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert build_config(RouterConfig, {}, with_otel_conventions(otel)).telemetry.otlp_endpoint == "http://collector:4317"
    ours = {**otel, "TENSORYARD_OTLP_ENDPOINT": "http://ours:4317"}
    assert build_config(RouterConfig, {}, with_otel_conventions(ours)).telemetry.otlp_endpoint == "http://ours:4317"
    flags = {"otlp_endpoint": "http://flag:4317", "access_log_sample_rate": 0.1, "log_prompts": True}
    telemetry = build_config(RouterConfig, flags, with_otel_conventions(ours)).telemetry
    assert (telemetry.otlp_endpoint, telemetry.access_log_sample_rate, telemetry.log_prompts) == \
        ("http://flag:4317", 0.1, True)
    assert build_config(RouterConfig, {}, {}).telemetry.otlp_endpoint == ""  # off by default
    with pytest.raises(ValueError, match="access_log_sample_rate"):
        TelemetryConfig(access_log_sample_rate=1.5)
