"""The scaling signals' layout in the discovery KV (Consul's, or the embedded catalog's, which has
the same semantics), shared by whoever writes and reads them:

- `tensoryard/deployments/<model>/<version>/decision`: the autoscaler's last decision for the
  deployment, JSON (replicas, recommendation, reason, utilisation by signal, current count, bounds,
  actuator, time) — what an external autoscaler (actuator `none`) or an operator reads;
- `tensoryard/deployments/<model>/<version>/held/<router id>`: requests a router holds for the
  deployment while it has no replica (scale from zero), JSON {"num_held", "at_unix_s"}, rewritten
  every few seconds while non-zero and deleted at zero; the autoscaler sums the fresh ones;
- `tensoryard/autoscaler/leader`: the autoscaler's leader lock (services/autoscale/leader.py); its
  value names the registry that holds it.
"""

from __future__ import annotations

import json
import time

# A held count older than this is a router that went away without deleting it.
HELD_FRESH_S = 10.0


def deployment_prefix(model_name: str, version: int) -> str:
    return f"tensoryard/deployments/{model_name}/{version}/"


def decision_key(model_name: str, version: int) -> str:
    return deployment_prefix(model_name, version) + "decision"


def held_prefix(model_name: str, version: int) -> str:
    return deployment_prefix(model_name, version) + "held/"


def held_key(model_name: str, version: int, router_id: str) -> str:
    return held_prefix(model_name, version) + router_id


def held_value(num_held: int, now_unix_s: float | None = None) -> bytes:
    return json.dumps({"num_held": num_held, "at_unix_s": time.time() if now_unix_s is None else now_unix_s}).encode()


def sum_fresh_held(values, now_unix_s: float | None = None, fresh_s: float = HELD_FRESH_S) -> int:
    """The total of the held counts written within `fresh_s`; entries that do not parse are skipped."""
    now_unix_s = time.time() if now_unix_s is None else now_unix_s
    total = 0
    for value in values:
        try:
            entry = json.loads(value)
            if now_unix_s - float(entry["at_unix_s"]) <= fresh_s:
                total += max(int(entry["num_held"]), 0)
        except (ValueError, KeyError, TypeError):
            continue
    return total
