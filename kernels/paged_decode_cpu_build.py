"""Builds the CPU paged decode kernel (`kernels/csrc/paged_decode_cpu.cpp`) into the repo's build/.

`scripts/setup` runs `python -m kernels.paged_decode_cpu_build`; tests build on demand. One g++ call,
no ninja and no pybind11: the file registers a torch operator (`TORCH_LIBRARY`), so it needs only
torch's headers and libraries, and compiles in about 20 s on 2 cores.

The library's name carries a digest of the source, the compile command (so the instruction set),
the torch version and the compiler's version: a stale or foreign build is never loaded, a changed
one is rebuilt beside it. The instruction set is the best of AVX-512, AVX2+FMA or baseline x86-64
that this CPU reports, never `-march=native`, so a build names what it needs. `-fopenmp` links
against `libgomp.so.1`, the soname torch's wheel ships and has already loaded when the kernel is:
one OpenMP runtime, torch's own thread pool and thread count.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

SOURCE = Path(__file__).resolve().parent / "csrc" / "paged_decode_cpu.cpp"
BUILD_DIR = Path(__file__).resolve().parent.parent / "build" / "paged_decode_cpu"
COMPILER = "g++"
BUILD_TIMEOUT_S = 600

# x86-64 feature levels (the psABI's): the kernel's loops vectorise to whatever the level allows.
_ISA_LEVELS = (
    ("avx512", {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"},
     ["-march=x86-64-v4", "-mprefer-vector-width=512"]),
    ("avx2", {"avx2", "fma", "bmi2", "f16c"}, ["-march=x86-64-v3"]),
    ("baseline", set(), ["-march=x86-64"]),
)


class BuildError(RuntimeError):
    """The kernel could not be compiled here; the message says why."""


def isa_level() -> tuple[str, list[str]]:
    """The best instruction-set level this CPU supports, and its compiler flags."""
    try:
        flags = set()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        flags = set()
    for name, needed, compile_flags in _ISA_LEVELS:
        if needed <= flags:
            return name, compile_flags
    return _ISA_LEVELS[-1][0], _ISA_LEVELS[-1][2]


def _command(output: Path) -> list[str]:
    import torch.utils.cpp_extension as cpp_extension  # here: it imports setuptools (~0.1 s)

    torch_lib = Path(torch.__file__).resolve().parent / "lib"
    includes = [f"-I{path}" for path in cpp_extension.include_paths()]
    abi = int(torch.compiled_with_cxx11_abi())
    return [
        COMPILER, "-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-DNDEBUG", *isa_level()[1],
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}", *includes, str(SOURCE), "-o", str(output),
        f"-L{torch_lib}", "-lc10", "-ltorch_cpu", f"-Wl,-rpath,{torch_lib}",
    ]


def _compiler_version() -> str:
    try:
        return subprocess.run([COMPILER, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"no C++ compiler: {COMPILER} --version failed ({error})") from error


def library_path() -> Path:
    """Where the build for this source, CPU, torch and compiler lives (it may not exist yet)."""
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
    digest.update(" ".join(_command(Path("out.so"))).encode())
    digest.update(torch.__version__.encode())
    digest.update(_compiler_version().encode())
    return BUILD_DIR / f"paged_decode_cpu-{isa_level()[0]}-{digest.hexdigest()[:16]}.so"


def build(force: bool = False) -> Path:
    """Compiles the kernel unless its build exists; returns the library's path or raises BuildError."""
    if sys.platform != "linux":
        raise BuildError(f"the CPU decode kernel builds on Linux only, not {sys.platform}")
    output = library_path()
    if output.exists() and not force:
        return output
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    partial = output.with_suffix(f".{os.getpid()}.tmp")  # concurrent builds never load a half-written file
    try:
        result = subprocess.run(_command(partial), capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"{COMPILER} could not run: {error}") from error
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        tail = "\n".join(result.stderr.strip().splitlines()[-15:])
        raise BuildError(f"{COMPILER} failed (exit {result.returncode}):\n{tail}")
    os.replace(partial, output)
    for stale in BUILD_DIR.glob("paged_decode_cpu-*.so"):  # earlier sources' builds (a loaded one stays mapped)
        if stale != output:
            stale.unlink(missing_ok=True)
    return output


def main() -> int:
    started = time.monotonic()
    try:
        path = build()
    except BuildError as error:
        print(f"tensoryard: the CPU paged decode kernel did not build; the torch decode path is used.\n{error}")
        return 1
    print(f"tensoryard: CPU paged decode kernel ({isa_level()[0]}) ready in {time.monotonic() - started:.1f} s: "
          f"{path.relative_to(BUILD_DIR.parent.parent)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
