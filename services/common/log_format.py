"""Log lines in Elastic Common Schema (ECS), for Filebeat and Elasticsearch.

A JSON line carries `@timestamp` (ISO 8601, UTC, "Z"), `log.level`, `log.logger`, `message` (the
event's name), `service.name`, `ecs.version`, within a request `trace.id` and `span.id`, and
`event.duration` in nanoseconds (ECS's unit) where a line times something. An exception becomes
`error.type`, `error.message` and `error.stack_trace`. Every other field is ours and goes under
`tensoryard.` (request_id, model, version, worker, ...): ECS types its own fields (an ECS `error` is
an object; a string there would fail the whole document's indexing), so nothing of ours may land at
the root. Lines are what ecs-logging's `StructlogFormatter` writes (nested objects, `@timestamp`,
`log.level` and `message` first; tests/unit/test_ecs_logs.py compares the two), rendered here in
one pass: its formatter re-nests dotted keys generically and cost 55 us a line, a tenth of the
router's CPU per request once every request has an access line; this costs about a sixth of that.

Logging from the standard library (the engine thread's `log.exception`, grpc's and asyncio's
loggers, warnings) goes through the same processors: the root logger's one handler formats with
structlog's `ProcessorFormatter` and writes through structlog's locked writer for the same stream,
so the two kinds of line never interleave.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback

import structlog

# What ecs-logging-python 2.x writes.
ECS_VERSION = "1.6.0"
# Our event-dict keys that are ECS fields: (object, field).
_ECS_FIELDS = {
    "level": ("log", "level"),
    "logger": ("log", "logger"),  # stdlib records (structlog.stdlib.add_logger_name)
    "logger_name": ("log", "logger"),  # our structlog loggers (telemetry.get_logger)
    "service": ("service", "name"),
    "trace_id": ("trace", "id"),
    "span_id": ("span", "id"),
    "duration_ns": ("event", "duration"),
    "dataset": ("event", "dataset"),
    "outcome": ("event", "outcome"),
    "error": ("error", "message"),  # `error=` in our calls is the error's message (a string)
}
NAMESPACE = "tensoryard"
_SKIPPED = frozenset(("event", "level", "@timestamp", "exc_info", "stack_info", "_record", "_from_structlog"))
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), default=repr).encode


def ecs_renderer(service: str):
    """The last processor: the event dict as one ECS JSON line."""

    def render(logger, method_name: str, event_dict: dict) -> str:
        line = {
            "@timestamp": event_dict.get("@timestamp", ""),
            "log.level": event_dict.get("level", method_name),
            "message": str(event_dict.get("event", "")),
            "service": {"name": service},
        }
        ours: dict = {}
        for key, value in event_dict.items():
            if key in _SKIPPED:
                continue
            field = _ECS_FIELDS.get(key)
            if field is None:
                ours[key] = value
            elif key == "error":
                line.setdefault("error", {})["message"] = str(value)
            else:
                line.setdefault(field[0], {})[field[1]] = value
        exc_info = event_dict.get("exc_info")
        if exc_info:
            _add_error(line, exc_info)
        if ours:
            line[NAMESPACE] = ours
        line["ecs"] = {"version": ECS_VERSION}
        return _dumps(line)

    return render


def _add_error(objects: dict, exc_info) -> None:
    if exc_info is True:
        exc_info = sys.exc_info()
    elif isinstance(exc_info, BaseException):
        exc_info = (type(exc_info), exc_info, exc_info.__traceback__)
    if not isinstance(exc_info, tuple) or exc_info[0] is None:
        return
    kind, error, tb = exc_info
    module = kind.__module__
    fields = objects.setdefault("error", {})
    fields["type"] = kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"
    fields.setdefault("message", str(error))
    fields["stack_trace"] = "".join(traceback.format_exception(kind, error, tb))


class StructlogHandler(logging.Handler):
    """The root logger's handler: stdlib records formatted by structlog's processors, written with
    structlog's lock for the stream."""

    def __init__(self, stream, formatter: logging.Formatter):
        super().__init__()
        self._out = structlog.WriteLogger(stream)
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._out.msg(self.format(record))
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


class DirectWriter:
    """ECS lines written straight to the stream, past structlog's processor chain, for the one
    line per request (the access log): through the chain, with its context-variable merge and
    time stamp, a line cost the router about a sixth of its CPU per forwarded request. Same fields,
    same shape, same lock; tests/unit/test_ecs_logs.py holds the two paths to one another."""

    def __init__(self, stream, service: str):
        self.service = service
        self._out = structlog.WriteLogger(stream)
        self._second = -1
        self._second_text = ""

    def write(self, message: str, logger_name: str, service: str, event: dict, trace_id: str | None,
              span_id: str | None, ours: dict) -> None:
        parts = [
            '{"@timestamp":"', self._timestamp(), '","log.level":"info","message":', _string(message),
            ',"service":{"name":', _string(service or self.service), '},"log":{"logger":', _string(logger_name),
            '},"event":', _object(event),
        ]
        if trace_id:
            parts += (',"trace":{"id":"', trace_id, '"}')
            if span_id:
                parts += (',"span":{"id":"', span_id, '"}')
        if ours:
            parts += (',"', NAMESPACE, '":', _object(ours))
        parts.append(_ECS_TAIL)
        self._out.msg("".join(parts))

    def _timestamp(self) -> str:
        """What structlog's TimeStamper(fmt="iso", utc=True) writes, with the second cached."""
        now_s = time.time()
        second = int(now_s)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now_s - second) * 1e6):06d}Z"


_ECS_TAIL = f',"ecs":{{"version":"{ECS_VERSION}"}}}}'
_string = json.encoder.encode_basestring


def _object(fields: dict) -> str:
    items = []
    for key, value in fields.items():
        kind = type(value)
        text = _string(value) if kind is str else str(value) if kind is int else _dumps(value)
        items.append(f'"{key}":{text}')
    return "{" + ",".join(items) + "}"


_direct: DirectWriter | None = None


def direct_writer() -> DirectWriter | None:
    """The writer for info lines past the chain: None for console output or a level above info."""
    return _direct


def set_direct_writer(writer: DirectWriter | None) -> None:
    global _direct
    _direct = writer


def route_stdlib(stream, pre_chain: list, render: list, level: int) -> None:
    """Send every stdlib logger (through the root) to `stream`, rendered like structlog's lines."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*pre_chain, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
    )
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, StructlogHandler)]:
        root.removeHandler(handler)
    root.addHandler(StructlogHandler(stream, formatter))
    root.setLevel(level)
    logging.captureWarnings(True)
