"""An onnxruntime session for a served version: providers, optimisation level and threads from the
version's `onnxruntime` config (services/onnx_signature.py), and the graph's signature as the
session reports it (with shapes inferred where the file leaves them symbolic)."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from services.common.telemetry import get_logger
from services.onnx_signature import GraphSignature, GraphTensor, check_runtime_options, datatype_of_ort_type

log = get_logger(__name__)

_OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def open_session(path: Path, options: dict, device: str = "cpu") -> ort.InferenceSession:
    """CUDA where the worker runs on cuda[:N] and this onnxruntime build has the CUDA provider, the
    CPU otherwise (also as CUDA's fallback for ops it lacks)."""
    options = check_runtime_options(options)
    session_options = ort.SessionOptions()
    session_options.graph_optimization_level = _OPTIMIZATION_LEVELS[options["graph_optimization_level"]]
    session_options.intra_op_num_threads = options["intra_op_num_threads"]
    session_options.inter_op_num_threads = options["inter_op_num_threads"]
    providers: list = [CPU_PROVIDER]
    if device.startswith("cuda"):
        if CUDA_PROVIDER in ort.get_available_providers():
            device_id = int(device.partition(":")[2] or 0)
            providers.insert(0, (CUDA_PROVIDER, {"device_id": device_id}))
        else:
            log.warning("onnx_cuda_provider_missing", device=device, available=ort.get_available_providers())
    return ort.InferenceSession(str(path), sess_options=session_options, providers=providers)


def session_device(session: ort.InferenceSession) -> str:
    return "cuda" if session.get_providers()[0] == CUDA_PROVIDER else "cpu"


def session_signature(session: ort.InferenceSession) -> GraphSignature:
    def tensor(arg) -> GraphTensor:
        shape = tuple(d if isinstance(d, int) else (d or "") for d in arg.shape)
        return GraphTensor(arg.name, datatype_of_ort_type(arg.type, f"'{arg.name}'"), shape)

    return GraphSignature(tuple(tensor(a) for a in session.get_inputs()),
                          tuple(tensor(a) for a in session.get_outputs()))
