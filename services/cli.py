"""`tensoryard`: the one command line for every process and for operators.

    tensoryard up                      registry + router + demo model workers on loopback
    tensoryard registry | router | worker --model-name NAME
    tensoryard models push NAME FOLDER --task embedding   (also: import, list, show, alias, diff, rm)
    tensoryard models list [--json]
    tensoryard status [--once] [--json]   models, replicas, req/s, latency, TTFT, tokens/s, queue, KV

This is the only module that reads the process environment; it builds each component's config
once (flags > TENSORYARD_* environment > --config file > defaults) and passes it down.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from services.common.config import RegistryConfig, RouterConfig, WorkerConfig, build_config
from services.models_cli.parser import add_models_commands


def _add_telemetry_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--metrics-port", type=int, dest="metrics_port",
                        help="Prometheus /metrics port (0: any free port, -1: off)")
    parser.add_argument("--log-format", choices=("auto", "json", "console"), dest="log_format")
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"), dest="log_level")
    parser.add_argument("--access-log-sample-rate", type=float, dest="access_log_sample_rate",
                        help="share of successful calls that get an access line (failures always do; 0: none)")
    parser.add_argument("--log-prompts", action="store_const", const=True, dest="log_prompts",
                        help="put prompts and outputs in access lines (off by default: personal data)")
    parser.add_argument("--otlp-endpoint", dest="otlp_endpoint",
                        help="OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317 (default: "
                             "$OTEL_EXPORTER_OTLP_ENDPOINT; unset: no traces)")
    parser.add_argument("--trace-sample-ratio", type=float, dest="trace_sample_ratio",
                        help="share of new traces sampled when exporting (default 1)")
    parser.add_argument("--config", type=Path, help="TOML file with [registry], [router], [worker] tables")


def _add_admin_token_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin-token-file", type=Path, dest="admin_token_file",
                        help="file whose first line is the admin token (else $TENSORYARD_ADMIN_TOKEN; "
                             "neither: admin methods are open)")


def _add_admin_tls_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--admin-tls-port", type=int, dest="admin_tls_port",
                        help="also listen here with TLS and required client certificates; admin methods "
                             "for certificates whose subject CN is in --admin-subjects (-1, default: no)")
    parser.add_argument("--admin-subjects", dest="admin_subjects",
                        help="client certificate common names that may call admin methods, on the admin TLS "
                             "port and an mTLS serving port (default tensoryard-admin)")


def _add_tls_flags(parser: argparse.ArgumentParser) -> None:
    """The serving port's TLS and the channels to other processes (services/common/tls.py)."""
    parser.add_argument("--tls-mode", choices=("off", "tls", "mtls"), dest="tls_mode",
                        help="the serving port: off (plaintext, default), tls, or mtls (client certificates "
                             "signed by --tls-client-ca required); not off: calls to other processes use TLS")
    parser.add_argument("--tls-cert", type=Path, dest="tls_cert_file",
                        help="this process's certificate (PEM): served, and presented as its client certificate")
    parser.add_argument("--tls-key", type=Path, dest="tls_key_file", help="its private key (PEM)")
    parser.add_argument("--tls-client-ca", type=Path, dest="tls_client_ca_file",
                        help="the CA that signs client certificates (PEM; mtls and the admin TLS port)")
    parser.add_argument("--tls-ca", type=Path, dest="tls_ca_file",
                        help="CA bundle the servers this process calls are checked against (default: "
                             "--tls-client-ca); given: those calls use TLS")
    parser.add_argument("--tls-server-name", dest="tls_server_name",
                        help="the name servers' certificates must carry (default: the host dialled)")


def _add_discovery_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--discovery", dest="discovery_url", metavar="URL",
                        help="where to register and find instances: consul://host:port (Consul's HTTP API) "
                             "or a registry's host:port (default: the embedded catalog of --registry)")
    parser.add_argument("--consul-token-file", type=Path, dest="consul_token_file",
                        help="file whose first line is the Consul ACL token (else $CONSUL_HTTP_TOKEN)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tensoryard", description="AI inference: registry, router, workers.")
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser("up", help="run registry, router and demo model workers on loopback")
    up.add_argument("--home", type=Path, help="state and logs (default: $TENSORYARD_HOME or ./.tensoryard)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--router-port", type=int, default=8001)
    up.add_argument("--router-metrics-port", type=int, default=8002)
    up.add_argument("--registry-port", type=int, default=7070)
    up.add_argument("--registry-metrics-port", type=int, default=7071)
    up.add_argument("--workers-per-model", type=int, default=1)
    up.add_argument("--routers", type=int, default=1,
                    help="router processes sharing the router port (more forwarding than one process)")
    up.add_argument("--worker-threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    up.add_argument("--no-llm", action="store_true", help="serve the embedding demo only")
    up.add_argument("--no-embedding", action="store_true", help="serve the LLM demo only")
    up.add_argument("--prometheus", action="store_true",
                    help="also run Prometheus (if installed) with deploy/prometheus's config and rules")
    up.add_argument("--prometheus-port", type=int, default=9090, help="0: any free port (one in use: a free one)")
    up.add_argument("--no-metrics", action="store_true",
                    help="no metrics endpoint or Prometheus observations in any process (ModelStatistics still counts)")
    up.add_argument("--autoscale", action="store_true",
                    help="the registry autoscales the demo deployments (local actuator: worker processes here)")
    up.add_argument("--min-replicas", type=int, default=1, help="with --autoscale: the fewest workers per model")
    up.add_argument("--max-replicas", type=int, default=4, help="with --autoscale: the most workers per model")
    up.add_argument("--autoscale-interval-s", type=float, help="with --autoscale: seconds between decisions")
    up.add_argument("--tls-dir", type=Path, metavar="DIR",
                    help="mTLS between and into every process, with the CA and certificates in DIR "
                         "(made there when missing; an operator's own are used as they are)")

    registry = sub.add_parser("registry", help="run the model registry and embedded discovery")
    registry.add_argument("--host")
    registry.add_argument("--port", type=int)
    registry.add_argument("--data-dir", type=Path, dest="data_dir")
    registry.add_argument("--database-url", dest="database_url",
                          help="metadata: sqlite:///abs/path or postgresql://user@host:port/db "
                               "(default: a SQLite file in --data-dir)")
    registry.add_argument("--blob-store", dest="blob_store",
                          help="blobs: s3://bucket/prefix (default: --data-dir/blobs on local disk)")
    registry.add_argument("--s3-endpoint-url", dest="s3_endpoint_url",
                          help="S3-compatible endpoint for --blob-store (default: AWS)")
    registry.add_argument("--autoscale", dest="autoscale_actuator", choices=("none", "local", "nomad"),
                          help="run the autoscaler with this actuator (none: publish decisions only); "
                               "thresholds and windows: TENSORYARD_SCALE_* (docs/ARCHITECTURE.md, Autoscaling)")
    registry.add_argument("--autoscale-interval-s", type=float, dest="autoscale_interval_s")
    _add_discovery_flags(registry)
    _add_admin_token_flag(registry)
    _add_admin_tls_flags(registry)
    _add_tls_flags(registry)
    _add_telemetry_flags(registry)

    router = sub.add_parser("router", help="run the router (inference.GRPCInferenceService)")
    router.add_argument("--host")
    router.add_argument("--port", type=int)
    router.add_argument("--registry", dest="registry_address")
    router.add_argument("--models", help="models this router serves, comma-separated: ready only while each has a replica")
    router.add_argument("--routing-policy", dest="routing_policy",
                        choices=("auto", "round_robin", "least_load", "kv_aware"))
    router.add_argument("--model-routing", dest="model_routing", help="per-model policies: model=policy,...")
    router.add_argument("--kv-index", dest="kv_index", choices=("events", "approximate"),
                        help="kv_aware: follow workers' KV events, or only the prompts this router routed")
    router.add_argument("--kv-overlap-weight", type=float, dest="kv_overlap_weight")
    router.add_argument("--kv-temperature", type=float, dest="kv_temperature")
    router.add_argument("--max-in-flight-per-model", type=int, dest="max_in_flight_per_model")
    router.add_argument("--max-migrations", type=int, dest="max_migrations")
    router.add_argument("--stale-after-s", type=float, dest="stale_after_s")
    router.add_argument("--migrate-after-s", type=float, dest="migrate_after_s")
    router.add_argument("--drain-timeout-s", type=float, dest="drain_timeout_s")
    router.add_argument("--cold-start-hold-s", type=float, dest="cold_start_hold_s",
                        help="how long a request for a deployment scaled to zero waits for its first replica (0: refuse)")
    router.add_argument("--max-held-per-model", type=int, dest="max_held_per_model")
    router.add_argument("--max-message-bytes", type=int, dest="max_message_bytes")
    _add_discovery_flags(router)
    _add_tls_flags(router)
    _add_telemetry_flags(router)

    worker = sub.add_parser("worker", help="serve one model version")
    worker.add_argument("--model-name", dest="model_name")
    worker.add_argument("--model-version", type=int, dest="model_version", help="0: latest")
    worker.add_argument("--registry", dest="registry_address")
    worker.add_argument("--host")
    worker.add_argument("--port", type=int)
    worker.add_argument("--cache-dir", type=Path, dest="cache_dir")
    worker.add_argument("--device")
    worker.add_argument("--num-threads", type=int, dest="num_threads")
    worker.add_argument("--max-batch-size", type=int, dest="max_batch_size")
    worker.add_argument("--max-queue-delay-us", type=int, dest="max_queue_delay_us")
    worker.add_argument("--max-queue-size", type=int, dest="max_queue_size")
    worker.add_argument("--kv-cache-bytes", type=int, dest="kv_cache_bytes", help="LLM KV-cache budget")
    worker.add_argument("--max-num-seqs", type=int, dest="max_num_seqs", help="LLM sequences running at once")
    worker.add_argument("--max-num-batched-tokens", type=int, dest="max_num_batched_tokens",
                        help="LLM tokens computed per engine step")
    worker.add_argument("--max-model-len", type=int, dest="max_model_len", help="LLM prompt + output tokens")
    worker.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), dest="dtype")
    worker.add_argument("--weight-dtype", choices=("auto", "float32", "bfloat16", "float16", "int8", "int4"),
                        dest="weight_dtype", help="LLM weights; int8/int4: weight-only quantized at load")
    worker.add_argument("--kv-cache-dtype", choices=("auto", "float32", "bfloat16", "float16"),
                        dest="kv_cache_dtype", help="LLM KV cache")
    worker.add_argument("--kernels", "--backend", choices=("auto", "torch", "cpu", "triton"), dest="kernels",
                        help="LLM kernels: torch (the reference), cpu (the compiled CPU decode kernel), triton; "
                             "auto: triton on CUDA, else cpu where it is built, else torch")
    worker.add_argument("--tensor-parallel-size", type=int, dest="tensor_parallel_size",
                        help="LLM: split the model over this many devices (cuda:k.. of --device cuda:k)")
    worker.add_argument("--max-num-queued-tokens", type=int, dest="max_num_queued_tokens",
                        help="LLM admission: prompt tokens that may wait")
    worker.add_argument("--max-queue-wait-s", type=float, dest="max_queue_wait_s",
                        help="LLM admission: refuse requests whose estimated wait is longer")
    worker.add_argument("--drain-timeout-s", type=float, dest="drain_timeout_s",
                        help="on SIGTERM, how long in-flight requests get before they are cut off")
    worker.add_argument("--progress-timeout-s", type=float, dest="progress_timeout_s",
                        help="NOT_SERVING when the engine makes no progress for this long")
    worker.add_argument("--tenant-metadata-key", dest="tenant_metadata_key")
    worker.add_argument("--enable-fault-injection", action="store_const", const=True, dest="enable_fault_injection",
                        help="allow WorkerControl.InjectFault (tests only)")
    worker.add_argument("--max-message-bytes", type=int, dest="max_message_bytes",
                        help="largest request or response message (default 64 MiB)")
    _add_admin_token_flag(worker)
    _add_admin_tls_flags(worker)
    _add_tls_flags(worker)
    _add_discovery_flags(worker)
    _add_telemetry_flags(worker)

    add_models_commands(sub, _add_admin_token_flag)

    status = sub.add_parser(
        "status", help="live view of models, replicas and their figures, from the processes' metrics",
        description="Rates and p50/p99 are taken over a window between two scrapes of the workers' "
                    "(found in discovery) and routers' /metrics, so even --once takes --interval seconds.",
    )
    status.add_argument("--registry", default="127.0.0.1:7070", help="where discovery lists the workers")
    status.add_argument("--router-metrics", action="append", default=[], metavar="URL",
                        help="a router's metrics (URL or host:port; repeatable). Routers are not in "
                             "discovery; default: the routers `up` lists under --home, else `up`'s "
                             "router metrics port 8002 on the registry's host")
    status.add_argument("--home", type=Path, help="the `up` home whose router targets to read "
                                                  "(default: $TENSORYARD_HOME or ./.tensoryard)")
    status.add_argument("--interval", type=float, default=2.0, metavar="S",
                        help="seconds between the two scrapes a figure is computed from, and between "
                             "refreshes (default 2)")
    status.add_argument("--timeout", type=float, default=1.0, metavar="S", help="per metrics page (default 1)")
    status.add_argument("--once", action="store_true",
                        help="one snapshot, then exit: two scrapes --interval apart, not one")
    status.add_argument("--json", action="store_true",
                        help="print the snapshot as JSON (implies --once; shape in services/status/__init__.py)")
    from services.common.tls import add_client_tls_flags

    add_client_tls_flags(status)  # the registry call (metrics pages are plain HTTP)
    status.add_argument("--discovery", dest="discovery_url", metavar="URL",
                        help="consul://host:port: list workers and routers from Consul instead of --registry")
    status.add_argument("--consul-token-file", type=Path, dest="consul_token_file",
                        help="file whose first line is the Consul ACL token (else $CONSUL_HTTP_TOKEN)")
    return parser


def _flags(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in ("command", "config")}


def with_otel_conventions(env: dict[str, str]) -> dict[str, str]:
    """OpenTelemetry's OTEL_EXPORTER_OTLP_ENDPOINT as the OTLP endpoint, below TENSORYARD_OTLP_ENDPOINT."""
    if "OTEL_EXPORTER_OTLP_ENDPOINT" in env:
        return {"TENSORYARD_OTLP_ENDPOINT": env["OTEL_EXPORTER_OTLP_ENDPOINT"], **env}
    return env


def with_consul_conventions(env: dict[str, str]) -> dict[str, str]:
    """Consul's own CONSUL_HTTP_TOKEN (else CONSUL_HTTP_TOKEN_FILE, as Consul's client orders them),
    below TENSORYARD_CONSUL_TOKEN; --consul-token-file wins over both."""
    if "TENSORYARD_CONSUL_TOKEN" in env or "TENSORYARD_CONSUL_TOKEN_FILE" in env:
        return env
    if env.get("CONSUL_HTTP_TOKEN"):
        return {"TENSORYARD_CONSUL_TOKEN": env["CONSUL_HTTP_TOKEN"], **env}
    if env.get("CONSUL_HTTP_TOKEN_FILE"):
        return {"TENSORYARD_CONSUL_TOKEN_FILE": env["CONSUL_HTTP_TOKEN_FILE"], **env}
    return env


def _run_service(args: argparse.Namespace, env: dict[str, str]) -> int:
    from services.common.telemetry import configure_telemetry

    env = with_consul_conventions(with_otel_conventions(env))

    if args.command == "registry":
        from services.registry.server import serve

        config = build_config(RegistryConfig, _flags(args), env, args.config)
    elif args.command == "router":
        from services.router.server import serve

        config = build_config(RouterConfig, _flags(args), env, args.config)
    else:
        from services.worker.server import serve

        config = build_config(WorkerConfig, _flags(args), env, args.config)
    configure_telemetry(args.command, config.telemetry)
    return asyncio.run(serve(config)) or 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    env = dict(os.environ)
    try:
        if args.command == "up":
            from services.launcher import Launcher, UpOptions, default_home
            from services.prometheus import find_binary as find_prometheus

            options = UpOptions(
                home=(args.home or default_home(env)).resolve(),
                host=args.host,
                registry_port=args.registry_port,
                router_port=args.router_port,
                router_metrics_port=args.router_metrics_port,
                registry_metrics_port=args.registry_metrics_port,
                workers_per_model=args.workers_per_model,
                routers=args.routers,
                worker_threads=args.worker_threads,
                with_llm=not args.no_llm,
                with_embedding=not args.no_embedding,
                prometheus=args.prometheus,
                prometheus_binary=find_prometheus(env.get("PATH")) if args.prometheus else None,
                prometheus_port=args.prometheus_port,
                metrics=not args.no_metrics,
                autoscale=args.autoscale,
                min_replicas=args.min_replicas,
                max_replicas=args.max_replicas,
                autoscale_interval_s=args.autoscale_interval_s,
                tls_dir=args.tls_dir,
            )
            return Launcher(options, env).run()
        if args.command == "models":
            from services.models_cli import run_models_command

            return run_models_command(args, env)
        if args.command == "status":
            from services.common.tls import client_security
            from services.launcher import default_home
            from services.status.command import StatusOptions, run

            return run(StatusOptions(
                registry=args.registry, router_metrics=tuple(args.router_metrics),
                home=(args.home or default_home(env)).resolve(), interval_s=args.interval,
                timeout_s=args.timeout, once=args.once, json=args.json, security=client_security(args, env),
                consul=_status_consul(args, env),
            ))
        return _run_service(args, env)
    except ValueError as error:  # config errors name the field
        print(f"tensoryard: {error}", file=sys.stderr)
        return 2


def _status_consul(args, env: dict[str, str]):
    """`status --discovery consul://...`'s source (None: the registry's catalog)."""
    if not args.discovery_url:
        return None
    from services.common.discovery_backends import read_consul_token
    from services.status.consul_source import ConsulSource

    env = with_consul_conventions(env)
    token_file = args.consul_token_file or (Path(env["TENSORYARD_CONSUL_TOKEN_FILE"])
                                            if env.get("TENSORYARD_CONSUL_TOKEN_FILE") else None)
    token = read_consul_token(env.get("TENSORYARD_CONSUL_TOKEN", ""), token_file)
    return ConsulSource.from_url(args.discovery_url, token)


if __name__ == "__main__":
    sys.exit(main())
