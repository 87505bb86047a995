"""Live signals per deployment: every ready worker's WorkerStats (WorkerControl.GetStats), summed.

Workers are the ones discovery lists for the deployment's (model, version) — a draining worker has
deregistered already, so it is not counted. Each is asked concurrently with a short deadline; one
that does not answer is left out of this reading (a stopped or overloaded process, whose load the
others' figures and the next reading will show). Requests finished between two readings come from
each worker's ok + failed counters (a worker seen for the first time, or restarted, is a baseline).

Held requests (scale from zero): the routers' counts in the discovery KV
(services/common/scaling_keys.py), summed over the fresh ones by `held_reader`.

TTFT: the policy compares the workers' own estimate of the wait before a new request's first token
(`estimated_queue_wait_s`, admission control's figure) with the SLO. No observed TTFT percentile
is read yet (it would need the workers' TTFT histograms over a window, as the rollback guard keeps
the routers' counters); `DeploymentSignals.ttft_p99_s` is where it would go.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import grpc

from protos.tensoryard.v1 import worker_pb2, worker_pb2_grpc
from services.autoscale.policy import DeploymentSignals
from services.common.scaling_keys import held_prefix, sum_fresh_held

STATS_TIMEOUT_S = 1.0
SERVING = "SERVING"


@dataclass(frozen=True, slots=True)
class WorkerEndpoint:
    worker_id: str
    address: str
    model_name: str
    model_version: str


def aggregate(stats: Iterable[worker_pb2.WorkerStats], num_requests_done: int = 0,
              num_requests_held: int = 0) -> DeploymentSignals:
    """Totals over the serving replicas' stats (the others take no requests: not capacity)."""
    serving = [s for s in stats if s.state == SERVING]
    return DeploymentSignals(
        num_ready=len(serving),
        num_in_flight=sum(s.num_in_flight for s in serving),
        # An LLM reports its waiting sequences; an embedding model its batcher queue.
        num_waiting=sum(s.num_waiting or s.queue_depth for s in serving),
        num_queued_prompt_tokens=sum(s.num_queued_prompt_tokens for s in serving),
        num_kv_blocks_used=sum(s.num_kv_blocks_used for s in serving),
        num_kv_blocks_total=sum(s.num_kv_blocks_total for s in serving),
        num_seats=sum(s.max_num_seqs for s in serving),
        queue_wait_s=sum(s.estimated_queue_wait_s for s in serving) / len(serving) if serving else 0.0,
        max_replica_kv_fraction=max((s.num_kv_blocks_used / s.num_kv_blocks_total
                                     for s in serving if s.num_kv_blocks_total), default=0.0),
        max_replica_waiting=max((s.num_waiting or s.queue_depth for s in serving), default=0),
        num_requests_done=num_requests_done,
        num_requests_held=num_requests_held,
    )


class SignalReader:
    """Reads one deployment's signals at a time; remembers each worker's request counters."""

    def __init__(self, list_workers: Callable[[str, int], list[WorkerEndpoint]],
                 channel_for: Callable[[str], grpc.aio.Channel] | None = None,
                 timeout_s: float = STATS_TIMEOUT_S,
                 held: Callable[[str, int], Awaitable[int]] | None = None):
        self._list_workers = list_workers
        self._held = held  # requests routers hold for the deployment (held_reader)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._channel_for = channel_for or grpc.aio.insecure_channel
        self._timeout_s = timeout_s
        self._counters: dict[str, int] = {}  # worker_id -> ok + failed at the last reading
        self._listed: set[str] = set()  # addresses listed in this round, over every deployment
        self._seen: set[str] = set()  # worker ids that answered in this round

    async def read(self, model_name: str, version: int) -> DeploymentSignals:
        workers = self._list_workers(model_name, version)
        replies = await asyncio.gather(*(self._stats(w) for w in workers))
        stats = [s for s in replies if s is not None]
        done = 0
        for s in stats:
            total = s.num_requests_ok + s.num_requests_failed
            previous = self._counters.get(s.worker_id)
            if previous is not None and total >= previous:
                done += total - previous
            self._counters[s.worker_id] = total
            self._seen.add(s.worker_id)
        self._listed.update(w.address for w in workers)
        return aggregate(stats, num_requests_done=done, num_requests_held=await self.num_held(model_name, version))

    async def num_held(self, model_name: str, version: int) -> int:
        """Requests routers hold for the deployment (0 when none, or when the KV cannot be read)."""
        if self._held is None:
            return 0
        try:
            return await self._held(model_name, version)
        except Exception:  # noqa: BLE001 - the KV is away: scale on the workers' signals alone
            return 0

    async def _stats(self, worker: WorkerEndpoint) -> worker_pb2.WorkerStats | None:
        channel = self._channels.get(worker.address)
        if channel is None:
            channel = self._channels[worker.address] = self._channel_for(worker.address)
        try:
            return await worker_pb2_grpc.WorkerControlStub(channel).GetStats(
                worker_pb2.GetStatsRequest(), timeout=self._timeout_s)
        except grpc.aio.AioRpcError:
            return None

    async def end_round(self) -> None:
        """After reading every deployment: close the channels of workers no deployment listed and
        forget the counters of workers that did not answer (a worker back later is a new baseline)."""
        for address in [a for a in self._channels if a not in self._listed]:
            await self._channels.pop(address).close()
        self._counters = {k: v for k, v in self._counters.items() if k in self._seen}
        self._listed, self._seen = set(), set()

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()


def held_reader(fleet) -> Callable[[str, int], Awaitable[int]]:
    """The requests routers hold for a (model, version), from the fleet's KV."""

    async def held(model_name: str, version: int) -> int:
        entries = await fleet.kv_list(held_prefix(model_name, version))
        return sum_fresh_held(value for _, value in entries)

    return held


def catalog_workers(catalog) -> Callable[[str, int], list[WorkerEndpoint]]:
    """Workers of a (model, version) in discovery: the embedded catalog or a registry fleet view
    (services/registry/fleet.py); both list instances by service and model."""

    def list_workers(model_name: str, version: int) -> list[WorkerEndpoint]:
        return [WorkerEndpoint(i.instance_id, i.address, i.model_name, i.model_version)
                for i in catalog.list("worker", model_name) if i.model_version == str(version)]

    return list_workers
