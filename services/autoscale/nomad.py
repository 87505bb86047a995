"""The `nomad` actuator: a scaling decision becomes a task group's count in Nomad.

A deployment (model, version) runs as one task group of one Nomad job, named by two templates
(`nomad_job_template`, default `tensoryard-workers`; `nomad_group_template`, default
`{model}-v{version}`; deploy/nomad/workers.nomad.hcl has the groups). Setting replicas is:

1. Read Job: the group must exist and carry a `scaling` block. That block is the operator's word
   on what an autoscaler may do with the group, so it is obeyed: `enabled = false` means hands
   off, and a count outside `min`..`max` is refused here, with both numbers, before Nomad would
   refuse it too ("group count was greater than scaling policy maximum").
2. Read Job Scale Status: when `Desired` is already the count, nothing is sent (no scaling event
   for every unchanged interval).
3. Scale Task Group with `Count`, `Target.Group`, `Message` (the decision's reason, kept in Nomad's
   scaling events) and `Meta` (model, version, previous count, the leader lock's fencing token:
   Nomad does not check it, so the controller checks the lock right before each call; the token in
   Nomad's scaling events shows which leader acted).

While a deployment of the job is active Nomad answers 400 "job scaling blocked due to active
deployment"; that passes once the deployment ends, so the call is retried with exponential backoff
(`nomad_retry_initial_s` doubling up to `nomad_retry_max_s`, `nomad_max_attempts` tries). No
jitter: one controller (the leader) acts at a time, so there is no herd to spread. Anything else
Nomad refuses is raised at once as a `NomadError` with Nomad's own message; the controller retries
at its next interval.

Scale-in drains: Nomad stops the allocations it removes with the job's `kill_signal` (SIGTERM) and
waits `kill_timeout` for the worker to drain (deploy/nomad/ sets both from the worker's grace).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.autoscale.actuator import ScaleRequest
from services.autoscale.nomad_api import NomadApi, NomadError
from services.common.config import NomadConfig
from services.common.telemetry import get_logger

log = get_logger(__name__)


class ScaleRefused(Exception):
    """The count is one the job's own `scaling` block does not allow (or the block says hands off)."""


@dataclass(frozen=True, slots=True)
class NomadTarget:
    job_id: str
    group: str


@dataclass(frozen=True, slots=True)
class GroupScaling:
    """A task group's `scaling` block as Read Job returns it."""

    min_count: int
    max_count: int
    enabled: bool

    @classmethod
    def of_group(cls, target: NomadTarget, group: dict[str, Any]) -> GroupScaling:
        scaling = group.get("Scaling")
        if not scaling:
            raise ScaleRefused(f"nomad job {target.job_id!r} group {target.group!r} has no scaling block: "
                               "add one (enabled, min, max) to let tensoryard scale it")
        # Nomad fills a missing `min` with the group's count when the job is submitted.
        min_count = scaling.get("Min")
        return cls(
            min_count=int(group.get("Count", 0) if min_count is None else min_count),
            max_count=int(scaling["Max"]),
            enabled=bool(scaling.get("Enabled", False)),
        )

    def check(self, target: NomadTarget, count: int) -> None:
        where = f"nomad job {target.job_id!r} group {target.group!r}"
        if not self.enabled:
            raise ScaleRefused(f"{where}: its scaling block has enabled = false")
        if not self.min_count <= count <= self.max_count:
            raise ScaleRefused(f"{where}: {count} replicas is outside its scaling block's "
                               f"min {self.min_count} .. max {self.max_count}")


def read_token(token: str, token_file: Path | None) -> str:
    """The ACL token: the file's first line when a file is named, else `token`; empty: no
    X-Nomad-Token header (Nomad without ACLs)."""
    if token_file is None:
        return token
    try:
        lines = token_file.read_text().splitlines()
    except OSError as error:
        raise ValueError(f"nomad_token_file: cannot read {token_file}: {error.strerror}") from None
    if not lines or not lines[0].strip():
        raise ValueError(f"nomad_token_file: {token_file} is empty")
    return lines[0].strip()


class NomadActuator:
    name = "nomad"

    def __init__(self, config: NomadConfig, api: NomadApi | None = None,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.config = config
        self.api = api or NomadApi(
            config.nomad_address, read_token(config.nomad_token, config.nomad_token_file),
            config.nomad_namespace, config.nomad_region, config.nomad_request_timeout_s,
        )
        self._sleep = sleep

    def target(self, model_name: str, version: int) -> NomadTarget:
        values = {"model": model_name, "version": version}
        return NomadTarget(self.config.nomad_job_template.format(**values),
                           self.config.nomad_group_template.format(**values))

    async def set_replicas(self, request: ScaleRequest) -> None:
        target = self.target(request.model_name, request.version)
        job = await self.api.read_job(target.job_id)
        group = next((g for g in job.get("TaskGroups") or () if g.get("Name") == target.group), None)
        if group is None:
            names = ", ".join(sorted(g.get("Name", "?") for g in job.get("TaskGroups") or ())) or "none"
            raise ScaleRefused(f"nomad job {target.job_id!r} has no group {target.group!r} for "
                               f"{request.model_name} v{request.version} (its groups: {names})")
        GroupScaling.of_group(target, group).check(target, request.replicas)
        status = await self.api.read_scale_status(target.job_id)
        current = (status.get("TaskGroups") or {}).get(target.group, {}).get("Desired")
        if current == request.replicas:
            return
        meta = {"model": request.model_name, "version": str(request.version),
                "previous_count": "" if current is None else str(current), "source": "tensoryard",
                "fencing_token": str(request.fence)}
        await self._scale_retrying(target, request, meta)
        log.info("nomad_scaled", job=target.job_id, group=target.group, replicas=request.replicas,
                 previous=current, reason=request.reason)

    async def _scale_retrying(self, target: NomadTarget, request: ScaleRequest, meta: dict[str, str]) -> None:
        delay_s = self.config.nomad_retry_initial_s
        for attempt in range(1, self.config.nomad_max_attempts + 1):
            try:
                await self.api.scale_task_group(target.job_id, target.group, request.replicas, request.reason, meta)
                return
            except NomadError as error:
                if not error.deployment_active or attempt == self.config.nomad_max_attempts:
                    raise
                log.warning("nomad_deployment_active", job=target.job_id, group=target.group,
                            attempt=attempt, retry_in_s=delay_s)
            await self._sleep(delay_s)
            delay_s = min(delay_s * 2, self.config.nomad_retry_max_s)
