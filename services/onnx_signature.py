"""An ONNX graph's inputs and outputs as a Triton-style model config, and its runtime options.

`models import model.onnx` stores `serving_config(read_signature(path))` in the version's config,
so the registry, `models show` and the worker all see what the graph takes:

    {"backend": "onnxruntime", "platform": "onnxruntime_onnx", "model_file": "model.onnx",
     "max_batch_size": 64,                      # 0: the graph has no batch dimension
     "inputs":  [{"name": "x", "datatype": "FP32", "dims": [3, 32, 32]}],   # -1: dynamic
     "outputs": [{"name": "y", "datatype": "FP32", "dims": [10]}],
     "onnxruntime": {"graph_optimization_level": "all", "intra_op_num_threads": 0,
                     "inter_op_num_threads": 0}}

As in Triton, `dims` leave out the batch dimension when max_batch_size > 0. The graph has one when
the first dimension of every input and output is dynamic and the inputs name it alike (torch.onnx
writes the name given in dynamic_axes; an unnamed dynamic dimension matches any name). The worker
reads the same facts from its onnxruntime session, which is the authority at serving time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BACKEND = "onnxruntime"
PLATFORM = "onnxruntime_onnx"
DEFAULT_MAX_BATCH_SIZE = 64
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")
DEFAULT_RUNTIME_OPTIONS = {"graph_optimization_level": "all", "intra_op_num_threads": 0, "inter_op_num_threads": 0}

# ONNX TensorProto element types (onnx.TensorProto.*) and onnxruntime's type strings -> KServe datatypes.
_ELEMENT_TYPES = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
                  8: "BYTES", 9: "BOOL", 10: "FP16", 11: "FP64", 12: "UINT32", 13: "UINT64"}
_ORT_TYPES = {"tensor(float)": "FP32", "tensor(uint8)": "UINT8", "tensor(int8)": "INT8",
              "tensor(uint16)": "UINT16", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
              "tensor(int64)": "INT64", "tensor(string)": "BYTES", "tensor(bool)": "BOOL",
              "tensor(float16)": "FP16", "tensor(double)": "FP64", "tensor(uint32)": "UINT32",
              "tensor(uint64)": "UINT64"}


@dataclass(frozen=True, slots=True)
class GraphTensor:
    """One graph input or output: each dim a size, or a name (str) or "" when dynamic."""

    name: str
    datatype: str
    shape: tuple[int | str, ...]

    @property
    def dims(self) -> list[int]:
        return [d if isinstance(d, int) else -1 for d in self.shape]


@dataclass(frozen=True, slots=True)
class GraphSignature:
    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]

    @property
    def has_batch_dim(self) -> bool:
        tensors = (*self.inputs, *self.outputs)
        if not self.inputs or any(not t.shape or isinstance(t.shape[0], int) for t in tensors):
            return False
        names = {t.shape[0] for t in self.inputs if t.shape[0]}
        if len(names) > 1:
            return False
        # An output whose first dim carries another input's dim name follows that, not the batch.
        other_names = {d for t in self.inputs for d in t.shape[1:] if isinstance(d, str) and d} - names
        return not any(t.shape[0] in other_names for t in self.outputs)


def datatype_of_element_type(element_type: int, where: str) -> str:
    try:
        return _ELEMENT_TYPES[element_type]
    except KeyError:
        raise ValueError(f"{where}: ONNX element type {element_type} has no KServe datatype") from None


def datatype_of_ort_type(ort_type: str, where: str) -> str:
    try:
        return _ORT_TYPES[ort_type]
    except KeyError:
        raise ValueError(f"{where}: onnxruntime type {ort_type} has no KServe datatype") from None


def read_signature(path: Path) -> GraphSignature:
    """The graph's real inputs (initializers listed as inputs by old exporters are not) and outputs."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)  # the weights are not needed here
    except Exception as error:  # noqa: BLE001 - a protobuf DecodeError, an OSError, ...
        raise ValueError(f"{path} is not a readable ONNX model: {error}") from None
    graph = model.graph
    initializers = {init.name for init in graph.initializer}

    def tensor(value, kind: str) -> GraphTensor:
        where = f"{path.name}: {kind} '{value.name}'"
        if not value.type.HasField("tensor_type"):
            raise ValueError(f"{where} is not a tensor (sequences and maps are not served)")
        tensor_type = value.type.tensor_type
        if not tensor_type.HasField("shape"):
            raise ValueError(f"{where} has no shape (its rank is unknown)")
        shape = tuple(d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor_type.shape.dim)
        return GraphTensor(value.name, datatype_of_element_type(tensor_type.elem_type, where), shape)

    inputs = tuple(tensor(v, "input") for v in graph.input if v.name not in initializers)
    outputs = tuple(tensor(v, "output") for v in graph.output)
    if not outputs:
        raise ValueError(f"{path.name}: the graph has no outputs")
    return GraphSignature(inputs, outputs)


def serving_config(signature: GraphSignature, model_file: str, overrides: dict | None = None) -> dict:
    """The version's config for this graph; `overrides` (the user's --config) win where they may."""
    overrides = dict(overrides or {})
    batched = signature.has_batch_dim
    max_batch_size = int(overrides.pop("max_batch_size", DEFAULT_MAX_BATCH_SIZE if batched else 0))
    if max_batch_size < 0:
        raise ValueError(f"max_batch_size must be >= 0, got {max_batch_size}")
    if max_batch_size and not batched:
        raise ValueError("max_batch_size > 0 needs a batch dimension: the first dimension of every input "
                         "and output dynamic (e.g. torch.onnx.export dynamic_axes={name: {0: 'batch'}})")
    for key in ("inputs", "outputs", "backend", "platform", "model_file"):
        if key in overrides:
            raise ValueError(f"--config may not set {key!r}: it comes from the graph")
    runtime = check_runtime_options({**DEFAULT_RUNTIME_OPTIONS, **overrides.pop("onnxruntime", {})})

    def entries(tensors):
        return [{"name": t.name, "datatype": t.datatype, "dims": t.dims[1:] if max_batch_size else t.dims}
                for t in tensors]

    return {"backend": BACKEND, "platform": PLATFORM, "model_file": model_file, "max_batch_size": max_batch_size,
            "inputs": entries(signature.inputs), "outputs": entries(signature.outputs), "onnxruntime": runtime,
            **overrides}


def check_runtime_options(options: dict) -> dict:
    """The `onnxruntime` section, checked; ValueError naming the field."""
    if not isinstance(options, dict):
        raise ValueError("onnxruntime must be a JSON object")
    unknown = sorted(set(options) - set(DEFAULT_RUNTIME_OPTIONS))
    if unknown:
        raise ValueError(f"onnxruntime: unknown option(s) {unknown}; known: {sorted(DEFAULT_RUNTIME_OPTIONS)}")
    options = {**DEFAULT_RUNTIME_OPTIONS, **options}
    if options["graph_optimization_level"] not in GRAPH_OPTIMIZATION_LEVELS:
        raise ValueError(f"onnxruntime.graph_optimization_level must be one of {GRAPH_OPTIMIZATION_LEVELS}, "
                         f"got {options['graph_optimization_level']!r}")
    for key in ("intra_op_num_threads", "inter_op_num_threads"):
        value = options[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"onnxruntime.{key} must be an integer >= 0 (0: onnxruntime's default), got {value!r}")
    return options


def weight_summary(path: Path) -> tuple[int, str]:
    """(parameter count, the dtype holding most of them) from the initializers' headers alone."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        num_elements = 1
        for dim in init.dims:
            num_elements *= dim
        datatype = _ELEMENT_TYPES.get(init.data_type, str(init.data_type))
        counts[datatype] = counts.get(datatype, 0) + num_elements
    if not counts:
        return 0, ""
    return sum(counts.values()), _DTYPE_NAMES.get(max(counts, key=counts.get), "")


# KServe datatype -> the dtype names VersionMetadata uses elsewhere ("float32", "bfloat16", ...).
_DTYPE_NAMES = {"FP32": "float32", "FP16": "float16", "FP64": "float64", "INT8": "int8", "UINT8": "uint8",
                "INT32": "int32", "INT64": "int64"}
