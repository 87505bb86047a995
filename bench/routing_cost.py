"""The router's forwarding rate with the load spread over several client connections, so that router
processes sharing one port (SO_REUSEPORT: the kernel hands each new connection to one of them) all
get traffic. The request is bench/router_cost.py's: ModelMetadata, forwarded as bytes.

Each channel is its own connection (a local subchannel pool: gRPC would otherwise share one
connection between channels to the same address). Reported: requests/s over the loop, and the CPU
time of each router process over it (from /proc), whence forwarded requests per router core.
"""

from __future__ import annotations

import grpc

from bench.loadgen import closed_loop
from bench.router_cost import METHOD, cpu_seconds, metadata_request

WARMUP_S = 1.0


async def spread_throughput(address: str, model_name: str, pids: list[int], concurrency: int = 32,
                            num_channels: int = 16, duration_s: float = 5.0) -> dict:
    request = metadata_request(model_name)
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(num_channels)]
    try:
        calls = [channel.unary_unary(METHOD) for channel in channels]

        def send(i: int):  # task t always uses channel t % num_channels
            return calls[i % num_channels](request, timeout=10)

        await closed_loop(send, concurrency, WARMUP_S, warmup_s=0.0)
        cpu_before_s = [cpu_seconds(pid) for pid in pids]
        result = await closed_loop(send, concurrency, duration_s, warmup_s=0.0)
        cpu_s = [cpu_seconds(pid) - before for pid, before in zip(pids, cpu_before_s)]
    finally:
        for channel in channels:
            await channel.close()
    total_cpu_s = sum(cpu_s)
    return {
        **result.summary(), "num_channels": num_channels, "num_router_processes": len(pids),
        "router_cpu_s": cpu_s,
        "router_cpu_share": [c / total_cpu_s if total_cpu_s else None for c in cpu_s],
        "router_cpu_ms_per_request": 1000 * total_cpu_s / result.num_requests if result.num_requests else None,
        "forwarded_per_router_core_s": result.num_requests / total_cpu_s if total_cpu_s else None,
    }
