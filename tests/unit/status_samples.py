"""Hand-written metrics pages and discovery rounds for the `tensoryard status` tests."""

from __future__ import annotations

from services.status.scrape import Round, Scrape, WorkerInstance, parse

EMBEDDER = "all-MiniLM-L6-v2"
LLM = "SmolLM2-135M-Instruct"
LATENCY_BOUNDS = ("0.005", "0.01", "0.05", "0.1", "0.5", "1.0", "+Inf")


def worker(worker_id: str, model: str, port: int, version: str = "1") -> WorkerInstance:
    return WorkerInstance(worker_id, f"127.0.0.1:{port}", model, version, f"http://127.0.0.1:{port + 1}/metrics")


def _histogram(name: str, counts: tuple[float, ...], labels: str = "") -> list[str]:
    lines = [f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{{labels}le="{le}"}} {c}' for le, c in zip(LATENCY_BOUNDS, counts)]
    return lines + [f"{name}_count{{{labels.rstrip(',')}}} {counts[-1]}", f"{name}_sum{{{labels.rstrip(',')}}} 0"]


def worker_page(model: str, successes: float, failures: float = 0, latency: tuple[float, ...] | None = None,
                ttft: tuple[float, ...] | None = None, tokens: float | None = None, waiting: float | None = None,
                kv: float | None = None, serving: int | None = 1, phase: str | None = "ready",
                e2e: tuple[float, ...] | None = None) -> str:
    """A worker's page as docs/METRICS.md promises it; None leaves a family out. `latency` feeds
    the gRPC Embed histogram, `e2e` the LLM's, cumulative counts over LATENCY_BOUNDS."""
    ids = f'model="{model}",version="1",worker="w"'
    lines = ["# TYPE nv_inference_request_success counter", f"nv_inference_request_success{{{ids}}} {successes}",
             "# TYPE nv_inference_request_failure counter",
             f'nv_inference_request_failure{{{ids},reason="BACKEND"}} {failures}']
    if latency is not None:
        lines += _histogram("tensoryard_grpc_request_duration_seconds", latency,
                            'grpc_service="tensoryard.v1.Embeddings",grpc_method="Embed",')
    if e2e is not None:
        lines += _histogram("tensoryard:e2e_request_latency_seconds", e2e, f"{ids},")
    if ttft is not None:
        lines += _histogram("tensoryard:time_to_first_token_seconds", ttft, f"{ids},")
    if tokens is not None:
        lines += ["# TYPE tensoryard:generation_tokens_total counter",
                  f"tensoryard:generation_tokens_total{{{ids}}} {tokens}"]
    if waiting is not None:
        lines += ["# TYPE tensoryard:num_requests_waiting gauge", f"tensoryard:num_requests_waiting{{{ids}}} {waiting}"]
    if kv is not None:
        lines += ["# TYPE tensoryard:kv_cache_usage_perc gauge", f"tensoryard:kv_cache_usage_perc{{{ids}}} {kv}"]
    if serving is not None:
        lines += ["# TYPE tensoryard_worker_serving gauge", f"tensoryard_worker_serving {serving}"]
    if phase is not None:
        lines += ["# TYPE tensoryard_worker_phase gauge"]
        lines += [f'tensoryard_worker_phase{{phase="{p}"}} {int(p == phase)}' for p in ("loading", "ready", "stalled")]
    return "\n".join(lines) + "\n"


def router_page(*series: tuple[str, str, float, float]) -> str:
    """(model, version, successes, failures) per series."""
    lines = ["# TYPE nv_inference_request_success counter"]
    lines += [f'nv_inference_request_success{{model="{m}",version="{v}"}} {s}' for m, v, s, _ in series]
    lines += ["# TYPE nv_inference_request_failure counter"]
    lines += [f'nv_inference_request_failure{{model="{m}",version="{v}",reason="REJECTED"}} {e}'
              for m, v, _, e in series]
    return "\n".join(lines) + "\n"


def round_of(pages: dict[WorkerInstance, str | None], at_s: float, routers: dict[str, str | None] | None = None,
             discovery_error: str | None = None) -> Round:
    """A round in which each worker's (and router's) page read as given; None: unreachable."""
    scrapes = {}
    for url, text in [*((w.metrics_url, t) for w, t in pages.items()), *(routers or {}).items()]:
        scrapes[url] = Scrape(url, parse(text, at_s) if text is not None else None,
                              None if text is not None else "URLError: connection refused")
    return Round(list(pages), discovery_error, list(routers or {}), scrapes, 1_700_000_000.0 + at_s)
