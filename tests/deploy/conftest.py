"""deploy/: the Prometheus configuration, rules and Grafana dashboards, checked with Prometheus'
own tools and against a running `tensoryard up`. Tests that need `promtool` or `prometheus` skip,
saying why, only where neither is installed."""

from __future__ import annotations

import pytest

from tests.deploy.prometheus_server import NOT_INSTALLED, binary


@pytest.fixture(scope="session")
def promtool() -> str:
    found = binary("promtool")
    if found is None:
        pytest.skip(NOT_INSTALLED.format(name="promtool"))
    return found


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    found = binary("prometheus")
    if found is None:
        pytest.skip(NOT_INSTALLED.format(name="prometheus"))
    return found
