"""The batching core builds the flat batch the runner's per-sequence loop would, on every path.

The spec is `loop_batch`, a plain Python loop over sequences as the runner wrote it before. The
torch path is checked against it over random steps: prefill chunks over cached prefixes, whole
prompts and decodes mixed, odd block sizes, slots out of order, up to 64 sequences, with and
without preallocated buffers, int32 and int64 token buffers. The CUDA kernel's source is checked
twice: compiled by g++ for the CPU with one call per GPU thread (its index arithmetic and the
launcher's argument order, without a GPU), and through CuPy on CUDA where there is one.
"""

from __future__ import annotations

import ctypes
import random
import shutil
import subprocess

import numpy as np
import pytest
import torch

from kernels import batch_core
from kernels.batch_core import FlatBatchBuffers, StepDescription, build_flat_batch

MAX_SLOTS, MAX_LEN = 80, 300
FIELDS = ("input_ids", "positions", "slot_mapping", "cu_seqlens_q", "context_lens", "block_tables", "logits_indices")
DTYPES = {"input_ids": torch.int64, "positions": torch.int64, "slot_mapping": torch.int64,
          "cu_seqlens_q": torch.int32, "context_lens": torch.int32, "block_tables": torch.int32,
          "logits_indices": torch.int64}
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA kernel needs a CUDA device")


def make_step(seed: int, block_size: int, token_dtype: torch.dtype, num_seqs: int | None = None, device="cpu"):
    """Persistent buffers with random tokens and scattered blocks, and a random step over them:
    (lists for StepDescription.from_lists, token_ids, block_tables)."""
    rng = random.Random(seed)
    max_blocks = -(-MAX_LEN // block_size)
    num_seqs = num_seqs or rng.randint(1, 64)
    high = 2**31 - 1 if token_dtype == torch.int32 else 2**40  # int64 ids beyond int32's range
    generator = torch.Generator().manual_seed(seed)
    token_ids = torch.randint(0, high, (MAX_SLOTS, MAX_LEN), generator=generator, dtype=torch.int64)
    token_ids = token_ids.to(token_dtype)
    block_tables = torch.zeros(MAX_SLOTS, max_blocks, dtype=torch.int32)
    slots = rng.sample(range(MAX_SLOTS), num_seqs)  # out of order, gaps between them
    pool = rng.sample(range(1, MAX_SLOTS * max_blocks), MAX_SLOTS * max_blocks - 1)
    num_computed, num_new = [], []
    for slot in slots:
        kind = rng.choice(["decode", "prompt", "chunk"])
        if kind == "decode":
            computed, new = rng.randint(1, MAX_LEN - 1), 1
        elif kind == "prompt":
            computed, new = 0, rng.randint(1, 40)
        else:  # a prefill chunk over a cached prefix
            computed, new = rng.randint(1, MAX_LEN - 41), rng.randint(2, 40)
        num_computed.append(computed)
        num_new.append(new)
        used = -(-(computed + new) // block_size)
        block_tables[slot, :used] = torch.tensor([pool.pop() for _ in range(used)], dtype=torch.int32)
    sample = [rng.randint(0, 1) for _ in slots]
    return (slots, num_computed, num_new, sample), token_ids.to(device), block_tables.to(device)


def loop_batch(lists, token_ids: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> dict:
    """The spec: one sequence at a time, Python ints."""
    tokens, tables = token_ids.tolist(), block_tables.tolist()
    want = {name: [] for name in FIELDS}
    want["cu_seqlens_q"] = [0]
    for slot, computed, new, sample in zip(*lists):
        for p in range(computed, computed + new):
            want["input_ids"].append(tokens[slot][p])
            want["positions"].append(p)
            want["slot_mapping"].append(tables[slot][p // block_size] * block_size + p % block_size)
        want["cu_seqlens_q"].append(want["cu_seqlens_q"][-1] + new)
        want["context_lens"].append(computed + new)
        want["block_tables"].append(tables[slot])
        if sample:
            want["logits_indices"].append(want["cu_seqlens_q"][-1] - 1)
    return want


def assert_batch_equals(got, want: dict) -> None:
    for name in FIELDS:
        tensor = getattr(got, name)
        assert tensor.dtype == DTYPES[name], name
        assert tensor.cpu().tolist() == want[name], name


def assert_same_batch(got, want) -> None:
    for name in FIELDS:
        assert torch.equal(getattr(got, name).cpu(), getattr(want, name).cpu()), name


CASES = [(seed, block_size, dtype) for seed, block_size in enumerate([1, 3, 16, 17, 32, 16, 5, 32])
         for dtype in (torch.int32, torch.int64)]


@pytest.mark.parametrize("seed,block_size,token_dtype", CASES)
@pytest.mark.parametrize("with_buffers", [False, True])
def test_torch_path_matches_the_per_sequence_loop(seed, block_size, token_dtype, with_buffers):
    lists, token_ids, block_tables = make_step(seed, block_size, token_dtype)
    out = FlatBatchBuffers.allocate(64 * 40, 64, block_tables.shape[1], "cpu") if with_buffers else None
    got = build_flat_batch(StepDescription.from_lists(*lists), token_ids, block_tables, block_size, out, impl="torch")
    assert_batch_equals(got, loop_batch(lists, token_ids, block_tables, block_size))
    assert got.max_seqlen_q == max(lists[2])
    assert got.max_context_len == max(c + n for c, n in zip(lists[1], lists[2]))


def test_a_step_that_samples_nothing_has_no_logits_rows():
    lists, token_ids, block_tables = make_step(11, 16, torch.int64, num_seqs=5)
    lists = (*lists[:3], [0] * 5)
    got = build_flat_batch(StepDescription.from_lists(*lists), token_ids, block_tables, 16)
    assert got.logits_indices.shape == (0,)
    assert_batch_equals(got, loop_batch(lists, token_ids, block_tables, 16))


def test_outputs_are_views_of_the_buffers_and_later_steps_overwrite_them():
    out = FlatBatchBuffers.allocate(64 * 40, 64, -(-MAX_LEN // 16), "cpu")
    for seed in (3, 4):  # the second step reuses the addresses the first wrote
        lists, token_ids, block_tables = make_step(seed, 16, torch.int64)
        got = build_flat_batch(StepDescription.from_lists(*lists), token_ids, block_tables, 16, out)
        for name in FIELDS:
            assert getattr(got, name).data_ptr() == getattr(out, name).data_ptr(), name
        assert_batch_equals(got, loop_batch(lists, token_ids, block_tables, 16))


def test_description_packs_into_one_int32_array():
    desc = StepDescription.from_lists([7, 2, 5], [10, 0, 3], [1, 4, 2], [1, 0, True], pin_memory=False)
    assert desc.packed.dtype == torch.int32 and desc.packed.is_contiguous()
    assert desc.packed.tolist() == [7, 2, 5, 10, 0, 3, 1, 4, 2, 1, 0, 1, 0, 1, 5, 7, 0, 6]
    assert desc.slots.tolist() == [7, 2, 5] and desc.num_computed.tolist() == [10, 0, 3]
    assert desc.num_new.tolist() == [1, 4, 2] and desc.sample.tolist() == [1, 0, 1]
    assert desc.cu_seqlens.tolist() == [0, 1, 5, 7] and desc.logits_rows.tolist() == [0, 6]
    assert (desc.num_tokens, desc.max_seqlen_q, desc.max_context_len) == (7, 4, 11)
    assert desc.slots.data_ptr() == desc.packed.data_ptr()  # views, not copies


@pytest.mark.parametrize("lists,message", [
    (([], [], [], []), "at least one sequence"),
    (([0, 1], [0], [1, 1], [1, 1]), "num_computed has 1 entries"),
    (([0, 1], [0, 0], [1, 0], [1, 1]), "num_new must be >= 1"),
    (([0, 1], [0, -1], [1, 1], [1, 1]), "must be >= 0"),
    (([0, 1], [0, 0], [1, 1], [1, 2]), "0/1 flags"),
    (([3, 3], [0, 0], [1, 1], [1, 1]), "once per step"),
])
def test_bad_descriptions_are_refused(lists, message):
    with pytest.raises(ValueError, match=message):
        StepDescription.from_lists(*lists)


@pytest.mark.parametrize("change,message", [
    (dict(slots=[MAX_SLOTS]), "out of range"),
    (dict(num_computed=[MAX_LEN]), "exceeds token_ids"),
    (dict(token_dtype=torch.int16), "int32 or int64"),
    (dict(table_dtype=torch.int64), "block_tables must be"),
    (dict(block_size=0), "positive int"),
    (dict(max_blocks=2), "needs 3 blocks"),
    (dict(buffer_tokens=4), "exceeds out buffers"),
    (dict(buffer_blocks=5), "blocks per row"),
    (dict(impl="cuda"), "needs CUDA tensors"),
    (dict(impl="triton"), "impl must be one of"),
])
def test_bad_inputs_are_refused_with_the_reason(change, message):
    setup = dict(slots=[1], num_computed=[40], token_dtype=torch.int64, table_dtype=torch.int32, block_size=16,
                 max_blocks=20, buffer_tokens=8, buffer_blocks=20, impl="auto")
    setup.update(change)
    max_blocks = setup["max_blocks"]
    token_ids = torch.zeros(MAX_SLOTS, MAX_LEN, dtype=setup["token_dtype"])
    block_tables = torch.zeros(MAX_SLOTS, max_blocks, dtype=setup["table_dtype"])
    desc = StepDescription.from_lists(setup["slots"], setup["num_computed"], [5], [1])
    out = FlatBatchBuffers.allocate(setup["buffer_tokens"], 4, setup["buffer_blocks"], "cpu")
    with pytest.raises(ValueError, match=message):
        build_flat_batch(desc, token_ids, block_tables, setup["block_size"], out, impl=setup["impl"])


# The kernel source on the CPU: blockIdx / threadIdx become globals the test sets before calling
# the kernel once per thread, in reverse order (the kernel must not depend on thread order).
CUDA_SHIM = """
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
struct Dim3 { unsigned x, y, z; };
static Dim3 blockIdx, threadIdx, blockDim;
extern "C" void set_thread(unsigned block, unsigned thread, unsigned block_dim) {
  blockIdx.x = block; threadIdx.x = thread; blockDim.x = block_dim;
}
"""


@pytest.fixture(scope="module")
def kernel_on_cpu(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("compiling the kernel source for the CPU needs g++")
    folder = tmp_path_factory.mktemp("batch_core_cpu")
    (folder / "shim.h").write_text(CUDA_SHIM)
    library = folder / "batch_core_cpu.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-O1", "-include", str(folder / "shim.h"), "-x", "c++",
                    str(batch_core.SOURCE), "-o", str(library)], check=True, capture_output=True, timeout=120)
    return ctypes.CDLL(str(library))


def run_on_cpu(library, desc, token_ids, block_tables, block_size):
    result = batch_core._allocate(desc, block_tables.shape[1], torch.device("cpu"))
    name, num_blocks, args = batch_core.launch_plan(desc, desc.packed, token_ids, block_tables, block_size, result)
    kernel = getattr(library, name)
    types = {np.int32: ctypes.c_int32, np.int64: ctypes.c_int64}
    c_args = [ctypes.c_void_p(arg.data_ptr()) if isinstance(arg, torch.Tensor) else types[type(arg)](int(arg))
              for arg in args]
    threads = batch_core.THREADS_PER_BLOCK
    for flat in reversed(range(num_blocks * threads)):
        library.set_thread(flat // threads, flat % threads, threads)
        kernel(*c_args)
    return result


@pytest.mark.parametrize("seed,block_size,token_dtype", CASES[::3])
def test_kernel_source_matches_the_torch_path_on_the_cpu(kernel_on_cpu, seed, block_size, token_dtype):
    lists, token_ids, block_tables = make_step(seed, block_size, token_dtype, num_seqs=[3, 17, 64][seed % 3])
    desc = StepDescription.from_lists(*lists)
    assert_same_batch(run_on_cpu(kernel_on_cpu, desc, token_ids, block_tables, block_size),
                      build_flat_batch(desc, token_ids, block_tables, block_size, impl="torch"))


def test_kernel_source_reads_strided_buffers_on_the_cpu(kernel_on_cpu):
    lists, token_ids, block_tables = make_step(21, 16, torch.int64, num_seqs=9)
    wide = torch.zeros(MAX_SLOTS, MAX_LEN * 2, dtype=torch.int64)
    wide[:, ::2] = token_ids  # a column stride of 2
    desc = StepDescription.from_lists(*lists)
    assert_same_batch(run_on_cpu(kernel_on_cpu, desc, wide[:, ::2], block_tables, 16),
                      build_flat_batch(desc, token_ids, block_tables, 16, impl="torch"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("seed,block_size,token_dtype", CASES)
@pytest.mark.parametrize("with_buffers", [False, True])
def test_cuda_kernel_matches_the_torch_path(seed, block_size, token_dtype, with_buffers):
    if batch_core.cuda_unavailable_reason() is not None:
        pytest.skip(f"the CUDA kernel cannot run here: {batch_core.cuda_unavailable_reason()}")
    lists, token_ids, block_tables = make_step(seed, block_size, token_dtype, device="cuda")
    out = FlatBatchBuffers.allocate(64 * 40, 64, block_tables.shape[1], "cuda") if with_buffers else None
    desc = StepDescription.from_lists(*lists)
    got = build_flat_batch(desc, token_ids, block_tables, block_size, out, impl="cuda")
    assert_same_batch(got, build_flat_batch(desc, token_ids, block_tables, block_size, impl="torch"))
    assert_batch_equals(got, loop_batch(lists, token_ids, block_tables, block_size))


@pytest.mark.gpu
@needs_cuda
def test_cuda_kernel_reads_strided_buffers():
    if batch_core.cuda_unavailable_reason() is not None:
        pytest.skip(f"the CUDA kernel cannot run here: {batch_core.cuda_unavailable_reason()}")
    lists, token_ids, block_tables = make_step(21, 16, torch.int32, num_seqs=9, device="cuda")
    wide = torch.zeros(MAX_SLOTS, MAX_LEN * 2, dtype=torch.int32, device="cuda")
    wide[:, ::2] = token_ids  # a column stride of 2
    desc = StepDescription.from_lists(*lists)
    assert_same_batch(build_flat_batch(desc, wide[:, ::2], block_tables, 16, impl="cuda"),
                      build_flat_batch(desc, token_ids, block_tables, 16, impl="torch"))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("impl", ["torch", "cuda"])
def test_cuda_paths_run_on_the_current_stream_without_a_host_sync(impl):
    if impl == "cuda" and batch_core.cuda_unavailable_reason() is not None:
        pytest.skip(f"the CUDA kernel cannot run here: {batch_core.cuda_unavailable_reason()}")
    lists, token_ids, block_tables = make_step(5, 16, torch.int64, num_seqs=64, device="cuda")
    out = FlatBatchBuffers.allocate(64 * 40, 64, block_tables.shape[1], "cuda")
    desc = StepDescription.from_lists(*lists)
    build_flat_batch(desc, token_ids, block_tables, 16, out, impl=impl)  # compile and warm up first
    stream = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
        try:
            got = build_flat_batch(desc, token_ids, block_tables, 16, out, impl=impl)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    stream.synchronize()
    assert_batch_equals(got, loop_batch(lists, token_ids, block_tables, 16))


@pytest.mark.gpu
@needs_cuda
def test_auto_takes_the_kernel_on_cuda_where_it_loads(monkeypatch):
    called = []
    monkeypatch.setattr(batch_core, "_build_cuda", lambda *args: called.append(True))
    lists, token_ids, block_tables = make_step(2, 16, torch.int64, num_seqs=4, device="cuda")
    build_flat_batch(StepDescription.from_lists(*lists), token_ids, block_tables, 16)
    assert called == ([True] if batch_core.cuda_unavailable_reason() is None else [])
