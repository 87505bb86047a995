"""Where the processes are (discovery) and what their /metrics pages say, fetched concurrently.

Workers are found in the registry's discovery catalog, or in Consul's (`--discovery consul://`):
each publishes its gRPC address and, in its metadata, `metrics_port`. Routers' metrics URLs are
given (`--router-metrics`), else on Consul the passing routers' (their `metrics_port` meta), else
read from the Prometheus file_sd targets `tensoryard up` keeps in
`<home>/prometheus/targets/router.json` (every router of `up --routers N`), else `up`'s default
router metrics port on the registry's host.

A page is parsed once into a `Snapshot`: the family names it declares and its samples by sample
name. Counter samples are keyed by the family's base name (no `_total`): prometheus-client's
parser adds `_total` to every counter sample, Triton-named ones (`nv_inference_request_success`,
exposed without it) included, so one key fits both spellings.
"""

from __future__ import annotations

import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from protos.tensoryard.v1 import discovery_pb2, discovery_pb2_grpc

# `tensoryard up --router-metrics-port` default; routers do not register in discovery.
UP_ROUTER_METRICS_PORT = 8002
# Where `tensoryard up` lists its routers' metrics (services/prometheus.py), under its home.
UP_ROUTER_TARGETS = Path("prometheus") / "targets" / "router.json"
MAX_SCRAPE_THREADS = 32
MAX_PAGE_BYTES = 32 << 20

Labels = dict[str, str]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One parsed /metrics page."""

    # Family names the page declares (counters without `_total`), samples or not: a labelled
    # family nobody has incremented yet is present (its rate is 0), an unknown one is absent.
    families: frozenset[str]
    # Sample name (counters: base name; histograms: `_bucket`, `_count`, `_sum`) -> samples.
    samples: dict[str, list[tuple[Labels, float]]]
    # time.monotonic() midway through the fetch: what rates divide by.
    taken_at_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Scrape:
    url: str
    snapshot: Snapshot | None  # None when the page could not be had
    error: str | None = None


@dataclass(frozen=True, slots=True)
class WorkerInstance:
    worker_id: str
    address: str
    model: str
    version: str
    metrics_url: str | None  # None when the worker publishes no metrics port


@dataclass(frozen=True, slots=True)
class Round:
    """Everything read at one moment: the catalog and every page."""

    workers: list[WorkerInstance]
    discovery_error: str | None
    router_urls: list[str] = field(default_factory=list)
    scrapes: dict[str, Scrape] = field(default_factory=dict)  # by URL, workers' and routers'
    taken_at_unix_s: float = 0.0


def parse(text: str, taken_at_s: float = 0.0) -> Snapshot:
    families: set[str] = set()
    samples: dict[str, list[tuple[Labels, float]]] = {}
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            name = sample.name
            if name.endswith("_created"):
                continue
            if family.type == "counter" and name.endswith("_total"):
                name = name[: -len("_total")]
            samples.setdefault(name, []).append((dict(sample.labels), float(sample.value)))
    return Snapshot(frozenset(families), samples, taken_at_s)


def fetch(url: str, timeout_s: float) -> Scrape:
    started_s = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as reply:
            text = reply.read(MAX_PAGE_BYTES).decode("utf-8", "replace")
        finished_s = time.monotonic()
        return Scrape(url, parse(text, (started_s + finished_s) / 2))
    except Exception as error:  # noqa: BLE001 - any failure means "unreachable", shown, not raised
        return Scrape(url, None, f"{type(error).__name__}: {error}")


def fetch_all(urls: list[str], timeout_s: float) -> dict[str, Scrape]:
    unique = list(dict.fromkeys(urls))
    if not unique:
        return {}
    with ThreadPoolExecutor(min(MAX_SCRAPE_THREADS, len(unique))) as pool:
        return dict(zip(unique, pool.map(lambda url: fetch(url, timeout_s), unique)))


def metrics_url(address: str) -> str:
    """`host:port`, `http://host:port` or a full URL -> the URL of its /metrics page."""
    url = address if "://" in address else f"http://{address}"
    scheme_end = url.index("://") + 3
    return url if "/" in url[scheme_end:] else f"{url}/metrics"


def default_router_metrics(registry: str) -> str:
    return metrics_url(f"{_host(registry)}:{UP_ROUTER_METRICS_PORT}")


def up_router_metrics(home: Path) -> list[str]:
    """The routers `tensoryard up` in `home` lists for Prometheus (file_sd JSON: a list of
    {"targets": ["host:port", ...], "labels": {...}}); [] when there is no such file."""
    try:
        groups = json.loads((home / UP_ROUTER_TARGETS).read_text())
        return [metrics_url(address) for group in groups for address in group.get("targets", ())]
    except (OSError, ValueError, TypeError, AttributeError):
        return []


def list_workers(registry: str, timeout_s: float, security=None) -> tuple[list[WorkerInstance], str | None]:
    """The workers discovery lists, or ([], why) when the registry does not answer. `security`: a
    services.common.tls.ChannelSecurity for a TLS registry (None: plaintext)."""
    try:
        with (security.channel(registry) if security is not None else grpc.insecure_channel(registry)) as channel:
            reply = discovery_pb2_grpc.DiscoveryStub(channel).List(
                discovery_pb2.ListRequest(service="worker"), timeout=timeout_s
            )
    except grpc.RpcError as error:
        return [], f"registry {registry}: {error.code().name}: {error.details()}"
    return [_worker(instance, registry) for instance in reply.instances], None


def list_consul_workers(consul, timeout_s: float) -> tuple[list[WorkerInstance], str | None]:
    """The passing workers in Consul (status/consul_source.py), or ([], why)."""
    try:
        instances = consul.passing("worker", timeout_s)
    except OSError as error:
        return [], f"consul {consul.base_url}: {error}"
    return [_worker(instance, consul.host) for instance in instances], None


def router_metrics_urls(instances) -> list[str]:
    """The /metrics URL of each router discovery lists (records with `address` and `metadata`)."""
    urls = []
    for instance in instances:
        port = instance.metadata.get("metrics_port", "")
        if port and port not in ("-1", "0"):
            urls.append(metrics_url(f"{_host(instance.address)}:{port}"))
    return urls


def consul_router_metrics(consul, timeout_s: float) -> list[str]:
    """The /metrics URLs of the passing routers in Consul ([] when Consul does not answer)."""
    try:
        return router_metrics_urls(consul.passing("router", timeout_s))
    except OSError:
        return []


def take_round(registry: str, router_urls: list[str], timeout_s: float, security=None, consul=None) -> Round:
    """`consul`: a status/consul_source.ConsulSource to list the workers from instead of the registry."""
    if consul is not None:
        workers, discovery_error = list_consul_workers(consul, max(timeout_s, 1.0))
    else:
        workers, discovery_error = list_workers(registry, max(timeout_s, 1.0), security)
    urls = [w.metrics_url for w in workers if w.metrics_url] + list(router_urls)
    return Round(workers, discovery_error, list(router_urls), fetch_all(urls, timeout_s), time.time())


def _worker(instance: discovery_pb2.Instance, registry: str) -> WorkerInstance:
    port = instance.metadata.get("metrics_port", "")
    host = _host(instance.address)
    if host in ("0.0.0.0", "[::]", ""):  # bound to every interface: reach it where the registry is
        host = _host(registry)
    return WorkerInstance(
        worker_id=instance.instance_id,
        address=instance.address,
        model=instance.model_name,
        version=instance.model_version,
        metrics_url=metrics_url(f"{host}:{port}") if port else None,
    )


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0] if ":" in address else address
