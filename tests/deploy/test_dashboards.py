"""deploy/grafana: dashboards Grafana can load as provisioned, with queries the e2e test can check."""

from __future__ import annotations

import yaml

from tests.conftest import REPO_ROOT
from tests.deploy import promql
from tests.deploy.expressions import (
    dashboards,
    panel_expressions,
    panels,
    query_variables,
    rule_expressions,
    variable_query,
)

PROVISIONING = REPO_ROOT / "deploy" / "grafana" / "provisioning"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def test_the_three_dashboards_have_their_own_uids():
    uids = {name: board["uid"] for name, board in dashboards().items()}
    assert sorted(uids) == ["fleet.json", "model.json", "worker.json"]
    assert len(set(uids.values())) == 3


def test_panels_have_unique_ids_and_fit_the_grid():
    for name, board in dashboards().items():
        ids = [p["id"] for p in board["panels"]] + [p["id"] for p in panels(board) if p not in board["panels"]]
        assert len(ids) == len(set(ids)), name
        for panel in board["panels"]:
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, (name, panel["title"])


def test_every_panel_queries_the_chosen_prometheus():
    for name, board in dashboards().items():
        assert board["templating"]["list"][0]["type"] == "datasource", name
        for panel in panels(board):
            assert panel["datasource"] == DATASOURCE, (name, panel["title"])
            assert panel["targets"], (name, panel["title"])
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE and target["expr"].strip(), (name, panel["title"])


def test_queries_use_only_variables_the_dashboard_defines():
    for name, board in dashboards().items():
        defined = {v["name"] for v in board["templating"]["list"]} | set(promql.BUILTIN_VARIABLES)
        used = set()
        for expression in panel_expressions(name, board):
            used |= promql.variable_names(expression.expr)
        for variable in query_variables(board):
            promql.parse_label_values(variable_query(variable))  # a form the e2e test resolves
            used |= promql.variable_names(variable_query(variable))
        assert used <= defined, (name, used - defined)


def test_every_expression_names_a_metric():
    expressions = rule_expressions() + [e for n, b in dashboards().items() for e in panel_expressions(n, b)]
    for expression in expressions:
        assert promql.metric_names(expression.expr), expression


def test_provisioning_loads_the_dashboards_folder_from_the_tensoryard_prometheus():
    (datasource,) = yaml.safe_load((PROVISIONING / "datasources" / "tensoryard.yml").read_text())["datasources"]
    assert datasource["type"] == "prometheus" and datasource["isDefault"]
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "tensoryard.yml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]
