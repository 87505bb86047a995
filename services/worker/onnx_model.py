"""An ONNX graph served with onnxruntime through the dynamic batcher, as a Triton tensor model.

Its inputs and outputs are the graph's, as the session reports them. With a batch dimension
(max_batch_size > 0) the dims exclude it, as in Triton; without one, each request runs alone.

Requests are checked on the gRPC thread before they reach the batcher (names, datatypes, ranks,
fixed sizes, batch size, and that inputs sharing a named dynamic dimension agree on its size), so
a batch holds only requests the session can take. A batch concatenates the requests whose
shapes beyond the batch dimension agree, one session run per such group. A run that fails anyway
is repeated request by request, so the failure stays with the request that caused it and the
others in the batch get their answers.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from services.common.errors import InvalidArgument
from services.common.telemetry import get_logger
from services.onnx_signature import BACKEND, PLATFORM, GraphSignature
from services.worker.batcher import BatchOutput, BatcherConfig, DynamicBatcher
from services.worker.onnx_session import session_device
from services.worker.statistics import ModelStats, StatisticsRecorder
from services.worker.tensor_codec import (
    NUMPY_DTYPES,
    TensorSpec,
    check_requested_outputs,
    decode_inputs,
    encode_bytes_tensor,
)

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class TensorJob:
    """One request's inputs (each [num_items, ...] when batched) and the outputs it asked for."""

    inputs: dict[str, np.ndarray]
    output_names: tuple[str, ...]
    num_items: int

    @property
    def shape_key(self) -> tuple:
        """Requests with the same key can share one session run."""
        return tuple((name, array.shape[1:]) for name, array in sorted(self.inputs.items()))


class OnnxModel:
    platform = PLATFORM
    backend = BACKEND
    decoupled = False
    reports_load = False  # no engine reports: each finished request wakes the load stream

    def __init__(self, name: str, version: str, session: ort.InferenceSession, signature: GraphSignature,
                 batcher_config: BatcherConfig | None, runtime_options: dict):
        self.name = name
        self.version = version
        self.session = session
        self.runtime_options = runtime_options
        self.batcher_config = batcher_config  # None: the graph has no batch dimension
        batched = batcher_config is not None
        self.inputs = {t.name: TensorSpec(t.name, t.datatype, tuple(t.dims[1:] if batched else t.dims))
                       for t in signature.inputs}
        self.outputs = {t.name: TensorSpec(t.name, t.datatype, tuple(t.dims[1:] if batched else t.dims))
                        for t in signature.outputs}
        self._graph_shapes = {t.name: t.shape for t in signature.inputs}
        self._output_names = [t.name for t in signature.outputs]
        self.weight_bytes = 0
        self.recorder = StatisticsRecorder()  # ModelStatistics and nv_inference_* read it
        # Unbatched, requests still run on the batcher's one thread, one at a time.
        self.batcher = DynamicBatcher(batcher_config or BatcherConfig(max_batch_size=1), self._execute,
                                      name=name, statistics=self.recorder)

    @property
    def max_batch_size(self) -> int:
        return self.batcher_config.max_batch_size if self.batcher_config is not None else 0

    @property
    def device(self) -> str:
        return session_device(self.session)

    @property
    def queue_depth(self) -> int:
        return self.batcher.queue_depth

    def statistics(self) -> ModelStats:
        return self.recorder.snapshot()

    def load_fields(self) -> dict:
        return {}

    def config_parameters(self) -> dict[str, str]:
        """What ModelConfig reports beyond inputs and outputs: how the session runs."""
        options = self.runtime_options
        return {"graph_optimization_level": options["graph_optimization_level"],
                "intra_op_num_threads": str(options["intra_op_num_threads"]),
                "inter_op_num_threads": str(options["inter_op_num_threads"]),
                "execution_provider": self.session.get_providers()[0]}

    # -- request side (gRPC thread) ----------------------------------------------------------

    def job_from_infer_request(self, request) -> TensorJob:
        output_names = check_requested_outputs(request, self.outputs, self.name)
        arrays, batch_size = decode_inputs(request, self.inputs, self.name, self.max_batch_size)
        self._check_named_dims(arrays)
        for name, spec in self.inputs.items():
            if spec.datatype == "BYTES":  # onnxruntime takes strings as str objects
                arrays[name] = np.vectorize(_utf8, otypes=[object])(arrays[name], name)
        return TensorJob(arrays, tuple(output_names), batch_size if self.max_batch_size else 1)

    def _check_named_dims(self, arrays: dict[str, np.ndarray]) -> None:
        sizes: dict[str, tuple[int, str]] = {}
        for name, array in arrays.items():
            for axis, dim in enumerate(self._graph_shapes[name]):
                if isinstance(dim, str) and dim:
                    size, first = sizes.setdefault(dim, (array.shape[axis], name))
                    if size != array.shape[axis]:
                        raise InvalidArgument(
                            f"inputs '{first}' and '{name}' of model '{self.name}' share dimension '{dim}' "
                            f"but have sizes {size} and {array.shape[axis]}"
                        )

    async def infer(self, request, timeout_s: float | None = None):
        """A ModelInferResponse with the requested outputs."""
        # Imported here, not with the module: the unit tests drive this model with tritonclient's
        # protos, which share the `inference` package name and cannot live in one process with ours.
        from protos.inference import grpc_service_pb2 as pb

        job = self.job_from_infer_request(request)
        outputs = await self.batcher.submit_async(job, job.num_items)
        response = pb.ModelInferResponse(model_name=self.name, model_version=self.version, id=request.id)
        for name in job.output_names:
            array = outputs[name]
            datatype = self.outputs[name].datatype
            response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
            if datatype == "BYTES":
                response.raw_output_contents.append(encode_bytes_tensor(array.reshape(-1)))
            else:
                response.raw_output_contents.append(np.ascontiguousarray(array, NUMPY_DTYPES[datatype]).tobytes())
        return response

    # -- batch side (batcher thread) -----------------------------------------------------------

    def _execute(self, jobs: list[TensorJob]) -> BatchOutput:
        groups: dict[tuple, list[int]] = {}
        for index, job in enumerate(jobs):
            groups.setdefault(job.shape_key if self.max_batch_size else index, []).append(index)
        results: list = [None] * len(jobs)
        timings = [0, 0]  # compute_input_ns, compute_output_ns
        for indices in groups.values():
            try:
                outputs = self._run([jobs[i] for i in indices], timings)
            except Exception as error:  # noqa: BLE001 - repeated alone, below, to find whose it is
                if len(indices) == 1:
                    results[indices[0]] = self._run_error(error)
                    continue
                log.warning("onnx_batch_failed_retrying_alone", model=self.name, num_requests=len(indices),
                            error=str(error))
                outputs = []
                for i in indices:
                    try:
                        outputs.extend(self._run([jobs[i]], timings))
                    except Exception as alone_error:  # noqa: BLE001 - this request's own failure
                        outputs.append(self._run_error(alone_error))
            for i, output in zip(indices, outputs):
                results[i] = output
        return BatchOutput(results, compute_input_ns=timings[0], compute_output_ns=timings[1])

    def _run(self, jobs: list[TensorJob], timings: list[int]) -> list[dict[str, np.ndarray]]:
        started_ns = time.monotonic_ns()
        if len(jobs) == 1:
            feeds = jobs[0].inputs
        else:
            feeds = {name: np.concatenate([job.inputs[name] for job in jobs]) for name in jobs[0].inputs}
        run_ns = time.monotonic_ns()
        arrays = self.session.run(self._output_names, feeds)
        finished_ns = time.monotonic_ns()
        by_name = dict(zip(self._output_names, arrays))
        if len(jobs) == 1:
            results = [{name: by_name[name] for name in jobs[0].output_names}]
        else:
            num_rows = sum(job.num_items for job in jobs)
            for name, array in by_name.items():
                if array.ndim == 0 or array.shape[0] != num_rows:
                    raise RuntimeError(f"output '{name}' has shape {list(array.shape)}, not {num_rows} rows")
            results, start = [], 0
            for job in jobs:
                results.append({name: by_name[name][start : start + job.num_items] for name in job.output_names})
                start += job.num_items
        timings[0] += run_ns - started_ns
        timings[1] += time.monotonic_ns() - finished_ns
        return results

    def _run_error(self, error: Exception) -> Exception:
        # The request passed every check and the same session runs others, so what onnxruntime
        # refuses here is this input (values out of range for a Gather, sizes a Reshape rejects).
        if isinstance(error, (ort_state.InvalidArgument, ort_state.RuntimeException)):
            return InvalidArgument(f"model '{self.name}' could not run this input: {error}")
        return error

    def warm_up(self, num_batches: int) -> None:
        """Session runs on a one-row input, dynamic sizes 1: first-call costs (allocations, kernel
        choice) are paid before traffic. Best effort: a graph that cannot take such an input is
        simply not warmed."""
        if any(spec.datatype == "BYTES" for spec in self.inputs.values()):
            return
        feeds = {name: np.zeros([d if isinstance(d, int) and d > 0 else 1 for d in shape],
                                NUMPY_DTYPES[self.inputs[name].datatype])
                 for name, shape in self._graph_shapes.items()}
        try:
            for _ in range(num_batches):
                self.session.run(self._output_names, feeds)
        except Exception as error:  # noqa: BLE001 - warm-up is an optimisation, never a load failure
            log.info("onnx_warm_up_skipped", model=self.name, error=str(error))

    def close(self) -> None:
        self.batcher.close(timeout_s=30)


def _utf8(value, name: str) -> str:
    try:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    except UnicodeDecodeError as error:
        raise InvalidArgument(f"input '{name}': an element is not valid UTF-8: {error}") from None
