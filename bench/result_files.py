"""Where benchmark results go: bench/results/<name>-<UTC>.<suffix>, one time stamp per run."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def result_path(name: str, created: datetime, suffix: str = "") -> Path:
    """bench/results/<name>-<UTC>[.<suffix>]; the results folder is made if missing."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{created.strftime('%Y%m%dT%H%M%SZ')}"
    return RESULTS_DIR / (f"{stem}.{suffix}" if suffix else stem)


def write_json(report: dict, created: datetime, name: str) -> Path:
    """The report as <name>-<UTC>.json, written whole or not at all."""
    path = result_path(name, created, "json")
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)
    return path
