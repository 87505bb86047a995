"""How fast a rollout moves on CPU workers, and what users see while it does.

    .venv/bin/python -m bench.bench_rollout [--quick] [--rounds 3] [--canary 10] [--clients 4]

One `tensoryard up --no-llm` (the embedding demo; every worker with fault injection on), and
--clients closed-loop users sending Embed requests that name no version all along. Each round:
1. a new version (version 1's files, a gate of golden embeddings from version 1's outputs);
2. promote --canary P (services/rollout/promote.py, as `tensoryard models promote` runs it): the
   time from the call to its return (deploy, load, gate, split) and to the first user response
   from the new version;
3. InjectFault FAIL_REQUESTS (all of the canary's requests fail) at once: the time from the fault
   to the rollback guard's new policy (100% stable) and to the last user response from the canary
   (the routers following it);
4. undeploy the canary.
Failed requests on the stable version during each phase come from the routers' own counters
(`tensoryard_router_requests`, by version and code), failures users saw from the clients; the
target for the stable version is zero. Writes bench/results/rollout-<UTC>.json.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import threading
import time
from datetime import UTC, datetime

import grpc
import numpy as np
from rich.console import Console
from rich.table import Table

from bench.result_files import write_json
from bench.stack import running_stack
from protos.tensoryard.v1 import (
    discovery_pb2,
    discovery_pb2_grpc,
    embeddings_pb2,
    embeddings_pb2_grpc,
    registry_pb2,
    worker_pb2,
    worker_pb2_grpc,
)
from services.rollout.promote import Registry, promote
from services.status.scrape import fetch, up_router_metrics

MODEL = "all-MiniLM-L6-v2"
GOLDEN_TEXTS = ["a cat sleeps on the sofa", "rollouts move traffic behind a gate"]
ROLLBACK_TIMEOUT_S = 60.0

console = Console()


class Users:
    """Closed-loop clients sending requests without a version; every outcome with its time."""

    def __init__(self, router: str, num_clients: int):
        self._channel = grpc.insecure_channel(router)
        self._stub = embeddings_pb2_grpc.EmbeddingsStub(self._channel)
        self.outcomes: list[tuple[float, str]] = []  # (monotonic s, version served or status code)
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(num_clients)]

    def __enter__(self) -> Users:  # noqa: PYI034 - final in use
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stopped.set()
        for thread in self._threads:
            thread.join()
        self._channel.close()

    def _loop(self) -> None:
        request = embeddings_pb2.EmbedRequest(model_name=MODEL, texts=["how fast does a rollout move?"])
        while not self._stopped.is_set():
            try:
                outcome = self._stub.Embed(request, timeout=30).model_version
            except grpc.RpcError as error:
                outcome = error.code().name
            with self._lock:
                self.outcomes.append((time.monotonic(), outcome))

    def between(self, start_s: float, end_s: float) -> list[tuple[float, str]]:
        with self._lock:
            return [o for o in self.outcomes if start_s <= o[0] <= end_s]


def router_failures(home, version: int) -> int:
    """Non-OK requests the routers counted for `version`."""
    total = 0
    for url in up_router_metrics(home):
        scrape = fetch(url, 5)
        for labels, value in (scrape.snapshot.samples.get("tensoryard_router_requests", ()) if scrape.snapshot else ()):
            if labels["model"] == MODEL and labels["version"] == str(version) and labels["code"] != "OK":
                total += int(value)
    return total


def new_version(stub, embed) -> int:
    goldens = []
    for text in GOLDEN_TEXTS:
        reply = embed.Embed(embeddings_pb2.EmbedRequest(model_name=MODEL, model_version="1", texts=[text]))
        goldens.append(registry_pb2.GoldenEmbedding(
            text=text, expected=np.frombuffer(reply.embeddings, dtype="<f4").tolist(), min_cosine=0.999))
    v1 = stub.GetVersion(registry_pb2.GetVersionRequest(model_name=MODEL, version=1))
    return stub.CreateVersion(registry_pb2.CreateVersionRequest(
        model_name=MODEL, files=v1.files, config_json=v1.config_json,
        metadata=registry_pb2.VersionMetadata(labels={"bench": f"rollout-{time.time_ns()}"}),
        lineage=registry_pb2.Lineage(source_kind="push", source_uri="bench/bench_rollout.py", parent_version=1),
        gate=registry_pb2.Gate(golden_embeddings=goldens),
    )).version


def inject_failures(registry_address: str, version: int) -> None:
    with grpc.insecure_channel(registry_address) as channel:
        instances = discovery_pb2_grpc.DiscoveryStub(channel).List(
            discovery_pb2.ListRequest(service="worker", model_name=MODEL)).instances
    for instance in instances:
        if instance.model_version == str(version):
            with grpc.insecure_channel(instance.address) as channel:
                worker_pb2_grpc.WorkerControlStub(channel).InjectFault(worker_pb2.InjectFaultRequest(
                    fault=worker_pb2.InjectFaultRequest.FAIL_REQUESTS, fraction=1.0, duration_s=ROLLBACK_TIMEOUT_S))


def run_round(stack, registry: Registry, embed, users: Users, canary_percent: float) -> dict:
    version = new_version(registry.stub, embed)
    router = grpc.insecure_channel(stack.router)
    stable_failed_before = router_failures(stack.home, 1)
    promote_started_s = time.monotonic()
    promote(registry, router, MODEL, version, canary_percent=canary_percent)
    promote_returned_s = time.monotonic()
    deadline_s = promote_returned_s + 10
    while not any(o == str(version) for _, o in users.between(promote_started_s, time.monotonic())):
        if time.monotonic() > deadline_s:
            raise RuntimeError(f"no user request reached version {version} within 10 s of the split")
        time.sleep(0.02)
    first_canary_s = min(t for t, o in users.between(promote_started_s, time.monotonic()) if o == str(version))
    time.sleep(2.0)  # the canary serves a moment before it breaks
    stable_failed_promote = router_failures(stack.home, 1) - stable_failed_before

    fault_s = time.monotonic()
    inject_failures(stack.registry, version)
    while True:
        policy = registry.stub.GetTrafficPolicy(registry_pb2.GetTrafficPolicyRequest(model_name=MODEL))
        if [s.version for s in policy.splits if s.percent > 0] == [1]:
            break
        if time.monotonic() - fault_s > ROLLBACK_TIMEOUT_S:
            raise RuntimeError(f"version {version} was not rolled back within {ROLLBACK_TIMEOUT_S:g} s")
        time.sleep(0.02)
    rolled_back_s = time.monotonic()
    time.sleep(3.0)  # long enough for every router to follow (they refresh every second)
    after_fault = users.between(fault_s, time.monotonic())
    canary_outcomes = [t for t, o in after_fault if o not in ("1",)]
    last_canary_s = max(canary_outcomes) if canary_outcomes else fault_s
    stable_failed_rollback = router_failures(stack.home, 1) - stable_failed_before - stable_failed_promote
    registry.deploy(MODEL, version, 0, reason="bench_rollout: round over")
    router.close()
    return {
        "version": version,
        "promote_call_s": promote_returned_s - promote_started_s,
        "promote_to_first_canary_response_s": first_canary_s - promote_started_s,
        "fault_to_policy_rollback_s": rolled_back_s - fault_s,
        "fault_to_last_canary_response_s": last_canary_s - fault_s,
        "user_failures_after_fault": sum(1 for _, o in after_fault if o not in ("1", str(version))),
        "stable_failed_during_promote": stable_failed_promote,
        "stable_failed_during_rollback": stable_failed_rollback,
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--canary", type=float, default=10.0, help="canary percent")
    parser.add_argument("--clients", type=int, default=4, help="closed-loop users")
    parser.add_argument("--worker-threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds = 1
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    created = datetime.now(UTC)
    rounds = []
    with running_stack(args.worker_threads, None, with_llm=False,
                       env={"TENSORYARD_ENABLE_FAULT_INJECTION": "1"}) as stack:
        with grpc.insecure_channel(stack.registry) as registry_channel, \
                grpc.insecure_channel(stack.router) as router_channel, Users(stack.router, args.clients) as users:
            registry = Registry(registry_channel)
            embed = embeddings_pb2_grpc.EmbeddingsStub(router_channel)
            time.sleep(2.0)  # warm
            for index in range(args.rounds):
                console.print(f"round {index + 1} of {args.rounds}")
                rounds.append(run_round(stack, registry, embed, users, args.canary))
            outcomes = collections.Counter(o for _, o in users.outcomes)
    report = {
        "benchmark": "rollout", "created": created.isoformat(), "model": MODEL, "canary_percent": args.canary,
        "clients": args.clients, "worker_threads": args.worker_threads, "rounds": rounds,
        "user_outcomes": dict(outcomes),
        "median": {key: statistics.median(r[key] for r in rounds) for key in rounds[0] if key != "version"},
    }
    path = write_json(report, created, "rollout")
    table = Table(title=f"rollout on CPU workers ({args.rounds} round(s), canary {args.canary:g}%, "
                        f"{args.clients} users)")
    for column in ("phase", "median s", "stable failures (total)"):
        table.add_column(column)
    median = report["median"]
    table.add_row("promote call (deploy, load, gate, split)", f"{median['promote_call_s']:.2f}", "")
    table.add_row("promote -> first canary response", f"{median['promote_to_first_canary_response_s']:.2f}",
                  str(sum(r["stable_failed_during_promote"] for r in rounds)))
    table.add_row("fault -> policy rolled back", f"{median['fault_to_policy_rollback_s']:.2f}", "")
    table.add_row("fault -> last canary response", f"{median['fault_to_last_canary_response_s']:.2f}",
                  str(sum(r["stable_failed_during_rollback"] for r in rounds)))
    console.print(table)
    console.print(f"user outcomes: {dict(outcomes)}; results in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
