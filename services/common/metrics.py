"""The Prometheus endpoint every process serves, and the one kind of family prometheus-client lacks.

Exposition is always Prometheus' classic text format (0.0.4), whatever a scraper's `Accept` asks
for: Triton's `nv_inference_*` counters carry no `_total` suffix, which the text format allows and
OpenMetrics does not (an OpenMetrics counter's samples must end in `_total`). prometheus-client's
own HTTP server answers OpenMetrics to a client that prefers it (Prometheus does), and its text
writer names every counter's HELP and TYPE lines `<name>_total`, so a suffixless counter would
read as an untyped series. Here a `SuffixlessCounter` family is written as Triton writes it
(`# TYPE nv_inference_request_success counter`, samples of that very name); every other family is
written by prometheus-client. The process collector and everything else on the default registry
come out unchanged.
"""

from __future__ import annotations

import gzip
import threading
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, generate_latest
from prometheus_client.core import Metric
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class SuffixlessCounter(Metric):
    """A counter family whose samples carry the family's own name, no `_total` (Triton's style)."""

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...]):
        super().__init__(name, documentation, "counter")
        self.name = name  # Metric drops a trailing "_total" from counter names; keep the name as given
        self._labelnames = labels

    def add_metric(self, label_values, value: float) -> None:
        self.samples.append(Sample(self.name, dict(zip(self._labelnames, label_values)), float(value)))


# Triton's nv_inference_* counters and their help texts, as Triton writes them. Workers export them
# all (from their statistics recorder), routers the ones that count what they forwarded.
TRITON_COUNTERS = {
    "nv_inference_request_success": "Number of successful inference requests, all batch sizes",
    "nv_inference_request_failure": "Number of failed inference requests, all batch sizes",
    "nv_inference_count": "Number of inferences performed (does not include cached requests)",
    "nv_inference_exec_count": "Number of model executions performed (does not include cached requests)",
    "nv_inference_request_duration_us": "Cumulative inference request duration in microseconds "
                                        "(includes cached requests)",
    "nv_inference_queue_duration_us": "Cumulative inference queuing duration in microseconds "
                                      "(includes cached requests)",
    "nv_inference_compute_input_duration_us": "Cumulative compute input duration in microseconds "
                                              "(does not include cached requests)",
    "nv_inference_compute_infer_duration_us": "Cumulative compute inference duration in microseconds "
                                              "(does not include cached requests)",
    "nv_inference_compute_output_duration_us": "Cumulative inference compute output duration in microseconds "
                                               "(does not include cached requests)",
}


def triton_counter(name: str, labels: tuple[str, ...]) -> SuffixlessCounter:
    return SuffixlessCounter(name, TRITON_COUNTERS[name], labels)


class _Families:
    """A collector of families already collected (generate_latest takes anything with collect())."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self):
        return self._families


def render(registry=REGISTRY) -> bytes:
    """The registry's families in the text format, suffixless counters as Triton writes them."""
    out: list[bytes] = []
    plain: list[Metric] = []
    for family in registry.collect():
        if isinstance(family, SuffixlessCounter):
            out.append(_suffixless_lines(family))
        else:
            plain.append(family)
    out.insert(0, generate_latest(_Families(plain)))
    return b"".join(out)


def _suffixless_lines(family: SuffixlessCounter) -> bytes:
    lines = [
        f"# HELP {family.name} {_escape_help(family.documentation)}\n",
        f"# TYPE {family.name} counter\n",
    ]
    for sample in family.samples:
        labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in sorted(sample.labels.items()))
        lines.append(f"{sample.name}{{{labels}}} {floatToGoString(sample.value)}\n" if labels
                     else f"{sample.name} {floatToGoString(sample.value)}\n")
    return "".join(lines).encode()


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _escape_label(value: str) -> str:
    return str(value).replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape in progress never holds the process open


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format, *args):
        pass  # a scrape every few seconds is not worth a log line


def metrics_app(registry=REGISTRY):
    """A WSGI app answering every path (but /favicon.ico) with the registry in the text format."""

    def app(environ, start_response):
        if environ.get("PATH_INFO") == "/favicon.ico":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b""]
        body = render(registry)
        headers = [("Content-Type", CONTENT_TYPE)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [body]

    return app


def serve_metrics(port: int, host: str = "127.0.0.1", registry=REGISTRY) -> int:
    """Serves /metrics from a daemon thread; returns the port (port 0: one the OS picks)."""
    server = make_server(host, port, metrics_app(registry), _ThreadingServer, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server.server_port
