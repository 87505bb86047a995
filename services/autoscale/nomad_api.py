"""The three Nomad HTTP API calls the `nomad` actuator makes, as Nomad documents them
(developer.hashicorp.com/nomad/api-docs/jobs): Read Job, Read Job Scale Status, Scale Task Group.

python-nomad (2.1) has no call for the job scale endpoint, so this is a small client on the
standard library: JSON in and out, `X-Nomad-Token` when a token is set, `namespace` (and `region`)
as query parameters. Nomad answers an error with its HTTP status and the message as a plain-text
body; each becomes a `NomadError` that keeps both, so callers can tell an active deployment (400,
"job scaling blocked due to active deployment") from a bad token (403) or a missing job (404).
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

# Nomad's message when a scale request meets an active deployment of the job (nomad/job_endpoint.go,
# documented on the Scale Task Group endpoint as "a 400 error if the job has an active deployment").
ACTIVE_DEPLOYMENT_MESSAGE = "job scaling blocked due to active deployment"


class NomadError(Exception):
    """Nomad refused or could not be reached (status 0)."""

    def __init__(self, status: int, message: str, method: str, path: str):
        self.status = status
        self.message = message
        where = f"{method} {path}"
        super().__init__(f"nomad {where}: {status} {message}" if status else f"nomad {where}: {message}")

    @property
    def deployment_active(self) -> bool:
        return self.status == 400 and ACTIVE_DEPLOYMENT_MESSAGE in self.message.lower()


class NomadApi:
    def __init__(self, address: str, token: str = "", namespace: str = "default", region: str = "",
                 timeout_s: float = 10.0):
        self.address = address.rstrip("/")
        self.token = token
        self.namespace = namespace
        self.region = region
        self.timeout_s = timeout_s

    async def read_job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/job/:job_id: the job's specification, task groups and their `Scaling` blocks."""
        return await self._call("GET", f"/v1/job/{_quote(job_id)}")

    async def read_scale_status(self, job_id: str) -> dict[str, Any]:
        """GET /v1/job/:job_id/scale: per task group `Desired`, `Placed`, `Running`, `Healthy`, ..."""
        return await self._call("GET", f"/v1/job/{_quote(job_id)}/scale")

    async def scale_task_group(self, job_id: str, group: str, count: int, message: str,
                               meta: dict[str, Any] | None = None) -> dict[str, Any]:
        """POST /v1/job/:job_id/scale: the group's new count; Nomad answers with the evaluation."""
        body = {"Count": count, "Target": {"Group": group}, "Message": message, "Meta": meta or {}}
        return await self._call("POST", f"/v1/job/{_quote(job_id)}/scale", body)

    async def _call(self, method: str, path: str, body: dict | None = None) -> dict[str, Any]:
        # urllib blocks; one call at a time per decision, so a thread per call is cheap enough.
        return await asyncio.to_thread(self._call_blocking, method, path, body)

    def _call_blocking(self, method: str, path: str, body: dict | None) -> dict[str, Any]:
        query = {"namespace": self.namespace}
        if self.region:
            query["region"] = self.region
        url = f"{self.address}{path}?{urllib.parse.urlencode(query)}"
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if self.token:
            headers["X-Nomad-Token"] = self.token
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as error:
            text = error.read().decode("utf-8", "replace").strip() or error.reason
            raise NomadError(error.code, text, method, path) from None
        except (urllib.error.URLError, OSError) as error:
            reason = getattr(error, "reason", error)
            raise NomadError(0, f"cannot reach {self.address}: {reason}", method, path) from None
        try:
            return json.loads(payload) if payload else {}
        except ValueError:
            raise NomadError(200, f"answer is not JSON: {payload[:200]!r}", method, path) from None


def _quote(job_id: str) -> str:
    return urllib.parse.quote(job_id, safe="")
