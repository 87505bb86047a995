"""How a scaling decision is carried out: the seam between the controller and what runs processes.

- `local`: the registry's deployments (SetDeployment), which `tensoryard up`'s local deployment
  controller (services/rollout/controller.py) turns into worker child processes;
- `nomad`: Nomad's job scale API (services/autoscale/nomad.py);
- `none`: the decision is only published (scaling signals), for an external autoscaler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class ScaleRequest:
    model_name: str
    version: int
    replicas: int  # the desired count, already within the deployment's min and max
    reason: str  # one sentence, for the audit log and the actuator's own record (Nomad's Message)
    # The leader lock's fencing token (services/autoscale/leader.py): what acts refuses a lower one
    # than it has seen, so a deposed leader's late action cannot undo the new leader's.
    fence: int = 1


class Actuator(Protocol):
    name: str

    async def set_replicas(self, request: ScaleRequest) -> None:
        """Make `request.replicas` replicas run (or ask whatever runs them to). Raises on a failure
        the controller should retry at its next interval."""
        ...


class NoActuator:
    """`none`: decisions are published, nothing is run."""

    name = "none"

    async def set_replicas(self, request: ScaleRequest) -> None:
        return None
