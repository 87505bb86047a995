#!/usr/bin/env bash
# Real Triton (PyTriton) beside tensoryard: `bench/peers/triton.sh --install`, then
# `bench/peers/triton.sh --llm-folder HOME/imports/SmolLM2-135M-Instruct [--grpc-port P ...]`.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec "${PYTHON:-.venv/bin/python}" -m bench.peers.triton_peer "$@"
