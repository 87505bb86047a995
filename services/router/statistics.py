"""Triton ModelStatistics across replicas: ask each worker, add the numbers up per version."""

from __future__ import annotations

import grpc

from protos.inference import grpc_service_pb2 as pb
from services.common.telemetry import get_logger
from services.router.pool import Backend

log = get_logger(__name__)

_METHOD = "/inference.GRPCInferenceService/ModelStatistics"
_DURATIONS = (
    "success", "fail", "queue", "compute_input", "compute_infer", "compute_output", "cache_hit", "cache_miss",
)


async def fetch(backend: Backend, request: pb.ModelStatisticsRequest, timeout_s: float | None):
    """One worker's statistics, or None if it could not answer (it is left out of the sum)."""
    try:
        reply = await backend.unary(_METHOD)(request.SerializeToString(), timeout=min(timeout_s or 5, 5))
    except grpc.aio.AioRpcError as error:
        log.warning("statistics_unavailable", worker=backend.instance.instance_id, code=error.code().name)
        return None
    return pb.ModelStatisticsResponse.FromString(reply)


def merge(stats: list[pb.ModelStatistics]) -> list[pb.ModelStatistics]:
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    for item in stats:
        key = (item.name, item.version)
        total = merged.get(key)
        if total is None:
            merged[key] = total = pb.ModelStatistics(name=item.name, version=item.version)
        total.last_inference = max(total.last_inference, item.last_inference)
        total.inference_count += item.inference_count
        total.execution_count += item.execution_count
        for name in _DURATIONS:
            _add(getattr(total.inference_stats, name), getattr(item.inference_stats, name))
        by_size = {b.batch_size: b for b in total.batch_stats}
        for batch in item.batch_stats:
            into = by_size.get(batch.batch_size)
            if into is None:
                into = total.batch_stats.add(batch_size=batch.batch_size)
                by_size[batch.batch_size] = into
            for name in ("compute_input", "compute_infer", "compute_output"):
                _add(getattr(into, name), getattr(batch, name))
    for total in merged.values():
        total.batch_stats.sort(key=lambda b: b.batch_size)
    return [merged[k] for k in sorted(merged)]


def _add(into: pb.StatisticDuration, other: pb.StatisticDuration) -> None:
    into.count += other.count
    into.ns += other.ns
