"""The e2e helpers and the `stack` fixture live in tests/conftest.py (shared with tests/conformance)."""

from tests.conftest import MODEL, REPO_ROOT, Stack, cli, free_port, health_status, stop, wait_until  # noqa: F401
