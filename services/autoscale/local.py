"""The `local` actuator: a decision becomes the deployment's replicas in the registry's own store.

`tensoryard up`'s deployment controller (services/rollout/controller.py) follows ListDeployments
within a second: it starts worker processes under up's supervisor, or stops the newest with SIGTERM,
which drains them (deregister, finish in flight, exit): nothing is lost on the way down.

The write is the store's `scale_deployment`, which checks in its own transaction that the
deployment is still autoscaled and the count within its bounds: an operator who fixed the count
(SetDeployment without autoscale) or undeployed the version since the controller read it wins.
"""

from __future__ import annotations

import asyncio

from services.autoscale.actuator import ScaleRequest
from services.common.telemetry import get_logger

log = get_logger(__name__)

ACTOR = "autoscaler"


class LocalActuator:
    name = "local"

    def __init__(self, store):
        self._store = store  # services/registry/store.py ModelStore

    async def set_replicas(self, request: ScaleRequest) -> None:
        record = await asyncio.to_thread(self._store.scale_deployment, request.model_name, request.version,
                                         request.replicas, request.reason, ACTOR, request.fence)
        if record is None:
            log.info("autoscale_skipped_not_autoscaled", model=request.model_name, version=request.version)
