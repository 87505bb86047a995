"""The router's own Prometheus series: how it routes, retries, migrates and refuses."""

from __future__ import annotations

import prometheus_client

ROUTED = prometheus_client.Counter(
    "tensoryard_router_routed_total", "Requests routed to a replica, by model and policy.", ["model", "policy"]
)
RETRIES = prometheus_client.Counter(
    "tensoryard_router_retries_total", "Requests retried on another replica before anything was sent back.",
    ["model", "code"],
)
MIGRATIONS = prometheus_client.Counter(
    "tensoryard_router_migrations_total",
    "Generation streams continued on another replica after theirs went away, by why.", ["model", "reason"],
)
REJECTED = prometheus_client.Counter(
    "tensoryard_router_rejected_total", "Requests refused by the router, by reason.", ["model", "reason"]
)
PREFIX_MATCHED_BLOCKS = prometheus_client.Counter(
    "tensoryard_router_prefix_matched_blocks_total",
    "Prompt blocks the chosen replica was known to hold (kv_aware), and all prompt blocks routed.",
    ["model", "kind"],
)
KV_INDEX_MODE = prometheus_client.Gauge(
    "tensoryard_router_kv_index_events",
    "1 while a replica streams KV events to this router, 0 while its index is approximate (routed prompts).",
    ["worker"],
)
