"""Real NVIDIA Triton (PyTriton, bench/peers/triton_peer.py) beside the session's `tensoryard up`.

The peer serves the same two models, the LLM from the very SmolLM2 folder that `tensoryard up`
imported, so both servers answer the same requests. Its venv is made once with
`python -m bench.peers.triton_peer --install`; without it these tests skip.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import pytest

from bench.peers import triton_peer
from tests.conftest import REPO_ROOT, free_port, wait_until

LLM = "SmolLM2-135M-Instruct"
PEER_READY_TIMEOUT_S = 300
PEER_STOP_TIMEOUT_S = 60


@dataclass(frozen=True)
class Peer:
    address: str
    access_token: str
    process: subprocess.Popen
    metrics_port: int = 0  # Triton's own Prometheus endpoint

    @property
    def headers(self) -> dict[str, str]:
        """gRPC metadata that PyTriton asks of the repository and statistics RPCs."""
        return {triton_peer.ACCESS_TOKEN_HEADER: self.access_token}


@pytest.fixture(scope="session")
def peer(request, tmp_path_factory) -> Peer:
    if not triton_peer.venv_python().exists():
        pytest.skip(triton_peer.NOT_INSTALLED)
    stack = request.getfixturevalue("stack")  # the LLM folder exists once `tensoryard up` imported it
    llm_folder = stack.home / "imports" / LLM
    workdir = tmp_path_factory.mktemp("triton-peer")
    output_path = workdir / "peer.out"
    token_path = workdir / "access-token"
    grpc_port, http_port, metrics_port = free_port(), free_port(), free_port()
    with open(output_path, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "bench.peers.triton_peer",
             "--grpc-port", str(grpc_port), "--http-port", str(http_port),
             "--metrics-port", str(metrics_port), "--llm-folder", str(llm_folder),
             "--access-token-file", str(token_path)],
            cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT,
            env=os.environ.copy(), start_new_session=True,  # its own group: tritonserver and stubs stop with it
        )
    wait_until(
        lambda: process.poll() is not None or triton_peer.READY_LINE in output_path.read_text(errors="replace"),
        timeout_s=PEER_READY_TIMEOUT_S, what="the Triton peer's ready line", interval_s=0.2,
    )
    assert process.poll() is None, f"Triton peer exited: {output_path.read_text(errors='replace')[-4000:]}"
    yield Peer(f"127.0.0.1:{grpc_port}", token_path.read_text().strip(), process, metrics_port)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(PEER_STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
