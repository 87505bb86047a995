"""Tensor parallelism (services/worker/engine/tp_runner.py): an engine split over two ranks on gloo
(two processes on loopback) gives the same greedy tokens as the unsplit engine under continuous
batching, and its ranks never outlive it, however it ends.

Both engines run prompts of mixed lengths arriving at staggered steps into a KV pool too small for
all of them with a token budget below most prompts, so steps mix prefill chunks and decodes and
sequences are preempted and recomputed (asserted through the scheduler's counters).
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from services.common.errors import InvalidArgument
from services.worker.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from services.worker.engine import tp_runner
from services.worker.engine.engine import LLMEngine
from services.worker.engine.sampler import SamplingParams
from tests.engine.checkpoints import save_checkpoint

NUM_PROMPTS = 10
# About two bf16 steps at the logits' magnitude (measured: at most 0.047 between one and two ranks).
BF16_LOGPROB_TOLERANCE = 0.1
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory) -> Path:
    """4 q heads over 2 kv heads (one kv head per rank), with biases on the row-parallel layers."""
    directory = tmp_path_factory.mktemp("llama-gqa")
    model = save_checkpoint(directory, "llama", seed=5, attention_bias=True, mlp_bias=True)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():  # transformers initialises biases to zero, which would hide a bias added twice
        for name, parameter in model.named_parameters():
            if name.endswith(".bias"):
                parameter.normal_(0.0, 0.1, generator=generator)
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def mqa_checkpoint(tmp_path_factory) -> Path:
    """One kv head for two ranks (replicated), a tied head, and a vocabulary 2 does not divide."""
    directory = tmp_path_factory.mktemp("llama-mqa")
    save_checkpoint(directory, "llama", seed=7, num_key_value_heads=1, tie_word_embeddings=True, vocab_size=251)
    return directory


@pytest.fixture(autouse=True)
def no_rank_outlives_its_test():
    yield
    gc.collect()  # an engine a test dropped closes its ranks when collected
    assert _live_ranks() == []


def make_engine(directory: Path, tensor_parallel_size: int, dtype: str = "float32") -> LLMEngine:
    return LLMEngine(EngineConfig(
        model_dir=str(directory), backend="torch", dtype=dtype, max_model_len=96,
        tensor_parallel_size=tensor_parallel_size,
        cache=CacheConfig(block_size=4, num_blocks=24, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_seqs=6, max_num_batched_tokens=16),
    ))


def make_prompts(seed: int, vocab_size: int = 256) -> tuple[list[list[int]], list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 30, (NUM_PROMPTS,), generator=generator).tolist()
    prompts = [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]
    return prompts, [6 + (i * 5) % 11 for i in range(NUM_PROMPTS)]


def run_staggered(engine: LLMEngine, prompts: list[list[int]], max_tokens: list[int]) -> dict[str, list[int]]:
    """Adds two requests per step (four at the start) and steps until everything finishes."""
    tokens: dict[str, list[int]] = {}
    pending = list(enumerate(prompts))
    step = 0
    while pending or engine.has_unfinished():
        for _ in range(4 if step == 0 else 2):
            if pending:
                i, prompt = pending.pop(0)
                engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens[i],
                                                                   ignore_eos=True))
                tokens[f"r{i}"] = []
        for output in engine.step():
            tokens[output.request_id] += output.new_token_ids
        step += 1
        assert step < 1000
    return tokens


def greedy_tokens(directory: Path, tensor_parallel_size: int, prompts, max_tokens, dtype: str = "float32"):
    engine = make_engine(directory, tensor_parallel_size, dtype)
    try:
        tokens = run_staggered(engine, prompts, max_tokens)
        stats = engine.stats()
        assert stats.num_chunked_prefills > 0 and stats.num_preemptions > 0
        return tokens
    finally:
        _close(engine)


def test_two_ranks_give_the_greedy_tokens_of_one(gqa_checkpoint):
    prompts, max_tokens = make_prompts(seed=11)
    assert greedy_tokens(gqa_checkpoint, 2, prompts, max_tokens) == greedy_tokens(gqa_checkpoint, 1, prompts, max_tokens)


def test_replicated_kv_head_and_split_tied_head_give_the_greedy_tokens_of_one_rank(mqa_checkpoint):
    prompts, max_tokens = make_prompts(seed=12, vocab_size=251)
    assert greedy_tokens(mqa_checkpoint, 2, prompts, max_tokens) == greedy_tokens(mqa_checkpoint, 1, prompts, max_tokens)


def test_bfloat16_two_ranks_differ_from_one_by_rounding_only(gqa_checkpoint):
    """In bfloat16 each rank's partial sums are rounded before the all-reduce adds them, so logits
    move by about one bf16 step: every step's logprob agrees within that, and a request's greedy
    tokens may part only where the unsplit engine's two best tokens were that close (a near tie)."""
    prompts, max_tokens = make_prompts(seed=13)
    one = greedy_logprobs(gqa_checkpoint, 1, prompts, max_tokens)
    two = greedy_logprobs(gqa_checkpoint, 2, prompts, max_tokens)
    num_compared = 0
    for request_id, steps in one.items():
        for (token, logprob, top), (other_token, other_logprob, _) in zip(steps, two[request_id]):
            assert abs(logprob - other_logprob) < BF16_LOGPROB_TOLERANCE, request_id
            num_compared += 1
            if token != other_token:
                assert abs(dict(top).get(other_token, -1e9) - logprob) < BF16_LOGPROB_TOLERANCE, request_id
                break
    assert num_compared > sum(max_tokens) // 2


def greedy_logprobs(directory: Path, tensor_parallel_size: int, prompts, max_tokens):
    """Per request, each step's (token, its logprob, the top two (token, logprob)), in bfloat16."""
    engine = make_engine(directory, tensor_parallel_size, "bfloat16")
    steps: dict[str, list] = {f"r{i}": [] for i in range(len(prompts))}
    try:
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens[i],
                                                               ignore_eos=True, logprobs=2))
        while engine.has_unfinished():
            for output in engine.step():
                for token, logprobs in zip(output.new_token_ids, output.logprobs or ()):
                    steps[output.request_id].append((token, logprobs.logprob, logprobs.top))
        return steps
    finally:
        _close(engine)


def test_each_rank_holds_its_share_of_the_weights_and_cache(gqa_checkpoint):
    engine = make_engine(gqa_checkpoint, 2)
    try:
        whole = make_engine(gqa_checkpoint, 1)
        (k_cache, _), (k_whole, _) = engine.runner.kv_caches[0], whole.runner.kv_caches[0]
        assert k_cache.shape[2] == 1 and k_whole.shape[2] == 2  # kv heads: one of two per rank
        assert k_cache.shape[0] == k_whole.shape[0]  # the same blocks on every rank
        assert len(_live_ranks()) == 1
    finally:
        _close(engine)


def test_a_rank_that_dies_fails_the_step_naming_it(gqa_checkpoint):
    engine = make_engine(gqa_checkpoint, 2)
    (rank,) = _live_ranks()
    engine.add_request("r0", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4))
    engine.step()
    os.kill(rank, signal.SIGKILL)
    started_s = time.monotonic()
    with pytest.raises(RuntimeError, match="rank 1 exited with code -9"):
        while engine.has_unfinished():
            engine.step()
    assert time.monotonic() - started_s < 30  # failed at once, not at a timeout
    with pytest.raises(RuntimeError, match="closed"):  # and stays failed
        engine.step()


def test_a_rank_that_hangs_fails_the_step_at_the_collective_timeout(gqa_checkpoint, monkeypatch):
    monkeypatch.setattr(tp_runner, "COLLECTIVE_TIMEOUT_S", 5.0)
    engine = make_engine(gqa_checkpoint, 2)
    (rank,) = _live_ranks()
    engine.add_request("r0", [5, 6, 7], SamplingParams(temperature=0.0, max_tokens=4))
    engine.step()
    os.kill(rank, signal.SIGSTOP)
    started_s = time.monotonic()
    with pytest.raises(RuntimeError, match="tensor-parallel step failed"):
        while engine.has_unfinished():
            engine.step()
    assert time.monotonic() - started_s < 30


def test_ranks_exit_when_the_engine_is_dropped(gqa_checkpoint):
    engine = make_engine(gqa_checkpoint, 2)
    assert len(_live_ranks()) == 1
    del engine
    gc.collect()
    assert _live_ranks() == []


def test_ranks_exit_when_rank_zero_is_killed(gqa_checkpoint):
    script = textwrap.dedent(f"""
        import time
        from tests.engine.test_tensor_parallel import _live_ranks, make_engine
        engine = make_engine({str(gqa_checkpoint)!r}, 2)
        print(*_live_ranks(), flush=True)
        time.sleep(600)
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, cwd=REPO_ROOT, env=env,
                          text=True) as rank_zero:
        try:
            pids = [int(pid) for pid in rank_zero.stdout.readline().split()]
        finally:
            rank_zero.kill()
    assert len(pids) == 1
    deadline_s = time.monotonic() + 30
    while _pid_alive(pids[0]) and time.monotonic() < deadline_s:
        time.sleep(0.1)
    assert not _pid_alive(pids[0]), "rank 1 outlived rank 0"


def test_refuses_quantized_weights_and_heads_that_do_not_split(gqa_checkpoint):
    with pytest.raises(ValueError, match="weight_dtype 'int8'"):
        EngineConfig(model_dir=str(gqa_checkpoint), weight_dtype="int8", tensor_parallel_size=2)
    with pytest.raises(InvalidArgument, match="tensor_parallel_size 3 must divide config.json num_attention_heads 4"):
        make_engine(gqa_checkpoint, 3)
    if torch.cuda.device_count() < 2:
        with pytest.raises(ValueError, match="needs CUDA devices 0..1"):
            LLMEngine(EngineConfig(model_dir=str(gqa_checkpoint), device="cuda", tensor_parallel_size=2))


def test_the_worker_flag_or_the_version_config_sets_the_tensor_parallel_size():
    from services.cli import _flags, _parser
    from services.common.config import WorkerConfig, build_config
    from services.worker.engine_settings import engine_config_for
    from services.worker.model_files import FetchedVersion

    version = FetchedVersion("llm", 3, "generation", {"tensor_parallel_size": 4}, Path("/models/llm/3"))
    args = _parser().parse_args(["worker", "--model-name", "llm", "--tensor-parallel-size", "2"])
    assert engine_config_for(version, build_config(WorkerConfig, _flags(args))).tensor_parallel_size == 2
    assert engine_config_for(version, WorkerConfig(model_name="llm")).tensor_parallel_size == 4
    unsplit = FetchedVersion("llm", 3, "generation", {}, Path("/models/llm/3"))
    assert engine_config_for(unsplit, WorkerConfig(model_name="llm")).tensor_parallel_size == 1


def _close(engine: LLMEngine) -> None:
    close = getattr(engine.runner.model, "close", None)
    if close is not None:
        close()


def _live_ranks() -> list[int]:
    """Pids of this process's tensor-parallel ranks that have not exited (Linux: read from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            state, parent_pid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(parent_pid) == os.getpid() and state != "Z" and b"tp_runner import rank_main" in cmdline:
            pids.append(int(entry.name))
    return pids


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) is gone for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False
