"""A real Prometheus scrapes the session's `tensoryard up` (the targets up writes, the shipped
rules, 1s intervals) under a short load; then every PromQL expression deploy/ ships must return
data, and every family they name must be exported.

What counts as data: at least one sample that is a number. NaN alone (a ratio or quantile of
nothing that rose in its window) is what Grafana draws as nothing, so it does not count.
- Recording rules and dashboard panels are queried as written, template variables replaced by
  all the values their own `label_values(...)` queries return (as "All" would; each variable
  must have values).
- Alerts are queried with their comparisons made `bool` (`x > bool 0.9`), so that they return
  0/1 samples whether or not the alert fires.
An expression without data is reported with the selectors in it that have no series.
GPU panels (DCGM_*) are checked only where the workers have a CUDA device.
"""

from __future__ import annotations

import concurrent.futures
import time

import grpc
import pytest
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from tests.conftest import wait_until
from tests.deploy import promql
from tests.deploy.expressions import (
    Expression,
    dashboards,
    panel_expressions,
    query_variables,
    recorded_names,
    rule_expressions,
    variable_query,
)
from tests.deploy.prometheus_server import Prometheus, config_for
from tests.e2e.conftest import MODEL
from tests.e2e.traffic import LLM, llm_request, text_request

pytestmark = pytest.mark.slow

NUM_EMBEDDING_REQUESTS = 12
NUM_GENERATIONS = 4
SCRAPES_S = 3  # a few scrapes at the test config's 1s interval
GPU_FAMILY_PREFIX = "DCGM_"


def send_load(router: str, num_embedding_requests: int, num_generations: int) -> None:
    """Embeddings (single texts and batches) and generations, some at once, through the router."""
    with grpc.insecure_channel(router) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        def embed(i: int) -> None:
            texts = [f"text {i}.{j} for the monitoring test".encode() for j in range(1 + i % 4)]
            stub.ModelInfer(text_request(texts, MODEL), timeout=60)

        def generate(i: int) -> None:
            stub.ModelInfer(llm_request(f"Count to {i + 3}, please.".encode(), f"monitoring-{i}", max_tokens=8),
                            timeout=120)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            calls = [pool.submit(embed, i) for i in range(num_embedding_requests)]
            calls += [pool.submit(generate, i) for i in range(num_generations)]
            for call in calls:
                call.result()


def has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="module")
def prometheus(stack, prometheus_binary, tmp_path_factory):
    """Prometheus that has scraped the stack before, during and after a short load."""
    targets_dir = stack.home / "prometheus" / "targets"
    with Prometheus(prometheus_binary, config_for(targets_dir), tmp_path_factory.mktemp("prometheus")) as server:
        def all_up() -> bool:
            targets = server.api("targets", state="active")["activeTargets"]
            return len(targets) >= 4 and all(t["health"] == "up" for t in targets)

        wait_until(all_up, 30, "Prometheus to scrape the registry, the router and both workers", interval_s=0.5)
        # Series that appear with their first request (a router's per-replica counters, a gRPC
        # method's histogram) count from the value they are first scraped with: one request of
        # each kind, and a few scrapes, before the load, so that the load is a rise in every one.
        send_load(stack.router, 1, 1)
        time.sleep(SCRAPES_S)
        send_load(stack.router, NUM_EMBEDDING_REQUESTS, NUM_GENERATIONS)
        time.sleep(SCRAPES_S + 1)  # then rules evaluated over those scrapes
        yield server


def test_prometheus_scrapes_every_process_up_started(prometheus):
    targets = prometheus.api("targets", state="active")["activeTargets"]
    jobs = sorted(t["labels"]["job"] for t in targets)
    assert jobs == ["tensoryard-registry", "tensoryard-router", "tensoryard-worker", "tensoryard-worker"]
    assert all(t["health"] == "up" for t in targets), [(t["scrapeUrl"], t["lastError"]) for t in targets]
    worker_models = sorted(t["labels"]["model"] for t in targets if t["labels"]["job"] == "tensoryard-worker")
    assert worker_models == sorted([MODEL, LLM])


def test_every_expression_in_the_rules_and_dashboards_returns_data(prometheus):
    gpu = has_cuda()
    checked, no_data, not_checked = 0, [], []
    for expression in expressions_to_check(prometheus, no_data):
        if not gpu and all(name.startswith(GPU_FAMILY_PREFIX) for name in promql.metric_names(expression.expr)):
            not_checked.append(expression)
            continue
        checked += 1
        samples = prometheus.query(expression.expr)
        if not samples:
            no_data.append((expression, f"no series: {missing_selectors(prometheus, expression.expr)}"))
        elif all(s["value"][1] == "NaN" for s in samples):  # what Grafana draws as nothing
            no_data.append((expression, "NaN only: series exist, nothing rose in the window"))
    report = "\n".join(f"  {e.where}: {e.expr!r}\n      {why}" for e, why in no_data)
    print(f"\n{checked} expressions checked, {len(no_data)} without data"
          + (f"; {len(not_checked)} GPU expressions not checked (no CUDA device)" if not_checked else "")
          + (f":\n{report}" if report else ""))
    assert not no_data, f"{len(no_data)} of {checked} expressions returned no data:\n{report}"


def test_every_family_the_expressions_name_is_exported(prometheus):
    """Also for families the `or ... * 0` fallbacks would hide, and events the load never causes."""
    exported = set(prometheus.api("metadata"))
    expressions = rule_expressions() + all_panel_expressions()
    names = set().union(*(promql.metric_names(e.expr) for e in expressions))
    names -= recorded_names() | promql.BUILTIN_SERIES
    if not has_cuda():
        names = {n for n in names if not n.startswith(GPU_FAMILY_PREFIX)}
    unknown = sorted(n for n in names if not exported & family_candidates(n))
    print(f"\n{len(names)} families named, {len(unknown)} not exported: {unknown}")
    for name in unknown:
        escaped = name.replace(":", "_")
        if escaped != name and prometheus.query(escaped):
            print(f"  {name} is stored as {escaped}: the exporter escaped its colon (OpenMetrics "
                  "negotiation of prometheus-client, prometheus/client_python#1177)")
    assert not unknown, f"families no process exports: {unknown}"


def expressions_to_check(prometheus: Prometheus, no_data: list) -> list[Expression]:
    """Rules as they are (alerts with `bool` comparisons), then each dashboard's variables, resolved
    in order, and its panels with them substituted. Variables without values go to `no_data`."""
    found = []
    for rule in rule_expressions():
        expr = promql.comparisons_as_bool(rule.expr) if rule.kind == "alert" else rule.expr
        found.append(Expression(rule.where, expr, rule.kind))
    for name, board in dashboards().items():
        values: dict[str, list[str]] = {}
        for variable in query_variables(board):
            query = promql.substitute(variable_query(variable), values)
            match, label = promql.parse_label_values(query)
            values[variable["name"]] = prometheus.api(f"label/{label}/values", **({"match[]": match} if match else {}))
            if not values[variable["name"]]:
                no_data.append((Expression(f"{name} variable ${variable['name']}", query, "variable"), "no values"))
                values[variable["name"]] = ["no-values"]
        for panel in panel_expressions(name, board):
            found.append(Expression(panel.where, promql.substitute(panel.expr, values), "panel"))
    return found


def all_panel_expressions() -> list[Expression]:
    return [e for name, board in dashboards().items() for e in panel_expressions(name, board)]


def missing_selectors(prometheus: Prometheus, expr: str) -> list[str]:
    return [str(s) for s in promql.vector_selectors(expr) if not prometheus.query(str(s))]


def family_candidates(name: str) -> set[str]:
    """The metadata names a sample name can come from: itself, a histogram's family (less _bucket,
    _sum, _count), a counter's family as OpenMetrics names it (less _total)."""
    candidates = {name}
    for suffix in ("_bucket", "_sum", "_count", "_total"):
        if name.endswith(suffix):
            candidates.add(name.removesuffix(suffix))
    return candidates
