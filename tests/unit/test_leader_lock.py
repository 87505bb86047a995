"""The autoscaler's leader lock (services/autoscale/leader.py) on the Consul stand-in: one leader at
a time, a follower that takes over only after the leader's session is gone, fencing tokens that
grow, and controllers that act only while they lead."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from services.autoscale.actuator import ScaleRequest
from services.autoscale.controller import AutoscaleController
from services.autoscale.leader import ConsulLeaderLock
from services.autoscale.policy import DeploymentSignals
from services.common.config import AutoscaleConfig
from services.common.consul_http import ConsulHttp
from tests.support.consul_fixtures import FAST_TIMERS

TTL_S = 1.0  # the stand-in runs with Consul's session_ttl_min lowered to 1 s (FAST_TIMERS)
LOCK_DELAY_S = 0.5


def lock(url: str, holder: str) -> ConsulLeaderLock:
    return ConsulLeaderLock(ConsulHttp(url), holder, ttl_s=TTL_S, lock_delay_s=LOCK_DELAY_S)


async def until_leading(candidate: ConsulLeaderLock, timeout_s: float = 5.0) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        token = await candidate.fence()
        if token is not None:
            return token
        await asyncio.sleep(0.05)
    raise AssertionError(f"{candidate.holder} did not lead within {timeout_s} s")


async def session_exists(http: ConsulHttp, session_id: str) -> bool:
    info, _ = await http.get(f"/v1/session/info/{session_id}")
    return bool(info)


def test_the_follower_takes_over_after_the_leaders_session_expires_and_never_while_it_is_valid(
        start_consul_standin):
    standin = start_consul_standin(*FAST_TIMERS)

    async def main():
        a, b = lock(standin.url, "a"), lock(standin.url, "b")
        running_a = asyncio.create_task(a.run())
        token_a = await until_leading(a)
        running_b = asyncio.create_task(b.run())
        for _ in range(15):  # 1.5 s, several of b's attempts: a keeps the lock
            assert await a.fence() == token_a and await b.fence() is None
            await asyncio.sleep(0.1)

        running_a.cancel()  # a pauses: no more renewals; its session lives on until Consul expires it
        paused_s = time.monotonic()
        probe = ConsulHttp(standin.url)
        last_a_s = None
        while True:
            fence_a, fence_b = await a.fence(), await b.fence()
            now_s = time.monotonic()
            assert not (fence_a and fence_b), "two leaders at once"
            if fence_a:
                last_a_s = now_s
            if fence_b:
                assert not await session_exists(probe, a.session_id), "b acted while a's session was valid"
                break
            assert now_s - paused_s < 15, "b never took over"
            await asyncio.sleep(0.05)
        token_b = fence_b
        assert token_b > token_a
        # a stopped trusting its lock before its TTL ran out; b waited at least a TTL (less the
        # third of one a may have renewed before pausing) plus the lock-delay.
        assert last_a_s is None or last_a_s - paused_s < TTL_S
        assert now_s - paused_s >= TTL_S * 2 / 3
        assert await a.fence() is None  # woken, a knows it no longer leads
        running_b.cancel()
        await b.close()
        await probe.close()
        return token_a, token_b

    asyncio.run(main())


def test_a_clean_stop_hands_the_lock_over_without_waiting_out_the_ttl(start_consul_standin):
    standin = start_consul_standin(*FAST_TIMERS)

    async def main():
        a, b = lock(standin.url, "a"), lock(standin.url, "b")
        running_a = asyncio.create_task(a.run())
        await until_leading(a)
        running_b = asyncio.create_task(b.run())
        await asyncio.sleep(0.2)
        running_a.cancel()
        await a.close()  # releases the lock and destroys the session: no lock-delay after a release
        stopped_s = time.monotonic()
        await until_leading(b, timeout_s=3)
        handover_s = time.monotonic() - stopped_s
        running_b.cancel()
        await b.close()
        return handover_s

    assert asyncio.run(main()) < 1.5  # b's next attempt, a third of a TTL later


@dataclass
class Deployment:
    model_name: str = "m"
    version: int = 1
    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int = 4
    autoscale: bool = True


class Saturated:
    """Signals of a deployment whose one replica is far past every threshold."""

    async def read(self, model_name: str, version: int) -> DeploymentSignals:
        return DeploymentSignals(num_ready=1, num_in_flight=100, num_waiting=50)

    async def end_round(self) -> None:
        return None


class Recorder:
    name = "recorder"

    def __init__(self, who: str, actions: list):
        self.who, self.actions = who, actions

    async def set_replicas(self, request: ScaleRequest) -> None:
        self.actions.append((self.who, request.fence, time.monotonic()))


def test_two_controllers_on_one_lock_only_the_leader_acts_and_its_actions_carry_its_token(start_consul_standin):
    standin = start_consul_standin(*FAST_TIMERS)
    config = AutoscaleConfig(autoscale_actuator="none", autoscale_interval_s=0.1)

    async def main():
        actions: list = []
        a, b = lock(standin.url, "a"), lock(standin.url, "b")
        controllers = {
            "a": AutoscaleController(config, lambda: [Deployment()], Saturated(), Recorder("a", actions), leader=a),
            "b": AutoscaleController(config, lambda: [Deployment()], Saturated(), Recorder("b", actions), leader=b),
        }
        running_a = asyncio.create_task(a.run())
        token_a = await until_leading(a)
        running_b = asyncio.create_task(b.run())
        for _ in range(10):
            for controller in controllers.values():
                await controller.step()
            await asyncio.sleep(0.05)
        assert actions and {(who, fence) for who, fence, _ in actions} == {("a", token_a)}
        running_a.cancel()  # a pauses
        paused_s = time.monotonic()
        token_b = await until_leading(b, timeout_s=10)
        for _ in range(10):
            for controller in controllers.values():
                await controller.step()
            await asyncio.sleep(0.05)
        after = [(who, fence) for who, fence, at_s in actions if at_s > paused_s]
        assert after and set(after) == {("b", token_b)} and token_b > token_a
        running_b.cancel()
        await b.close()

    asyncio.run(main())
