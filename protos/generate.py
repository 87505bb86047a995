"""Generate the Python code for every .proto under protos/ (checked in beside the sources).

    python -m protos.generate            # rewrite the generated files
    python -m protos.generate --check    # exit 1 if any checked-in file is stale

Sources are compiled with `-I protos`, the include root other languages use too
(`protoc -I protos ...`). protoc writes Python imports relative to that root
(`from inference import model_config_pb2`); the import packages here live under `protos`, so those
lines are rewritten to `from protos.inference import ...`.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

PROTO_ROOT = Path(__file__).resolve().parent
_IMPORT_LINE = re.compile(r"^from (inference|tensoryard\.v1)( import )", re.MULTILINE)
# Version stamps of the generating tools: a newer grpcio-tools writes other numbers for the same
# sources, which is not staleness.
_VERSION_STAMPS = (
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"^_runtime_version\.ValidateProtobufRuntimeVersion\(.*?\)$", re.MULTILINE | re.DOTALL),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
)


def _without_version_stamps(text: str) -> str:
    for stamp in _VERSION_STAMPS:
        text = stamp.sub("", text)
    return text


def proto_sources() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate_into(out_dir: Path) -> list[Path]:
    """Compile every source into out_dir (same relative layout); returns the written files."""
    from grpc_tools import protoc
    import grpc_tools

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_sources()]
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *sources,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError("protoc failed: " + " ".join(args))
    written = sorted(p for p in out_dir.rglob("*_pb2*.py*"))
    for path in written:
        text = _IMPORT_LINE.sub(r"from protos.\1\2", path.read_text())
        path.write_text(text)
    return written


def stale_files() -> list[str]:
    """Relative paths of generated files that differ from what the sources produce now."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh_root = Path(tmp)
        fresh = {
            p.relative_to(fresh_root): _without_version_stamps(p.read_text())
            for p in generate_into(fresh_root)
        }
    checked_in = {
        p.relative_to(PROTO_ROOT): _without_version_stamps(p.read_text())
        for p in PROTO_ROOT.rglob("*_pb2*.py*")
    }
    names = set(fresh) | set(checked_in)
    return sorted(str(n) for n in names if fresh.get(n) != checked_in.get(n))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: protos/{name}")
        return 1 if stale else 0
    for path in generate_into(PROTO_ROOT):
        print(f"wrote {path.relative_to(PROTO_ROOT.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
