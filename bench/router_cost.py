"""What the router's hop costs: small requests forwarded through it against the same requests sent
straight to the worker, in one run.

`ModelMetadata` for a model is a small request forwarded as bytes (the worker answers it without
touching its model), so the difference between the two targets is the router: its gRPC server and
client hops, parsing, admission and the routing policy. Measured: p50 latency at one client in
flight, requests per second at many, and the router's own CPU time per forwarded request (from
/proc), whence "forwarded requests per router core" — a figure the shared cores do not distort.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc

from bench.loadgen import closed_loop

METHOD = "/inference.GRPCInferenceService/ModelMetadata"


def metadata_request(model_name: str) -> bytes:
    """inference.ModelMetadataRequest{name = model_name}, serialized by hand: this process does not
    load the inference protos (a client process never should load them beside tritonclient)."""
    name = model_name.encode()
    return b"\x0a" + bytes([len(name)]) + name


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(address: str, request: bytes, concurrency: int, duration_s: float, target: str,
                  pid: int | None = None) -> dict:
    """A closed loop after a warm-up; with `pid`, that process's CPU time over the measured loop."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(METHOD)
        await closed_loop(lambda _: call(request, timeout=10), concurrency, 1.0, warmup_s=0.0)
        cpu_before_s = cpu_seconds(pid) if pid else 0.0
        result = await closed_loop(lambda _: call(request, timeout=10), concurrency, duration_s, warmup_s=0.0)
        cpu_s = cpu_seconds(pid) - cpu_before_s if pid else None
    return {"target": target, **result.summary(), "process_cpu_s": cpu_s}


async def router_cost(router: str, worker: str, router_pid: int, model_name: str,
                      concurrencies=(1, 32), duration_s: float = 5.0) -> dict:
    """Router and direct points alternating per concurrency, and the router's CPU per request."""
    request = metadata_request(model_name)
    points: list[dict] = []
    router_cpu_s = 0.0
    num_routed = 0
    for concurrency in concurrencies:
        points.append(await measure(worker, request, concurrency, duration_s, "direct"))
        point = await measure(router, request, concurrency, duration_s, "router", pid=router_pid)
        router_cpu_s += point["process_cpu_s"]
        num_routed += point["num_requests"]
        points.append(point)
    by = {(p["target"], p["concurrency"]): p for p in points}
    low, high = min(concurrencies), max(concurrencies)
    return {
        "points": points,
        "added_p50_ms_at_1": by[("router", low)]["p50_ms"] - by[("direct", low)]["p50_ms"],
        "router_over_direct_throughput": by[("router", high)]["requests_per_s"] / by[("direct", high)]["requests_per_s"],
        "router_cpu_ms_per_request": 1000 * router_cpu_s / num_routed,
        "forwarded_per_router_core_s": num_routed / router_cpu_s if router_cpu_s else None,
    }
