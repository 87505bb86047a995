"""The machine a benchmark ran on, and which of its cores run what."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def machine_info(packages: tuple[str, ...]) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    cpu_model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                      if line.startswith("model name")), platform.processor())
    return {
        "cpu_model": cpu_model,
        "num_cpus": os.cpu_count(),
        "num_cpus_usable": len(os.sched_getaffinity(0)),
        "load_avg_1_5_15m_at_start": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in packages},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain")),
    }


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


@contextlib.contextmanager
def cpu_affinity(cpus: set[int] | None):
    """Run the block on `cpus`; processes started inside inherit them."""
    if not cpus:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def split_cpus(pin: bool) -> tuple[set[int] | None, set[int] | None]:
    """(server cpus, client cpus): a quarter of the usable cores, at least one, go to the client.
    (None, None) when not pinning, or with a single core to split."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2:
        return None, None
    num_client_cpus = max(1, len(cpus) // 4)
    return set(cpus[:-num_client_cpus]), set(cpus[-num_client_cpus:])
