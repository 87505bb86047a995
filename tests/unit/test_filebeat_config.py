"""deploy/logging/filebeat.yml parses and holds what deploy/logging/README.md says: the files
`tensoryard up` writes (not Prometheus's), the ndjson parser with the ECS fields at the root, and
a type for every field the access line writes under `tensoryard.`. Filebeat itself cannot be
installed here, so whether Filebeat accepts the file is not checked (`filebeat test config` does)."""

from __future__ import annotations

import fnmatch
import io
import json
import re
from pathlib import Path

import yaml

from services.common.access_log import RequestRecord, write_access_line
from services.common.config import TelemetryConfig
from services.common.telemetry import configure_telemetry
from tests.unit.test_ecs_logs import reset_telemetry

CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "logging" / "filebeat.yml"


def config() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def inputs_by_id() -> dict[str, dict]:
    return {entry["id"]: entry for entry in config()["filebeat.inputs"]}


def test_the_up_input_reads_each_process_log_and_not_prometheus():
    up = inputs_by_id()["tensoryard-up"]
    assert up["type"] == "filestream"
    (pattern,) = up["paths"]
    assert pattern.startswith("${TENSORYARD_HOME:") and pattern.endswith("/logs/*.log")
    excluded = [re.compile(expression) for expression in up["prospector.scanner.exclude_files"]]
    names = ["registry.log", "router.log", "router-1.log", "worker-all-MiniLM-L6-v2-0.log", "prometheus.log"]
    read = [name for name in names if fnmatch.fnmatch(name, "*.log") and not any(e.search(name) for e in excluded)]
    assert read == names[:-1]


def test_the_parser_puts_the_ecs_fields_at_the_root():
    (parser,) = inputs_by_id()["tensoryard-up"]["parsers"]
    ndjson = parser["ndjson"]
    assert ndjson["target"] == ""
    assert ndjson["overwrite_keys"] is True and ndjson["add_error_key"] is True and ndjson["expand_keys"] is True
    journald = inputs_by_id()["tensoryard-journald"]
    assert journald["type"] == "journald"
    (decode,) = [p["decode_json_fields"] for p in journald["processors"]]
    assert decode["fields"] == ["message"] and decode["target"] == ""
    assert decode["overwrite_keys"] is True and decode["add_error_key"] is True


def test_it_ships_to_elasticsearch():
    output = config()["output.elasticsearch"]
    assert output["hosts"] == ["${ELASTICSEARCH_HOSTS:http://localhost:9200}"]


def test_every_field_the_access_line_writes_has_a_mapped_type():
    stream = io.StringIO()
    configure_telemetry("router", TelemetryConfig(log_format="json", log_prompts=True), stream)
    try:
        record = RequestRecord("Generate", request_id="r", model="m", version="1", worker="w", queue_ns=1,
                               compute_ns=2, num_prompt_tokens=3, num_output_tokens=4, prompt="p", output="o")
        write_access_line(record, "UNAVAILABLE", 5, "gone")
    finally:
        reset_telemetry()
    ours = json.loads(stream.getvalue())["tensoryard"]
    mapped = {field["name"]: field["type"] for field in config()["setup.template.append_fields"]}
    for key, value in ours.items():
        kind = mapped.get(f"tensoryard.{key}")
        assert kind is not None, f"tensoryard.{key} has no type in filebeat.yml"
        assert kind == ("long" if isinstance(value, int) else kind), key
        assert kind in ("long", "keyword", "text")
