"""Tensor parallelism across the devices of one machine: one process per rank.

Rank 0 is the engine's own process: it runs the scheduler, the sampler and everything else, and its
model is a `TensorParallelModel`, which before each forward sends the step's inputs to the other
ranks (tp_comm.py) and then runs rank 0's shard. Ranks 1..T-1 are processes spawned here (device
cuda:k+r for an engine on cuda:k; all on the CPU for an engine there, over gloo); each loads its
shard (models/tensor_parallel.py) and its own KV cache, with the same number of blocks as rank 0's
and only its kv heads, so the block tables rank 0's scheduler writes hold on every rank. Then it
loops: wait for a step header on its pipe, receive the tensors, run the forward, whose collectives
meet rank 0's, and wait again. `kv_cache_memory_bytes` is a budget per rank (per device).

Every way out ends the other ranks, none hangs:
- close(), the model being garbage collected, or the interpreter exiting: each rank is sent "stop",
  and what has not exited a few seconds later is killed;
- rank 0 dying closes the pipes: a rank waiting for a step reads EOF and exits; one inside a
  collective fails on the closed connection (gloo) or at the group's timeout, and exits;
- a rank raising sends its traceback and exits; a rank dying closes its connections: rank 0's next
  collective fails at once on gloo, or at the timeout on NCCL (where the watchdog may end the
  process itself); rank 0 then raises a RuntimeError naming the rank and what it said, and ends
  the others. The engine loop reports that as the step's failure. A hung rank fails rank 0's
  collective after `timeout_s`.
CUDA graphs are not captured under tensor parallelism: a replay would issue the collectives without
the other ranks' side.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import traceback
import weakref
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from kernels.ops import AttentionMetadata, StepHost, get_ops
from services.worker.engine.config import EngineConfig
from services.worker.engine.kv_cache import allocate_kv_tensors
from services.worker.engine.tp_comm import Communicator, StepHeader, receive_step, send_step
from services.worker.models.hf_config import ModelConfig
from services.worker.models.llama import KVCache, load_model
from services.worker.models.tensor_parallel import ShardPlan, TensorParallelShard
from services.worker.models.weight_dtypes import ResolvedDtypes

COLLECTIVE_TIMEOUT_S = 60.0  # a collective waits this long for the slowest rank
START_TIMEOUT_S = 600.0  # spawning and loading every rank's shard
_STOP_GRACE_S = 5.0
_HOST = "127.0.0.1"
_REPO_ROOT = Path(__file__).resolve().parents[3]  # where `services` imports from, for the ranks' interpreters


@dataclass(frozen=True, slots=True)
class RankLaunch:
    """What a spawned rank needs to build its shard and join the group (pickled to it)."""

    rank: int
    world_size: int
    store_port: int
    model_dir: str
    device: str
    backend: str
    compute_dtype: torch.dtype
    weight_dtype: str
    kv_cache_dtype: torch.dtype
    max_positions: int
    num_blocks: int
    block_size: int
    num_threads: int
    timeout_s: float


class RankGroup:
    """Rank 0's handle on ranks 1..T-1: their processes and pipes, and the group's collectives."""

    def __init__(self, launches: list[RankLaunch], store: dist.Store, device: torch.device, timeout_s: float):
        self.store = store  # rank 0 serves it; it lives as long as the group
        self.processes: list[subprocess.Popen] = []
        self.pipes: list[Connection] = []
        self._finalizer = weakref.finalize(self, _stop_ranks, self.processes, self.pipes)
        try:
            for launch in launches:
                process, pipe = _spawn_rank(launch)
                self.processes.append(process)
                self.pipes.append(pipe)
            for rank in range(1, len(launches) + 1):
                self._expect(rank, "joining", START_TIMEOUT_S)
            self.comm = Communicator(store, 0, len(launches) + 1, device, timeout_s)
        except BaseException:
            self.close()
            raise

    def wait_ready(self) -> None:
        for rank in range(1, len(self.processes) + 1):
            self._expect(rank, "ready", START_TIMEOUT_S)

    def send_header(self, header: StepHeader) -> None:
        for rank, pipe in enumerate(self.pipes, start=1):
            try:
                pipe.send(("step", header))
            except OSError as error:  # a closed pipe: the rank is gone
                raise RuntimeError(f"tensor-parallel rank {rank} is gone ({error})") from error

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Stops every rank (idempotent)."""
        self._finalizer()

    def failure(self, error: BaseException) -> RuntimeError:
        """After a failed step: the error naming the rank that failed and what it said; ends the group."""
        reasons = []
        for rank, (process, pipe) in enumerate(zip(self.processes, self.pipes), start=1):
            message = _poll(pipe, 1.0)  # a rank that raised sends its traceback before it exits
            if message is not None and message[0] == "error":
                reasons.append(f"rank {rank} failed:\n{message[1]}")
            elif _exited(process, 0.5):
                reasons.append(f"rank {rank} exited with code {process.returncode}")
        # No polite wait: a rank still inside a collective never reads "stop".
        self._finalizer.detach()
        _stop_ranks(self.processes, self.pipes, grace_s=0.5)
        detail = "; ".join(reasons) or (
            f"{type(error).__name__}: {error} (every rank was still running: one did not answer within the "
            "collective timeout, or the error was rank 0's own)")
        return RuntimeError(f"tensor-parallel step failed: {detail}")

    def _expect(self, rank: int, word: str, timeout_s: float) -> None:
        process, pipe = self.processes[rank - 1], self.pipes[rank - 1]
        deadline_s = time.monotonic() + timeout_s
        while time.monotonic() < deadline_s:
            message = _poll(pipe, 0.2)
            if message is None and process.poll() is None:
                continue
            if message is not None and message[0] == word:
                return
            if message is not None and message[0] == "error":
                raise RuntimeError(f"tensor-parallel rank {rank} failed to start:\n{message[1]}")
            _exited(process, 1.0)
            raise RuntimeError(f"tensor-parallel rank {rank} exited with code {process.returncode} while starting")
        raise RuntimeError(f"tensor-parallel rank {rank} did not report {word!r} within {timeout_s:.0f} s")


def _spawn_rank(launch: RankLaunch) -> tuple[subprocess.Popen, Connection]:
    """Starts a fresh interpreter for one rank (never a fork of this process, which may hold CUDA
    and threads; nor multiprocessing's spawn, which would re-import our __main__ in every rank),
    connected by a socket pair: the rank holds only its end, so EOF on either side means the other is gone."""
    ours, theirs = socket.socketpair()
    pipe = Connection(ours.detach())
    fd = theirs.detach()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", f"from {__name__} import rank_main; rank_main({fd})"],
            pass_fds=(fd,), env=env, stdin=subprocess.DEVNULL,
        )
    finally:
        os.close(fd)
    pipe.send(launch)
    return process, pipe


class TensorParallelModel(nn.Module):
    """Rank 0's model: called like LlamaForCausalLM, it first sends the step to the other ranks.
    Its weights (`shard`) are rank 0's share only."""

    def __init__(self, shard: nn.Module, group: RankGroup):
        super().__init__()
        self.shard = shard
        self.group = group
        self.config = shard.config  # the per-rank config: heads and MLP columns of one rank
        # The runner plans each step through model.ops.plan_step; the recorder keeps what it planned
        # from, which the other ranks need to plan the same step.
        self._plans = _PlanRecorder(shard.ops.plan_step)
        self.ops = dataclasses.replace(shard.ops, plan_step=self._plans.plan_step)
        self.prompt_rows = None  # int8 layers' row split: quantized weights are refused under TP

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[KVCache],
                metadata: AttentionMetadata, logits_indices: torch.Tensor) -> torch.Tensor:
        if self.group.closed:
            raise RuntimeError("tensor-parallel group is closed (a rank failed or the engine was closed)")
        try:
            host, self._plans.host = self._plans.host, None
            send_step(self.group.comm, input_ids, positions, metadata, logits_indices, host, self.group.send_header)
            return self.shard(input_ids, positions, kv_caches, metadata, logits_indices)
        except Exception as error:
            raise self.group.failure(error) from error

    def close(self) -> None:
        self.group.close()


class _PlanRecorder:
    """Wraps a backend's plan_step, keeping the StepHost of the latest call."""

    def __init__(self, plan_step):
        self._plan_step = plan_step
        self.host: StepHost | None = None

    def plan_step(self, metadata: AttentionMetadata, host: StepHost, positions: torch.Tensor,
                  k_cache: torch.Tensor) -> None:
        self.host = host
        self._plan_step(metadata, host, positions, k_cache)


def start_tensor_parallel(config: EngineConfig, model_config: ModelConfig, dtypes: ResolvedDtypes,
                          num_blocks: int, max_positions: int) -> tuple[TensorParallelModel, list[KVCache]]:
    """Spawns ranks 1..T-1, builds rank 0's shard and KV cache here; returns once every rank is ready."""
    world_size = config.tensor_parallel_size
    devices = rank_devices(config.device, world_size)
    ShardPlan.for_model(model_config, 0, world_size)  # refuses head counts that do not split, before spawning
    store = dist.TCPStore(_HOST, 0, world_size, True, timeout=timedelta(seconds=START_TIMEOUT_S),
                          wait_for_workers=False)
    launches = [
        RankLaunch(rank, world_size, store.port, config.model_dir, str(devices[rank]), config.backend,
                   dtypes.compute_dtype, dtypes.weight_dtype, dtypes.kv_cache_dtype, max_positions, num_blocks,
                   config.cache.block_size, max(1, torch.get_num_threads() // world_size), COLLECTIVE_TIMEOUT_S)
        for rank in range(1, world_size)
    ]
    group = RankGroup(launches, store, devices[0], COLLECTIVE_TIMEOUT_S)
    try:
        plan = ShardPlan.for_model(model_config, 0, world_size)
        shard = load_model(config.model_dir, dtype=dtypes.compute_dtype, device=config.device,
                           ops=get_ops(config.backend), max_positions=max_positions,
                           weight_dtype=dtypes.weight_dtype, shard=TensorParallelShard(plan, group.comm))
        kv_caches = allocate_kv_tensors(model_config.num_layers, num_blocks, config.cache.block_size,
                                        plan.num_kv_heads, model_config.head_dim, dtypes.kv_cache_dtype, config.device)
        group.wait_ready()
    except BaseException:
        group.close()
        raise
    return TensorParallelModel(shard, group), kv_caches


def rank_devices(device: str, world_size: int) -> list[torch.device]:
    """Rank r's device: the engine's CPU for every rank, or cuda:k+r for an engine on cuda:k."""
    base = torch.device(device)
    if base.type == "cpu":
        return [base] * world_size
    if base.type != "cuda":
        raise ValueError(f"tensor parallelism runs on cpu or cuda devices, not {device!r}")
    first = base.index or 0
    available = torch.cuda.device_count()
    if first + world_size > available:
        raise ValueError(f"tensor_parallel_size {world_size} on {device!r} needs CUDA devices "
                         f"{first}..{first + world_size - 1}; this machine has {available}")
    return [torch.device("cuda", first + rank) for rank in range(world_size)]


def rank_main(fd: int) -> None:
    """A rank's process: read its RankLaunch from the socket rank 0 passed, join the group, load the
    shard, then run each step rank 0 announces."""
    pipe = Connection(fd)
    try:
        launch: RankLaunch = pipe.recv()
    except EOFError:
        return
    try:
        torch.set_num_threads(launch.num_threads)
        device = torch.device(launch.device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        store = dist.TCPStore(_HOST, launch.store_port, launch.world_size, False,
                              timeout=timedelta(seconds=START_TIMEOUT_S))
        pipe.send(("joining",))
        comm = Communicator(store, launch.rank, launch.world_size, device, launch.timeout_s)
        config = ModelConfig.from_dir(launch.model_dir)
        plan = ShardPlan.for_model(config, launch.rank, launch.world_size)
        model = load_model(launch.model_dir, dtype=launch.compute_dtype, device=device, ops=get_ops(launch.backend),
                           max_positions=launch.max_positions, weight_dtype=launch.weight_dtype,
                           shard=TensorParallelShard(plan, comm))
        kv_caches = allocate_kv_tensors(config.num_layers, launch.num_blocks, launch.block_size, plan.num_kv_heads,
                                        config.head_dim, launch.kv_cache_dtype, device)
        pipe.send(("ready",))
        with torch.inference_mode():
            while True:
                message = pipe.recv()  # EOFError when rank 0 is gone
                if message[0] == "stop":
                    return
                header = message[1]
                input_ids, positions, metadata, logits_indices = receive_step(comm, header, device)
                if header.host is not None:
                    model.ops.plan_step(metadata, header.host, positions, kv_caches[0][0])
                model(input_ids, positions, kv_caches, metadata, logits_indices)
    except (EOFError, BrokenPipeError):
        return  # rank 0 is gone: nobody to report to
    except BaseException:
        try:
            pipe.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise


def _stop_ranks(processes: list[subprocess.Popen], pipes: list[Connection], grace_s: float = _STOP_GRACE_S) -> None:
    for pipe in pipes:
        try:
            pipe.send(("stop",))
        except OSError:
            pass
    for process in processes:
        if not _exited(process, grace_s):  # hung, or stopped: SIGKILL reaches both; a rank keeps nothing
            process.kill()
            process.wait()
    for pipe in pipes:
        pipe.close()


def _poll(pipe, timeout_s: float):
    try:
        return pipe.recv() if pipe.poll(timeout_s) else None
    except (EOFError, OSError):
        return None


def _exited(process: subprocess.Popen, timeout_s: float) -> bool:
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return False
    return True
