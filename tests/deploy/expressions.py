"""Every PromQL expression deploy/ ships: in the rule files and in the Grafana dashboards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from tests.conftest import REPO_ROOT

PROMETHEUS_DIR = REPO_ROOT / "deploy" / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
RULE_TESTS_DIR = PROMETHEUS_DIR / "tests"
DASHBOARDS_DIR = REPO_ROOT / "deploy" / "grafana" / "dashboards"


@dataclass(frozen=True, slots=True)
class Expression:
    where: str  # e.g. "rules/alerts.yml alert TensoryardWorkerDown", "fleet.json 'Requests/s'"
    expr: str
    kind: str  # "record", "alert", "panel" or "variable"


def rule_files() -> list[Path]:
    return sorted(RULES_DIR.glob("*.yml"))


def rules() -> list[dict]:
    """Every rule of every rule file, each with the name of its file under "file"."""
    found = []
    for path in rule_files():
        for group in yaml.safe_load(path.read_text())["groups"]:
            found += [{**rule, "file": path.name} for rule in group["rules"]]
    return found


def rule_expressions() -> list[Expression]:
    return [
        Expression(f"rules/{r['file']} {'alert ' + r['alert'] if 'alert' in r else 'record ' + r['record']}",
                   r["expr"].strip(), "alert" if "alert" in r else "record")
        for r in rules()
    ]


def recorded_names() -> set[str]:
    return {r["record"] for r in rules() if "record" in r}


def dashboards() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))}


def panels(dashboard: dict) -> list[dict]:
    """Every panel that is not a row, rows' collapsed children included."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found += panel.get("panels", [])
        else:
            found.append(panel)
    return found


def query_variables(dashboard: dict) -> list[dict]:
    return [v for v in dashboard["templating"]["list"] if v["type"] == "query"]


def variable_query(variable: dict) -> str:
    query = variable["query"]
    return query["query"] if isinstance(query, dict) else query


def panel_expressions(name: str, dashboard: dict) -> list[Expression]:
    return [
        Expression(f"{name} '{panel['title']}' {target['refId']}", target["expr"], "panel")
        for panel in panels(dashboard)
        for target in panel["targets"]
    ]
