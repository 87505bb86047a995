"""Promotion and rollback by hand, through the registry's API (the CLI's `models promote`,
`models gate` and `models rollback`).

promote(model, version, canary P | full):
  1. the model has no traffic policy: set one, 100% on what serves now (the `production` alias,
     else the latest version with replicas in discovery), so requests without a version keep
     going there while the new version loads;
  2. deploy the version (at least one replica) and wait, bounded, for a replica in discovery;
  3. run its gate through the router, naming the version (services/rollout/gate.py);
  4. passed: audit `gate.pass`, then the split {stable: 100-P, new: P} with the default rollback
     bounds (decision.DEFAULT_ROLLBACK), or with `full` the `production` alias and 100% on the new
     version. The old version stays deployed after `full`, so going back is one instant
     `promote --full OLD`; undeploy it (RepositoryModelUnload) once it is not wanted;
  5. failed gate or load: undeploy what this promote deployed, audit `gate.fail` with the
     reasons, leave the policy as it was, and say why (PromoteFailed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from protos.tensoryard.v1 import (
    discovery_pb2,
    discovery_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from services.rollout.decision import DEFAULT_ROLLBACK
from services.rollout.gate import GateResult, run_gate

PRODUCTION_ALIAS = "production"
REPLICA_WAIT_S = 180.0
CALL_TIMEOUT_S = 10.0


class PromoteFailed(Exception):
    """The version was not promoted; `reasons` say why (also in the audit log)."""

    def __init__(self, summary: str, reasons: list[str] | None = None, gate: GateResult | None = None):
        super().__init__(summary)
        self.summary = summary
        self.reasons = reasons or []
        self.gate = gate


@dataclass(frozen=True, slots=True)
class Rollout:
    """Where a promote ended: the policy it set and the gate it passed."""

    policy: registry_pb2.TrafficPolicy
    gate: GateResult


class Registry:
    """The registry calls a rollout makes (admin ones through an admin channel), and discovery."""

    def __init__(self, channel: grpc.Channel):
        self.stub = registry_pb2_grpc.ModelRegistryStub(channel)
        self.discovery = discovery_pb2_grpc.DiscoveryStub(channel)

    def version(self, model_name: str, version: int) -> registry_pb2.ModelVersion:
        return self.stub.GetVersion(registry_pb2.GetVersionRequest(model_name=model_name, version=version),
                                    timeout=CALL_TIMEOUT_S)

    def policy(self, model_name: str) -> registry_pb2.TrafficPolicy | None:
        try:
            policy = self.stub.GetTrafficPolicy(registry_pb2.GetTrafficPolicyRequest(model_name=model_name),
                                                timeout=CALL_TIMEOUT_S)
        except grpc.RpcError as error:
            if error.code() is grpc.StatusCode.NOT_FOUND and "polic" in (error.details() or "").lower():
                return None
            raise
        return policy if policy.stable_version else None

    def set_policy(self, policy: registry_pb2.TrafficPolicy, reason: str, expected_revision: int = 0):
        return self.stub.SetTrafficPolicy(registry_pb2.SetTrafficPolicyRequest(
            policy=policy, expected_revision=expected_revision, reason=reason), timeout=CALL_TIMEOUT_S)

    def replicas_wanted(self, model_name: str, version: int) -> int:
        reply = self.stub.ListDeployments(registry_pb2.ListDeploymentsRequest(model_name=model_name),
                                          timeout=CALL_TIMEOUT_S)
        return next((d.replicas for d in reply.deployments if d.version == version), 0)

    def deploy(self, model_name: str, version: int, replicas: int, reason: str) -> None:
        self.stub.SetDeployment(registry_pb2.SetDeploymentRequest(
            deployment=registry_pb2.Deployment(model_name=model_name, version=version, replicas=replicas),
            reason=reason), timeout=CALL_TIMEOUT_S)

    def audit(self, action: str, model_name: str, version: int, details: dict) -> None:
        self.stub.AppendAudit(registry_pb2.AppendAuditRequest(
            action=action, model_name=model_name, version=version, details_json=json.dumps(details, sort_keys=True)),
            timeout=CALL_TIMEOUT_S)

    def last_audit_sequence(self, model_name: str) -> int:
        entries = self.stub.ListAudit(registry_pb2.ListAuditRequest(model_name=model_name),
                                      timeout=CALL_TIMEOUT_S).entries
        return entries[-1].sequence if entries else 0

    def deployment_failure(self, model_name: str, version: int, after_sequence: int) -> str | None:
        """A worker exit of the version reported since `after_sequence`, as a sentence."""
        entries = self.stub.ListAudit(registry_pb2.ListAuditRequest(model_name=model_name, after_sequence=after_sequence),
                                      timeout=CALL_TIMEOUT_S).entries
        for entry in entries:
            if entry.action == "deployment.failed" and entry.version == version:
                details = json.loads(entry.details_json or "{}")
                return (f"load failed: worker {details.get('worker', '?')} of {model_name} version {version} "
                        f"exited ({details.get('exit', '?')}); its log: {details.get('log', '?')}")
        return None

    def ready_versions(self, model_name: str) -> set[int]:
        """Versions with at least one replica registered (workers register once SERVING)."""
        reply = self.discovery.List(discovery_pb2.ListRequest(service="worker", model_name=model_name),
                                    timeout=CALL_TIMEOUT_S)
        return {int(i.model_version) for i in reply.instances if i.model_version.isdigit()}

    def serving_version(self, model_name: str, promoted: int) -> int | None:
        """What requests without a version get when there is no policy: `production`, else the
        latest version with replicas, other than the one being promoted (whose replicas, from an
        earlier gate run or a RepositoryModelLoad, serve nobody yet)."""
        model = self.stub.GetModel(registry_pb2.GetModelRequest(name=model_name), timeout=CALL_TIMEOUT_S)
        production = next((a.version for a in model.aliases if a.name == PRODUCTION_ALIAS), None)
        if production is not None:
            return production
        ready = self.ready_versions(model_name) - {promoted}
        return max(ready) if ready else None


def canary_versions(policy: registry_pb2.TrafficPolicy) -> list[int]:
    return [s.version for s in policy.splits if s.version != policy.stable_version and s.percent > 0]


def stable_only(policy: registry_pb2.TrafficPolicy) -> registry_pb2.TrafficPolicy:
    """The same policy with every request that names no version on the stable version."""
    rolled = registry_pb2.TrafficPolicy()
    rolled.CopyFrom(policy)
    del rolled.splits[:]
    rolled.splits.add(version=policy.stable_version, percent=100.0)
    return rolled


def wait_for_replica(registry: Registry, model_name: str, version: int, timeout_s: float) -> bool:
    """True once a replica of the version is ready; False after timeout_s; LoadFailed as soon as
    the deployment controller reports one of its workers exited (`deployment.failed`)."""
    deadline_s = time.monotonic() + timeout_s
    after = registry.last_audit_sequence(model_name)
    while time.monotonic() < deadline_s:
        if version in registry.ready_versions(model_name):
            return True
        failure = registry.deployment_failure(model_name, version, after)
        if failure is not None:
            raise LoadFailed(failure)
        time.sleep(0.25)
    return False


class LoadFailed(Exception):
    """A worker of the version exited before it was ready: what the controller reported."""


def ensure_stable_policy(registry: Registry, model_name: str, version: int) -> registry_pb2.TrafficPolicy | None:
    """The model's policy, first set to 100% on what serves now when it has none. None: nothing
    serves the model yet (a first promotion: the version becomes stable outright)."""
    policy = registry.policy(model_name)
    if policy is not None:
        return policy
    stable = registry.serving_version(model_name, version)
    if stable is None or stable == version:
        return None
    return registry.set_policy(registry_pb2.TrafficPolicy(
        model_name=model_name, stable_version=stable, splits=[registry_pb2.TrafficSplit(version=stable, percent=100.0)],
    ), reason=f"promote {model_name} {version}: pin what serves now before the new version loads")


def gate_version(registry: Registry, router: grpc.Channel, model_name: str, version: int,
                 replica_wait_s: float = REPLICA_WAIT_S, say: Callable[[str], None] = lambda line: None,
                 keep_deployed: bool = False) -> GateResult:
    """Run the version's gate against its replicas, deploying one for the purpose when it has
    none (undeployed again afterwards unless keep_deployed and it passed). PromoteFailed when no
    replica came up; the caller audits the result."""
    gate = registry.version(model_name, version).gate
    wanted_before = registry.replicas_wanted(model_name, version)
    if wanted_before < 1:
        say(f"deploying {model_name} version {version} (1 replica)")
        registry.deploy(model_name, version, 1, reason=f"deployed to run the gate of version {version}")
    try:
        say(f"waiting for a replica of version {version} (up to {replica_wait_s:g} s)")
        try:
            ready = wait_for_replica(registry, model_name, version, replica_wait_s)
        except LoadFailed as failure:
            raise PromoteFailed(f"{model_name} version {version} did not load", [str(failure)]) from None
        if not ready:
            reason = (f"load failed: no replica of {model_name} version {version} became ready within "
                      f"{replica_wait_s:g} s (see the worker logs)")
            raise PromoteFailed(f"{model_name} version {version} did not load", [reason])
        say(f"running the gate of version {version}: {len(gate.golden_prompts)} prompt(s), "
            f"{len(gate.golden_embeddings)} embedding(s), latency budget {gate.latency_budget_s:g} s")
        result = run_gate(router, model_name, version, gate)
    except BaseException:
        if wanted_before < 1:
            registry.deploy(model_name, version, 0, reason=f"version {version} did not load")
        raise
    if wanted_before < 1 and not (keep_deployed and result.passed):
        registry.deploy(model_name, version, 0, reason=f"gate of version {version} "
                        + ("passed" if result.passed else "failed"))
    return result


def promote(registry: Registry, router: grpc.Channel, model_name: str, version: int,
            canary_percent: float | None = None, full: bool = False, replica_wait_s: float = REPLICA_WAIT_S,
            say: Callable[[str], None] = lambda line: None) -> Rollout:
    if full == (canary_percent is not None):
        raise ValueError("promote takes either a canary percent or full")
    if canary_percent is not None and not 0 < canary_percent < 100:
        raise ValueError(f"canary percent must be between 0 and 100 (exclusive), not {canary_percent:g}")
    registry.version(model_name, version)  # NOT_FOUND before anything changes
    policy = ensure_stable_policy(registry, model_name, version)
    if policy is not None and policy.stable_version == version and not canary_versions(policy):
        raise PromoteFailed(f"{model_name} version {version} is already the stable version")
    try:
        result = gate_version(registry, router, model_name, version, replica_wait_s, say, keep_deployed=True)
    except PromoteFailed as failure:
        _undeploy_unless_routed(registry, policy, model_name, version)
        registry.audit("gate.fail", model_name, version, {"reasons": failure.reasons})
        raise
    if not result.passed:
        _undeploy_unless_routed(registry, policy, model_name, version)
        registry.audit("gate.fail", model_name, version, {"reasons": result.reasons})
        raise PromoteFailed(f"{model_name} version {version} failed its gate", result.reasons, result)
    registry.audit("gate.pass", model_name, version, {
        "checks": len(result.checks), "p95_latency_s": result.p95_latency_s})
    if full or policy is None:
        registry.stub.SetAlias(registry_pb2.SetAliasRequest(
            model_name=model_name, name=PRODUCTION_ALIAS, version=version,
            reason=f"promote {version} --full"), timeout=CALL_TIMEOUT_S)
        new_policy = registry_pb2.TrafficPolicy()
        if policy is not None:
            new_policy.CopyFrom(policy)
        new_policy.model_name = model_name
        new_policy.stable_version = version
        del new_policy.splits[:]
        new_policy.splits.add(version=version, percent=100.0)
        if not new_policy.rollback.window_s:
            new_policy.rollback.CopyFrom(DEFAULT_ROLLBACK)
        reason = f"promote {version} --full: all requests without a version"
    else:
        new_policy = registry_pb2.TrafficPolicy()
        new_policy.CopyFrom(policy)
        del new_policy.splits[:]
        new_policy.splits.add(version=policy.stable_version, percent=100.0 - canary_percent)
        new_policy.splits.add(version=version, percent=canary_percent)
        if not new_policy.rollback.window_s:
            new_policy.rollback.CopyFrom(DEFAULT_ROLLBACK)
        reason = f"promote {version} --canary {canary_percent:g}"
    expected = policy.revision if policy is not None else 0
    return Rollout(registry.set_policy(new_policy, reason, expected_revision=expected), result)


def _undeploy_unless_routed(registry: Registry, policy, model_name: str, version: int) -> None:
    """A version that failed its promotion gets no workers, unless the policy already sends it
    requests (a canary promoted again), which undeploying would turn into errors."""
    routed = policy is not None and version in {s.version for s in policy.splits if s.percent > 0}
    if not routed and registry.replicas_wanted(model_name, version) > 0:
        registry.deploy(model_name, version, 0, reason=f"version {version} failed its promotion")


def rollback(registry: Registry, model_name: str, reason: str) -> registry_pb2.TrafficPolicy:
    """Every request without a version back on the stable version. PromoteFailed when no canary
    gets any (nothing to roll back; after `promote --full`, promote the old version --full)."""
    policy = registry.policy(model_name)
    if policy is None or not canary_versions(policy):
        raise PromoteFailed(f"{model_name} has no canary to roll back"
                            + (f" (all requests go to version {policy.stable_version})" if policy else ""))
    rolled = registry.set_policy(stable_only(policy), reason=f"rollback by hand: {reason}",
                                 expected_revision=policy.revision)
    registry.audit("rollback", model_name, policy.stable_version, {
        "by": "hand", "reason": reason, "canary_versions": canary_versions(policy)})
    return rolled
