"""A stand-in for the part of Nomad's HTTP API the `nomad` actuator uses, following Nomad's documents
(developer.hashicorp.com/nomad/api-docs/jobs) and, where they are silent, its server code
(nomad/job_endpoint.go `Job.Scale`, nomad/structs `JobScaleRequest.Validate`). The Nomad binary
cannot be installed here; the actuator is written against the documented API, and this follows it.

What it answers:
- `GET /v1/job/:job_id` (Read Job): the job with its `TaskGroups`, each `Count` and `Scaling`
  (`Min`, `Max`, `Enabled`, as Nomad returns the group's `scaling` block);
- `GET /v1/job/:job_id/scale` (Read Job Scale Status): per group `Desired`, `Placed`, `Running`,
  `Healthy`, `Unhealthy`, `Events` (the scaling events, newest first);
- `POST /v1/job/:job_id/scale` (Scale Task Group), checked in Nomad's order: the token; the payload
  (`Target.Group` present, `Count` >= 0, `Target.Namespace`/`Target.Job` if given match the
  request); the job (404 `job "x" not found`); the group (400); the scaling block's min and max
  (400 "group count was less than scaling policy minimum: 0 < 1", "... greater than ... maximum");
  then an active deployment (400 "job scaling blocked due to active deployment"). A success sets
  the count, raises `JobModifyIndex`, records the event and answers with a new `EvalID`.

Errors are Nomad's: the HTTP status and the message as a plain-text body. With ACLs on (`tokens`
given), a request without a known `X-Nomad-Token` gets 403 "Permission denied". `namespace` is a
query parameter (default "default"); jobs live per namespace.

Simplifications, none of which the actuator relies on: allocations are not simulated (`Placed`,
`Running`, `Healthy` follow `Desired` at once); a deployment is "active" for as many scale requests
as a test says (`block_scaling`), not for a rollout's duration.

Run alone: `python -m tests.support.nomad_standin --port 4646 --job tensoryard-workers:llm-v1=1:1:4`.
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self


@dataclass(slots=True)
class Group:
    name: str
    count: int
    scaling_min: int | None = None  # None: no scaling block
    scaling_max: int | None = None
    scaling_enabled: bool = True

    def as_json(self, job: Job) -> dict[str, Any]:
        scaling = None
        if self.scaling_max is not None:
            scaling = {
                "ID": f"{job.job_id}-{self.name}", "Type": "horizontal", "Namespace": job.namespace,
                "Target": {"Namespace": job.namespace, "Job": job.job_id, "Group": self.name},
                "Min": self.scaling_min, "Max": self.scaling_max, "Policy": None, "Enabled": self.scaling_enabled,
            }
        return {"Name": self.name, "Count": self.count, "Scaling": scaling}


@dataclass(slots=True)
class Job:
    job_id: str
    namespace: str
    groups: dict[str, Group]
    create_index: int
    modify_index: int
    events: dict[str, list[dict]] = field(default_factory=dict)
    # Scale requests still to be refused as if a deployment were active.
    blocked_scale_requests: int = 0

    def as_json(self) -> dict[str, Any]:
        return {
            "ID": self.job_id, "Name": self.job_id, "Namespace": self.namespace, "Type": "service",
            "Status": "running", "Stop": False,
            "TaskGroups": [group.as_json(self) for group in self.groups.values()],
            "CreateIndex": self.create_index, "ModifyIndex": self.modify_index, "JobModifyIndex": self.modify_index,
        }

    def scale_status(self) -> dict[str, Any]:
        return {
            "JobID": self.job_id, "Namespace": self.namespace, "JobStopped": False,
            "JobCreateIndex": self.create_index, "JobModifyIndex": self.modify_index,
            "TaskGroups": {
                name: {"Desired": g.count, "Placed": g.count, "Running": g.count, "Healthy": g.count,
                       "Unhealthy": 0, "Events": list(self.events.get(name, [])) or None}
                for name, g in self.groups.items()
            },
        }


@dataclass(frozen=True, slots=True)
class Recorded:
    """One request as the stand-in received it."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any


class NomadError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class NomadStandin:
    """Nomad's job and scale endpoints on a loopback port, served from a thread (`with` starts it)."""

    def __init__(self, port: int = 0, tokens: set[str] | None = None):
        self.tokens = tokens  # None: ACLs off
        self.jobs: dict[tuple[str, str], Job] = {}
        self.requests: list[Recorded] = []
        self._index = 10
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="nomad-standin",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_) -> None:
        self.stop()

    # What tests set up and look at.

    def add_job(self, job_id: str, groups: list[Group], namespace: str = "default") -> Job:
        with self._lock:
            self._index += 1
            job = Job(job_id, namespace, {g.name: g for g in groups}, self._index, self._index)
            self.jobs[(namespace, job_id)] = job
            return job

    def block_scaling(self, job_id: str, num_requests: int, namespace: str = "default") -> None:
        """The next `num_requests` scale requests meet an active deployment."""
        with self._lock:
            self.jobs[(namespace, job_id)].blocked_scale_requests = num_requests

    def count(self, job_id: str, group: str, namespace: str = "default") -> int:
        with self._lock:
            return self.jobs[(namespace, job_id)].groups[group].count

    def scale_requests(self) -> list[Recorded]:
        with self._lock:
            return [r for r in self.requests if r.method == "POST" and r.path.endswith("/scale")]

    # The API.

    def handle(self, method: str, path: str, query: dict[str, str], headers: dict[str, str], body: Any) -> Any:
        with self._lock:
            self.requests.append(Recorded(method, path, query, headers, body))
            if self.tokens is not None and headers.get("x-nomad-token") not in self.tokens:
                raise NomadError(403, "Permission denied")
            namespace = query.get("namespace", "default")
            parts = path.strip("/").split("/")
            if len(parts) < 3 or parts[:2] != ["v1", "job"]:
                raise NomadError(404, f"Invalid URL path {path}")
            job_id = urllib.parse.unquote(parts[2])
            rest = parts[3:]
            if method == "GET" and not rest:
                return self._job(namespace, job_id, "job not found").as_json()
            if method == "GET" and rest == ["scale"]:
                return self._job(namespace, job_id, "job not found").scale_status()
            if method in ("POST", "PUT") and rest == ["scale"]:
                return self._scale(namespace, job_id, body)
            raise NomadError(405, "Invalid method")

    def _job(self, namespace: str, job_id: str, missing: str) -> Job:
        job = self.jobs.get((namespace, job_id))
        if job is None:
            raise NomadError(404, missing)
        return job

    def _scale(self, namespace: str, job_id: str, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise NomadError(400, "Failed to decode request body")
        target = body.get("Target") or {}
        count = body.get("Count")
        if target.get("Namespace") and target["Namespace"] != namespace:
            raise NomadError(400, "namespace in payload did not match header")
        if target.get("Job") and target["Job"] != job_id:
            raise NomadError(500, "job ID in payload did not match URL")
        group_name = target.get("Group", "")
        if not group_name:
            raise NomadError(400, "missing task group name for scaling action")
        if count is not None and count < 0:
            raise NomadError(400, "scaling action count can't be negative")
        job = self._job(namespace, job_id, f'job "{job_id}" not found')
        group = job.groups.get(group_name)
        if group is None:
            raise NomadError(400, f'task group "{group_name}" specified for scaling does not exist in job')
        event = {"Time": time.time_ns(), "PreviousCount": group.count, "Count": count,
                 "Message": body.get("Message", ""), "Error": bool(body.get("Error")), "Meta": body.get("Meta"),
                 "EvalID": None, "CreateIndex": 0}
        reply: dict[str, Any] = {"Warnings": "", "KnownLeader": True, "LastContact": 0}
        if count is not None:
            if group.scaling_max is not None:
                minimum = group.count if group.scaling_min is None else group.scaling_min
                if count < minimum:
                    raise NomadError(400, f"group count was less than scaling policy minimum: {count} < {minimum}")
                if group.scaling_max < count:
                    raise NomadError(400, f"group count was greater than scaling policy maximum: "
                                          f"{count} > {group.scaling_max}")
            if job.blocked_scale_requests > 0:
                job.blocked_scale_requests -= 1
                raise NomadError(400, "job scaling blocked due to active deployment")
            group.count = count
            self._index += 1
            job.modify_index = self._index
            eval_id = str(uuid.uuid4())
            self._index += 1
            event.update(EvalID=eval_id, CreateIndex=self._index)
            reply.update(EvalID=eval_id, EvalCreateIndex=self._index, JobModifyIndex=job.modify_index)
        else:
            reply["JobModifyIndex"] = job.modify_index
        self._index += 1
        reply["Index"] = self._index
        job.events.setdefault(group_name, []).insert(0, event)
        return reply


def _handler_for(standin: NomadStandin) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def _serve(self, method: str) -> None:
            url = urllib.parse.urlsplit(self.path)
            query = dict(urllib.parse.parse_qsl(url.query))
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = raw
            try:
                answer = standin.handle(method, url.path, query, headers, body)
            except NomadError as error:
                self._send(error.status, error.message.encode(), "text/plain; charset=utf-8")
                return
            self._send(200, json.dumps(answer).encode(), "application/json")

        def _send(self, status: int, payload: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *_) -> None:
            return None

    return Handler


def _parse_job(spec: str) -> tuple[str, list[Group]]:
    """`job:group=count:min:max[,group=...]`."""
    job_id, _, groups = spec.partition(":")
    parsed = []
    for entry in groups.split(","):
        name, _, numbers = entry.partition("=")
        count, minimum, maximum = (int(n) for n in numbers.split(":"))
        parsed.append(Group(name, count, minimum, maximum))
    return job_id, parsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=4646)
    parser.add_argument("--job", action="append", default=[], help="job:group=count:min:max[,group=...]")
    parser.add_argument("--token", action="append", help="an accepted ACL token (ACLs on when given)")
    args = parser.parse_args()
    standin = NomadStandin(args.port, set(args.token) if args.token else None)
    for spec in args.job:
        standin.add_job(*_parse_job(spec))
    print(f"nomad stand-in on {standin.address}", flush=True)
    standin.start()
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        standin.stop()


if __name__ == "__main__":
    main()
