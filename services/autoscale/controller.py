"""The autoscaling controller: runs in the registry; every interval, per autoscaled deployment, read
its signals, decide (policy.py), publish the decision, and apply a change through the actuator.

- **Which deployments**: the store's, with `autoscale` set (SetDeployment's min_replicas,
  max_replicas, autoscale). Each keeps one `ScalingPolicy` (its recommendation history) for as long
  as it stays autoscaled with the same bounds; new bounds start a fresh history.
- **Current count** is the deployment's `replicas` (what was last asked for, replicas still
  starting included), not the replicas ready now: capacity on its way is not asked for twice.
- **Publishing**: each decision goes to the discovery KV under
  `tensoryard/deployments/<model>/<version>/decision` as JSON (replicas, recommendation, reason,
  utilisation by signal, current count, time): the scaling signal an external autoscaler (actuator
  `none`) or an operator reads. The embedded catalog's KV has Consul's semantics, so the same layout
  (services/common/scaling_keys.py) serves on Consul.
- **One leader**: with several registries only the one holding the leader lock acts
  (`leader.py`): each interval, and again right before each action, the controller asks the lock
  for its fencing token; without one it neither decides nor publishes (a follower's policy history
  would be of a fleet it does not steer). The token goes with the action (`ScaleRequest.fence`).
- **Failures**: an actuator that raises is logged and the decision is retried at the next
  interval (the policy decides again from fresh signals); one deployment's failure does not stop
  the others.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from services.autoscale.actuator import Actuator, ScaleRequest
from services.autoscale.leader import SoleLeader
from services.autoscale.policy import Bounds, Decision, ScalingPolicy
from services.autoscale.signals import SignalReader
from services.common.config import AutoscaleConfig
from services.common.scaling_keys import decision_key
from services.common.telemetry import get_logger

log = get_logger(__name__)

Key = tuple[str, int]  # (model, version)
# Between intervals, how often the controller looks for requests held at a deployment scaled to zero.
COLD_START_POLL_S = 0.5

DESIRED = Gauge("tensoryard_autoscaler_desired_replicas", "Replicas the autoscaler decided on, per deployment.",
                ["model", "version"])
RECOMMENDED = Gauge("tensoryard_autoscaler_recommended_replicas",
                    "The autoscaler's raw recommendation before stabilisation, per deployment.", ["model", "version"])
ACTIONS = Counter("tensoryard_autoscaler_actions", "Scaling actions applied, by direction.",
                  ["model", "version", "direction"])
FAILURES = Counter("tensoryard_autoscaler_actuator_failures", "Scaling actions the actuator failed.",
                   ["model", "version"])


@dataclass(frozen=True, slots=True)
class Applied:
    model_name: str
    version: int
    current: int
    decision: Decision


class AutoscaleController:
    def __init__(self, config: AutoscaleConfig, deployments: Callable[[], list], reader: SignalReader,
                 actuator: Actuator, publish: Callable[[str, bytes], object] | None = None,
                 clock: Callable[[], float] = time.monotonic, leader=None):
        self.config = config
        self._leader = leader or SoleLeader()  # leader.ConsulLeaderLock with several registries
        self._leading = False
        self._deployments = deployments  # blocking (the store): run in a thread
        self._reader = reader
        self._actuator = actuator
        self._publish = publish
        self._clock = clock
        self._policies: dict[Key, ScalingPolicy] = {}

    async def run(self) -> None:
        log.info("autoscaler_started", actuator=self._actuator.name, interval_s=self.config.autoscale_interval_s)
        try:
            while True:
                try:
                    await self.step()
                except Exception:
                    log.exception("autoscaler_step_failed")
                await self._wait_interval()
        finally:
            await self._reader.close()

    async def _wait_interval(self) -> None:
        """One interval, cut short when routers hold requests for a deployment scaled to zero: those
        requests are waiting, and the interval (15 s by default) would be most of their wait."""
        deadline_s = time.monotonic() + self.config.autoscale_interval_s
        while (remaining_s := deadline_s - time.monotonic()) > 0:
            await asyncio.sleep(min(COLD_START_POLL_S, remaining_s))
            try:
                if await self._requests_wait_at_zero():
                    return
            except Exception as error:  # noqa: BLE001 - the store or KV is away: the interval goes on
                log.warning("autoscaler_cold_start_check_failed", error=str(error))

    async def _requests_wait_at_zero(self) -> bool:
        if not self._leading:
            return False
        records = await asyncio.to_thread(self._deployments)
        for record in records:
            if record.autoscale and record.replicas == 0 and \
                    await self._reader.num_held(record.model_name, record.version):
                return True
        return False

    async def step(self) -> list[Applied]:
        """One interval over every autoscaled deployment; returns the decisions that changed a count."""
        if not await self._lead():
            return []
        records = [r for r in await asyncio.to_thread(self._deployments) if r.autoscale]
        self._forget_others({(r.model_name, r.version) for r in records})
        applied = []
        for record in records:
            result = await self._one(record)
            if result is not None:
                applied.append(result)
        await self._reader.end_round()
        return applied

    async def _one(self, record) -> Applied | None:
        key = (record.model_name, record.version)
        policy = self._policy(key, Bounds(record.min_replicas, record.max_replicas))
        signals = await self._reader.read(record.model_name, record.version)
        decision = policy.decide(self._clock(), record.replicas, signals)
        labels = (record.model_name, str(record.version))
        DESIRED.labels(*labels).set(decision.replicas)
        RECOMMENDED.labels(*labels).set(decision.recommendation)
        await self._publish_decision(record, decision)
        if decision.replicas == record.replicas:
            return None
        fence = await self._leader.fence()
        if fence is None:  # lost the lock since this interval began: the new leader decides
            await self._lead()
            return None
        log.info("autoscale", model=record.model_name, version=record.version, replicas=decision.replicas,
                 previous_replicas=record.replicas, reason=decision.reason, utilisation=decision.utilisation,
                 num_ready=signals.num_ready)
        try:
            await self._actuator.set_replicas(ScaleRequest(record.model_name, record.version, decision.replicas,
                                                           decision.reason, fence))
        except Exception as error:  # retried at the next interval, from fresh signals
            FAILURES.labels(*labels).inc()
            log.warning("autoscale_actuator_failed", model=record.model_name, version=record.version,
                        actuator=self._actuator.name, error=str(error))
            return None
        ACTIONS.labels(*labels, "up" if decision.replicas > record.replicas else "down").inc()
        return Applied(record.model_name, record.version, record.replicas, decision)

    async def _lead(self) -> bool:
        """Whether this controller leads now; a change is logged, and a follower forgets its
        policies' history (the leader's, not its own, steers the fleet meanwhile)."""
        leading = await self._leader.fence() is not None
        if leading != self._leading:
            log.info("autoscaler_leading" if leading else "autoscaler_following")
            self._leading = leading
            if not leading:
                self._forget_others(set())
        return leading

    def _policy(self, key: Key, bounds: Bounds) -> ScalingPolicy:
        policy = self._policies.get(key)
        if policy is None or policy.bounds != bounds:
            policy = self._policies[key] = ScalingPolicy(self.config, bounds)
        return policy

    def _forget_others(self, keys: set[Key]) -> None:
        for key in [k for k in self._policies if k not in keys]:
            del self._policies[key]
            for gauge in (DESIRED, RECOMMENDED):
                try:
                    gauge.remove(key[0], str(key[1]))
                except KeyError:
                    pass

    async def _publish_decision(self, record, decision: Decision) -> None:
        if self._publish is None:
            return
        value = json.dumps({
            "replicas": decision.replicas, "recommendation": decision.recommendation,
            "current_replicas": record.replicas, "min_replicas": record.min_replicas,
            "max_replicas": record.max_replicas, "reason": decision.reason,
            "utilisation": decision.utilisation, "at_unix_s": time.time(), "actuator": self._actuator.name,
        }, sort_keys=True).encode()
        try:
            published = self._publish(decision_key(record.model_name, record.version), value)
            if inspect.isawaitable(published):
                await published
        except Exception as error:  # a signal not published is not a reason to stop scaling
            log.warning("autoscale_publish_failed", model=record.model_name, version=record.version, error=str(error))


def make_actuator(config: AutoscaleConfig, store, nomad_config=None) -> Actuator:
    """The actuator `autoscale_actuator` names."""
    name = config.autoscale_actuator
    if name == "local":
        from services.autoscale.local import LocalActuator

        return LocalActuator(store)
    if name == "nomad":
        from services.autoscale.nomad import NomadActuator
        from services.common.config import NomadConfig

        return NomadActuator(nomad_config or NomadConfig())
    from services.autoscale.actuator import NoActuator

    return NoActuator()
