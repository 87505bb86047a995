"""What a model folder is, read from its files on the client before a push: architecture, dtype,
parameter count and tokenizer (the registry's VersionMetadata; it computes config_digest itself).

Only headers are read: a safetensors file's JSON header (never its tensor data) and a GGUF file's
key/value fields and tensor infos (memory-mapped, the tensor bytes are not touched). Each field is
a best effort: what cannot be told is left empty (0 for the count), never guessed.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from math import prod
from pathlib import Path

# A header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_SAFETENSORS_HEADER_BYTES = 100 * 1000 * 1000

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
# Files a tokenizer lives in, most specific first; the first present names it.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                    "vocab.json", "vocab.txt")


@dataclass(frozen=True, slots=True)
class ProbedMetadata:
    architecture: str = ""  # "LlamaForCausalLM", "BertModel", "llama" (GGUF)
    dtype: str = ""  # "float32", "bfloat16", "Q4_1" (GGUF file type)
    parameter_count: int = 0
    tokenizer: str = ""  # the tokenizer's file name, or "gguf" when embedded in a GGUF file


def probe_folder(folder: Path) -> ProbedMetadata:
    """Metadata of a model folder: config.json and safetensors headers, or its one GGUF file."""
    folder = Path(folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if ggufs and not (folder / "config.json").is_file():
        try:
            return probe_gguf(ggufs[0])
        except (ValueError, OSError):  # not a GGUF file it can read: nothing can be told
            return ProbedMetadata()
    config = _read_config(folder / "config.json")
    tensors = [entry for path in sorted(folder.rglob("*.safetensors")) for entry in _readable_tensors(path)]
    architectures = config.get("architectures") or []
    architecture = architectures[0] if architectures and isinstance(architectures[0], str) else ""
    return ProbedMetadata(
        architecture=architecture,
        dtype=_config_dtype(config) or _dominant_dtype(tensors),
        parameter_count=sum(num_elements for _, num_elements in tensors),
        tokenizer=next((name for name in _TOKENIZER_FILES if (folder / name).is_file()), ""),
    )


def safetensors_tensors(path: Path) -> list[tuple[str, int]]:
    """(dtype, number of elements) of each tensor in a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: too short to be a safetensors file")
        (header_bytes,) = struct.unpack("<Q", prefix)
        if header_bytes > MAX_SAFETENSORS_HEADER_BYTES:
            raise ValueError(f"{path}: header of {header_bytes} bytes: not a safetensors file")
        raw = f.read(header_bytes)
    if len(raw) < header_bytes:
        raise ValueError(f"{path}: header truncated ({len(raw)} of {header_bytes} bytes)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: header is not JSON: {error}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: header is not a JSON object")
    tensors = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict) or not isinstance(info.get("shape"), list):
            raise ValueError(f"{path}: tensor {name!r} has no shape")
        tensors.append((_SAFETENSORS_DTYPES.get(info.get("dtype"), str(info.get("dtype"))), prod(info["shape"])))
    return tensors


def _readable_tensors(path: Path) -> list[tuple[str, int]]:
    """A file that is not the safetensors it is named after tells nothing (the worker that loads
    it says what is wrong); the push itself goes on."""
    try:
        return safetensors_tensors(path)
    except ValueError:
        return []


def probe_gguf(path: Path) -> ProbedMetadata:
    """Metadata of a GGUF file: general.architecture, general.file_type, tensor infos, vocabulary."""
    from gguf import GGUFReader, LlamaFileType

    reader = GGUFReader(str(path))
    architecture = _gguf_field(reader, "general.architecture")
    file_type = _gguf_field(reader, "general.file_type")
    if isinstance(file_type, int):
        try:
            dtype = LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            dtype = ""
    else:  # older files carry no file type: name the most common tensor type
        dtype = _dominant_dtype([(t.tensor_type.name, int(t.n_elements)) for t in reader.tensors])
    return ProbedMetadata(
        architecture=architecture if isinstance(architecture, str) else "",
        dtype=dtype,
        parameter_count=sum(int(t.n_elements) for t in reader.tensors),
        tokenizer="gguf" if "tokenizer.ggml.model" in reader.fields else "",
    )


def _gguf_field(reader, key: str):
    from services.worker.models.gguf_import import _field_value

    field = reader.fields.get(key)
    return None if field is None else _field_value(field)


def _read_config(path: Path) -> dict:
    """The folder's config.json, or {} when it has none it can read: metadata is what can be told
    from the files, and a tensor model's own config.json need not be a Hugging Face one (or JSON)."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return config if isinstance(config, dict) else {}


def _config_dtype(config: dict) -> str:
    # transformers writes `torch_dtype`; releases from 4.56 on write `dtype` instead.
    value = config.get("torch_dtype") or config.get("dtype")
    return value.removeprefix("torch.") if isinstance(value, str) else ""


def _dominant_dtype(tensors: list[tuple[str, int]]) -> str:
    """The dtype holding the most elements (a float32 model may keep int64 position ids)."""
    counts: Counter[str] = Counter()
    for dtype, num_elements in tensors:
        counts[dtype] += num_elements
    return counts.most_common(1)[0][0] if counts else ""
