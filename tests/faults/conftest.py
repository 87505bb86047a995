"""Fault tests: real processes that are killed, raced or made to fail; helpers from tests/conftest.py."""

from tests.conftest import MODEL, REPO_ROOT, cli, free_port, health_status, stop, wait_until  # noqa: F401
