"""Configuration objects, built once per process from flags, environment and file.

Each component gets one frozen dataclass. `build_config` fills it from, highest first:
command-line flags, `TENSORYARD_<FIELD>` environment variables, a TOML file's table named after
the component, then the dataclass defaults. Only `services/cli.py` reads the real environment and
passes it in; nothing below it reads `os.environ`.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

ENV_PREFIX = "TENSORYARD_"


@dataclass(frozen=True, slots=True)
class TelemetryConfig:
    # "auto": JSON lines unless stderr is a terminal.
    log_format: str = "auto"
    log_level: str = "info"
    # Prometheus endpoint; 0 picks a free port, -1 disables it.
    metrics_port: int = 0
    # Access log: the share of successful calls that get an `access` line (failures always do);
    # 0: failures only.
    access_log_sample_rate: float = 1.0
    # Prompts and outputs in access lines (off: they may hold personal data).
    log_prompts: bool = False
    # OTLP/gRPC collector that receives traces ("http://127.0.0.1:4317"); empty: no spans at all.
    # cli.py also takes OpenTelemetry's OTEL_EXPORTER_OTLP_ENDPOINT.
    otlp_endpoint: str = ""
    # Share of new traces sampled while exporting (a caller's sampled flag is followed).
    trace_sample_ratio: float = 1.0

    def __post_init__(self) -> None:
        if self.log_format not in ("auto", "json", "console"):
            raise ValueError(f"log_format must be auto, json or console, not {self.log_format!r}")
        if self.metrics_port < -1 or self.metrics_port > 65535:
            raise ValueError(f"metrics_port must be -1..65535, not {self.metrics_port}")
        for name in ("access_log_sample_rate", "trace_sample_ratio"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {getattr(self, name)}")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    # The admin token (services/common/admin_auth.py): TENSORYARD_ADMIN_TOKEN, or the first line of
    # --admin-token-file. Neither: admin methods are open.
    admin_token: str = ""
    admin_token_file: Path | None = None
    # The admin TLS port (services/common/tls.py): -1 none; else mTLS there (with TlsConfig's
    # certificate, key and client CA), admin methods for client certificates whose subject CN is
    # in admin_subjects. The same subjects may write on an mTLS serving port (tls_mode mtls).
    admin_tls_port: int = -1
    admin_subjects: str = "tensoryard-admin"  # comma-separated

    def __post_init__(self) -> None:
        if self.admin_token and self.admin_token_file is not None:
            raise ValueError("admin_token and admin_token_file: give one, not both")

    @property
    def admin_subject_set(self) -> frozenset[str]:
        return frozenset(name.strip() for name in self.admin_subjects.split(",") if name.strip())

    def admin_tls(self, tls: TlsConfig):
        """The admin TLS listener's settings, or None when there is none."""
        if self.admin_tls_port < 0:
            return None
        if None in (tls.tls_cert_file, tls.tls_key_file, tls.tls_client_ca_file):
            raise ValueError("the admin TLS port needs --tls-cert, --tls-key and --tls-client-ca")
        from services.common.tls import AdminTlsConfig

        return AdminTlsConfig(self.admin_tls_port, tls.tls_cert_file, tls.tls_key_file, tls.tls_client_ca_file,
                              self.admin_subject_set)


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """TLS on the serving port and on the channels to other tensoryard processes
    (services/common/tls.py says what each mode means and how channels follow it)."""

    # off (plaintext) | tls (server certificate) | mtls (and client certificates signed by
    # tls_client_ca_file required of every caller).
    tls_mode: str = "off"
    tls_cert_file: Path | None = None  # this process's certificate chain (PEM): server and client
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None  # the CA bundle client certificates must chain to
    # The CA bundle servers this process calls are checked against (default: tls_client_ca_file,
    # else the system's roots). Given, or tls_mode not off: the channels it opens use TLS.
    tls_ca_file: Path | None = None
    # The name servers' certificates must carry, instead of the host of the address dialled.
    tls_server_name: str = ""

    def __post_init__(self) -> None:
        if self.tls_mode not in ("off", "tls", "mtls"):
            raise ValueError(f"tls_mode must be off, tls or mtls, not {self.tls_mode!r}")
        if self.tls_mode != "off" and (self.tls_cert_file is None or self.tls_key_file is None):
            raise ValueError(f"tls_mode {self.tls_mode} needs --tls-cert and --tls-key (the server's certificate)")
        if self.tls_mode == "mtls" and self.tls_client_ca_file is None:
            raise ValueError("tls_mode mtls needs --tls-client-ca (the CA that signs client certificates)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file: give both or neither")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file", "tls_ca_file"):
            path = getattr(self, name)
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{name}: {path} is not a file")

    def serving(self, admin_subjects: frozenset[str] = frozenset()):
        """The serving port's TLS (services.common.tls.ServingTls), or None for plaintext."""
        if self.tls_mode == "off":
            return None
        from services.common.tls import ServingTls

        client_ca = self.tls_client_ca_file if self.tls_mode == "mtls" else None
        return ServingTls(self.tls_cert_file, self.tls_key_file, client_ca, admin_subjects if client_ca else frozenset())

    def channel_security(self):
        """How this process's channels to other tensoryard processes are made (tls.ChannelSecurity)."""
        from services.common.tls import PLAINTEXT, ChannelSecurity

        if self.tls_mode == "off" and self.tls_ca_file is None:
            return PLAINTEXT
        return ChannelSecurity(True, self.tls_ca_file or self.tls_client_ca_file, self.tls_cert_file,
                               self.tls_key_file, self.tls_server_name)


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    # Where instances register and are found (services/common/discovery_backends.py): "" for the
    # embedded catalog of the registry at registry_address, a registry's host:port, or
    # consul://host:port (consul+https://host:port) for Consul's HTTP API on that agent.
    discovery_url: str = ""
    # Consul ACL token: the first line of --consul-token-file when one is named, else
    # TENSORYARD_CONSUL_TOKEN (cli.py also takes Consul's CONSUL_HTTP_TOKEN, CONSUL_HTTP_TOKEN_FILE).
    consul_token: str = ""
    consul_token_file: Path | None = None

    def __post_init__(self) -> None:
        scheme, sep, _ = self.discovery_url.partition("://")
        if sep and scheme not in ("consul", "consul+https"):
            raise ValueError(f"discovery_url must be host:port, consul://host:port or consul+https://host:port, "
                             f"not {self.discovery_url!r}")


ACTUATORS = ("none", "local", "nomad")


@dataclass(frozen=True, slots=True)
class AutoscaleConfig:
    """The registry's autoscaler (services/autoscale/): how often it decides, the policy's thresholds
    and windows (services/autoscale/policy.py says how each is used), and the actuator. Thresholds
    are per replica; each signal has a scale-up and a lower scale-down threshold (the band between
    them holds the count: hysteresis). Names carry `scale_`/`autoscale_` because nested configs
    share one flat namespace of flags and TENSORYARD_* variables."""

    # "" (off: no autoscaler), "none" (decide and publish only), "local" (the registry's own
    # deployments, which `tensoryard up` runs as child processes) or "nomad" (Nomad's job scale API).
    autoscale_actuator: str = ""
    autoscale_interval_s: float = 15.0
    # KV-cache use (used / total blocks): llm-d calls a replica saturated at 0.8; Dynamo's planner
    # scales decode down below 0.5.
    scale_up_kv_fraction: float = 0.8
    scale_down_kv_fraction: float = 0.5
    # Requests waiting for a seat (llm-d: saturated at 5).
    scale_up_waiting_per_replica: float = 5.0
    scale_down_waiting_per_replica: float = 1.0
    # Prompt tokens not yet computed.
    scale_up_queued_tokens_per_replica: float = 8192.0
    scale_down_queued_tokens_per_replica: float = 2048.0
    # Requests in flight, for replicas that report no seats (embedding models); an LLM replica's
    # seats (max_num_seqs) replace scale_up_in_flight_per_replica, the down threshold in proportion.
    scale_up_in_flight_per_replica: float = 8.0
    scale_down_in_flight_per_replica: float = 2.0
    # Time to first token against the SLO: the replicas' own estimate of the wait before a first
    # token, or an observed p99 where known; scale down only below scale_down_ttft_fraction of it.
    # 0: not a signal.
    ttft_slo_s: float = 1.0
    scale_down_ttft_fraction: float = 0.5
    # A TTFT breach with every load signal under its threshold (a burst) adds this share of the
    # ready replicas per interval, not a count in proportion to the breach.
    scale_up_ttft_step_ratio: float = 0.25
    # Stabilisation, Kubernetes HPA's semantics: act on the lowest recommendation of the last
    # scale_up_window_s when scaling up, the highest of the last scale_down_window_s when down.
    scale_up_window_s: float = 0.0
    scale_down_window_s: float = 300.0
    # After a scale-up, no further one while its replicas are still starting, for at most this long
    # (then they count as failed to start); about a replica's cold start, model load included.
    scale_up_hold_s: float = 120.0
    # At most max(max_step, ceil(ratio * current)) replicas added (removed: floor) per interval.
    max_step_up: int = 4
    max_step_up_ratio: float = 1.0
    max_step_down: int = 1
    max_step_down_ratio: float = 0.1
    # A deployment whose min_replicas is 0 goes to 0 after this long without a request.
    scale_to_zero_idle_s: float = 600.0
    # With --discovery consul://, registries elect the one autoscaler that acts through a Consul
    # session lock (services/autoscale/leader.py): the session's TTL and lock-delay.
    leader_ttl_s: float = 10.0
    leader_lock_delay_s: float = 5.0

    def __post_init__(self) -> None:
        if self.autoscale_actuator not in ("", *ACTUATORS):
            raise ValueError(f"autoscale_actuator must be one of {', '.join(ACTUATORS)} (or empty: off), "
                             f"not {self.autoscale_actuator!r}")
        if self.autoscale_interval_s <= 0:
            raise ValueError(f"autoscale_interval_s must be > 0, not {self.autoscale_interval_s}")
        for signal in ("kv_fraction", "waiting_per_replica", "queued_tokens_per_replica", "in_flight_per_replica"):
            up, down = getattr(self, f"scale_up_{signal}"), getattr(self, f"scale_down_{signal}")
            if not 0 <= down < up:
                raise ValueError(f"scale_down_{signal} ({down}) must be >= 0 and below scale_up_{signal} ({up})")
        if self.scale_up_kv_fraction > 1:
            raise ValueError(f"scale_up_kv_fraction must be at most 1, not {self.scale_up_kv_fraction}")
        if self.scale_up_ttft_step_ratio < 0:
            raise ValueError(f"scale_up_ttft_step_ratio must be >= 0, not {self.scale_up_ttft_step_ratio}")
        if self.ttft_slo_s < 0 or not 0 < self.scale_down_ttft_fraction < 1:
            raise ValueError("ttft_slo_s must be >= 0 and scale_down_ttft_fraction in (0, 1)")
        if self.leader_ttl_s < 1:
            raise ValueError(f"leader_ttl_s must be >= 1 (Consul's own minimum is 10 s), not {self.leader_ttl_s}")
        for name in ("scale_up_window_s", "scale_down_window_s", "scale_to_zero_idle_s", "leader_lock_delay_s",
                     "scale_up_hold_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.max_step_up < 1 or self.max_step_down < 1:
            raise ValueError("max_step_up and max_step_down must be >= 1")
        if self.max_step_up_ratio < 0 or not 0 <= self.max_step_down_ratio <= 1:
            raise ValueError("max_step_up_ratio must be >= 0 and max_step_down_ratio in [0, 1]")


@dataclass(frozen=True, slots=True)
class NomadConfig:
    """The `nomad` actuator (services/autoscale/nomad.py): where Nomad is and which task group runs a
    deployment. Field names carry `nomad_` since nested configs share one flat namespace of flags."""

    nomad_address: str = "http://127.0.0.1:4646"
    # ACL token (X-Nomad-Token): nomad_token, or the first line of nomad_token_file. Neither: no header.
    nomad_token: str = ""
    nomad_token_file: Path | None = None
    nomad_namespace: str = "default"
    nomad_region: str = ""  # empty: the agent's own region
    # (model, version) -> (job id, task group); {model} and {version} are replaced.
    nomad_job_template: str = "tensoryard-workers"
    nomad_group_template: str = "{model}-v{version}"
    # "job scaling blocked due to active deployment": tries in all, and the backoff between them.
    nomad_max_attempts: int = 5
    nomad_retry_initial_s: float = 1.0
    nomad_retry_max_s: float = 10.0
    nomad_request_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.nomad_address.startswith(("http://", "https://")):
            raise ValueError(f"nomad_address must start with http:// or https://, not {self.nomad_address!r}")
        if self.nomad_token and self.nomad_token_file is not None:
            raise ValueError("nomad_token and nomad_token_file: give one, not both")
        for name in ("nomad_job_template", "nomad_group_template"):
            template = getattr(self, name)
            try:
                filled = template.format(model="m", version=1)
            except (KeyError, IndexError, ValueError):
                raise ValueError(f"{name}: {template!r} may name only {{model}} and {{version}}") from None
            if not filled:
                raise ValueError(f"{name} must not be empty")
        if self.nomad_max_attempts < 1:
            raise ValueError(f"nomad_max_attempts must be >= 1, not {self.nomad_max_attempts}")
        if not 0 <= self.nomad_retry_initial_s <= self.nomad_retry_max_s:
            raise ValueError("nomad_retry_initial_s must be >= 0 and at most nomad_retry_max_s")
        if self.nomad_request_timeout_s <= 0:
            raise ValueError(f"nomad_request_timeout_s must be > 0, not {self.nomad_request_timeout_s}")


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    host: str = "127.0.0.1"
    port: int = 7070
    # SQLite database, the blob directory and the resumable-upload spool live here.
    data_dir: Path = Path(".tensoryard/registry")
    # Metadata: "" (data_dir/registry.sqlite3), sqlite:///abs/path or postgresql://user@host:port/db.
    database_url: str = ""
    # Blobs: "" (data_dir/blobs), or s3://bucket/prefix (credentials: the standard AWS variables).
    blob_store: str = ""
    # An S3-compatible endpoint instead of AWS's (MinIO, moto, ...).
    s3_endpoint_url: str = ""
    # Discovery leases expire this long after the last heartbeat unless the instance asks for
    # another TTL.
    default_lease_ttl_ms: int = 10_000
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    nomad: NomadConfig = field(default_factory=NomadConfig)  # the `nomad` actuator's
    # Where the autoscaler and the rollback guard find workers and routers and keep scaling signals:
    # "" for this registry's embedded catalog, or consul://host:port (then several registries elect
    # one acting autoscaler).
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        if self.default_lease_ttl_ms < 100:
            raise ValueError(f"default_lease_ttl_ms must be >= 100, not {self.default_lease_ttl_ms}")
        self.admin.admin_tls(self.tls)  # its files are checked now, not when the server starts


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    model_name: str = ""
    # 0: the latest version.
    model_version: int = 0
    registry_address: str = "127.0.0.1:7070"
    host: str = "127.0.0.1"
    # 0 picks a free port.
    port: int = 0
    # Downloaded model files, content-addressed by sha256.
    cache_dir: Path = Path(".tensoryard/worker-cache")
    device: str = "cpu"
    # torch intra-op threads; 0 leaves torch's default.
    num_threads: int = 0
    lease_ttl_ms: int = 5_000
    warmup_batches: int = 2
    # Serving overrides of the version's own config (0 / empty: keep the version's value).
    max_batch_size: int = 0
    max_queue_delay_us: int = -1
    max_queue_size: int = 0
    # LLM engine overrides (0 / empty: keep the version's value, else the engine's default).
    kv_cache_bytes: int = 0
    max_num_seqs: int = 0
    max_num_batched_tokens: int = 0
    max_model_len: int = 0
    dtype: str = ""
    # LLM weight and KV-cache dtypes (services/worker/models/weight_dtypes.py); empty: the version's
    # `weight_dtype` / `kv_cache_dtype`, else "auto".
    weight_dtype: str = ""
    kv_cache_dtype: str = ""
    # LLM kernels (kernels/ops.py): auto | torch | cpu | triton; empty: the version's `kernels`, else auto.
    kernels: str = ""
    # LLM tensor parallelism: devices (ranks) the model is split over (0: the version's, else 1).
    tensor_parallel_size: int = 0
    # LLM admission control (0: keep the version's value, else the default in services/worker/admission.py).
    max_num_queued_tokens: int = 0
    max_queue_wait_s: float = 0.0
    # On SIGTERM: how long in-flight requests may take to finish before the rest are cut off (and
    # continue on another replica through the router).
    drain_timeout_s: float = 30.0
    # Health is SERVING only while the engine makes progress (a step, or its idle heartbeat) this often.
    progress_timeout_s: float = 5.0
    # Request metadata key naming the tenant, for fair sharing of the engine.
    tenant_metadata_key: str = "x-tenant-id"
    # WorkerControl.InjectFault works only when this is set (fault-injection tests).
    enable_fault_injection: bool = False
    # Largest request or response message the worker takes or sends (larger: RESOURCE_EXHAUSTED).
    max_message_bytes: int = 64 * 1024 * 1024
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("model_name is required (--model-name)")
        if self.model_version < 0:
            raise ValueError(f"model_version must be >= 0, not {self.model_version}")
        _check_port("port", self.port)
        if self.lease_ttl_ms < 100:
            raise ValueError(f"lease_ttl_ms must be >= 100, not {self.lease_ttl_ms}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, not {self.max_message_bytes}")
        for name in ("max_queue_wait_s", "drain_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.progress_timeout_s <= 0:
            raise ValueError(f"progress_timeout_s must be > 0, not {self.progress_timeout_s}")
        self.admin.admin_tls(self.tls)  # its files are checked now, not when the server starts


@dataclass(frozen=True, slots=True)
class RouterConfig:
    host: str = "127.0.0.1"
    port: int = 8001
    registry_address: str = "127.0.0.1:7070"
    # Largest request or response message the router passes through.
    max_message_bytes: int = 64 * 1024 * 1024
    # The models this router serves, comma-separated: it is ready (health SERVING) only while each
    # has a routable replica. Empty: ready once it follows discovery.
    models: str = ""
    # round_robin | least_load | kv_aware | auto (kv_aware for generation models, least_load else).
    routing_policy: str = "auto"
    # Per-model overrides: "model=policy,other=policy".
    model_routing: str = ""
    # kv_aware: cost = kv_overlap_weight * uncached prompt blocks + active blocks; softmax over costs
    # when kv_temperature > 0; the load guard's absolute and relative imbalance. (Weight 4: on the
    # CPU, 1 let the load term outweigh a cached prefix; docs/ARCHITECTURE.md has the figures.)
    kv_overlap_weight: float = 4.0
    kv_temperature: float = 0.0
    # ... in seat occupancy (requests over max_num_seqs): guard when max - min > abs and max > ratio * min.
    load_guard_abs: float = 0.5
    load_guard_ratio: float = 2.0
    # events: follow workers' KV events; approximate: only the prompts this router routed.
    kv_index: str = "events"
    tenant_metadata_key: str = "x-tenant-id"
    session_metadata_key: str = "x-session-id"
    max_in_flight_per_model: int = 4096
    # Retries may add this share of the traffic (plus retry_budget_min_per_s retries a second).
    retry_budget_ratio: float = 0.2
    retry_budget_min_per_s: float = 10.0
    max_migrations: int = 3
    # A replica whose load reports stop for stale_after_s takes no new requests; after
    # migrate_after_s its open generation streams move to another replica.
    stale_after_s: float = 1.0
    migrate_after_s: float = 3.0
    # On SIGTERM: how long in-flight requests get to finish.
    drain_timeout_s: float = 30.0
    # Scale from zero (services/router/cold_start.py): a request for a deployment scaled to zero
    # waits up to this long for its first replica (0: refused at once, as for any model without
    # a replica), at most max_held_per_model of them per model.
    cold_start_hold_s: float = 60.0
    max_held_per_model: int = 256
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    tls: TlsConfig = field(default_factory=TlsConfig)

    def __post_init__(self) -> None:
        _check_port("port", self.port)
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be >= 1024, not {self.max_message_bytes}")
        policies = ("auto", "round_robin", "least_load", "kv_aware")
        if self.routing_policy not in policies:
            raise ValueError(f"routing_policy must be one of {', '.join(policies)}, not {self.routing_policy!r}")
        for model, policy in self.model_policies:
            if policy not in policies:
                raise ValueError(f"model_routing: {model}={policy}: the policy must be one of {', '.join(policies)}")
        if self.kv_index not in ("events", "approximate"):
            raise ValueError(f"kv_index must be events or approximate, not {self.kv_index!r}")
        if self.max_in_flight_per_model < 1:
            raise ValueError(f"max_in_flight_per_model must be >= 1, not {self.max_in_flight_per_model}")
        for name in ("kv_overlap_weight", "kv_temperature", "load_guard_abs", "retry_budget_ratio",
                     "retry_budget_min_per_s", "drain_timeout_s", "cold_start_hold_s", "max_held_per_model"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, not {getattr(self, name)}")
        if self.load_guard_ratio < 1:
            raise ValueError(f"load_guard_ratio must be >= 1, not {self.load_guard_ratio}")
        if not 0 < self.stale_after_s <= self.migrate_after_s:
            raise ValueError("stale_after_s must be > 0 and at most migrate_after_s")

    @property
    def served_models(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.models.split(",") if name.strip())

    @property
    def model_policies(self) -> tuple[tuple[str, str], ...]:
        pairs = []
        for entry in self.model_routing.split(","):
            if not entry.strip():
                continue
            model, sep, policy = entry.partition("=")
            if not sep:
                raise ValueError(f"model_routing: {entry!r} is not model=policy")
            pairs.append((model.strip(), policy.strip()))
        return tuple(pairs)


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"{name} must be 0..65535, not {port}")


def build_config(
    cls: type[T],
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: Path | None = None,
    section: str | None = None,
) -> T:
    """Build `cls` from flags > environment > TOML file section > defaults.

    Flags whose value is None are treated as not given. Nested dataclass fields (telemetry) take
    the same flat names: `--metrics-port` fills `telemetry.metrics_port`.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = env or {}
    file_values: Mapping[str, Any] = {}
    if file is not None:
        document = tomllib.loads(Path(file).read_text())
        file_values = document.get(section or cls.__name__.removesuffix("Config").lower(), {})
    return _fill(cls, flags, env, file_values)


def _fill(cls: type[T], flags: Mapping[str, Any], env: Mapping[str, str], file_values) -> T:
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            values[f.name] = _fill(kind, flags, env, file_values)
            continue
        env_name = ENV_PREFIX + f.name.upper()
        if f.name in flags:
            raw = flags[f.name]
        elif env_name in env:
            raw = env[env_name]
        elif f.name in file_values:
            raw = file_values[f.name]
        else:
            continue
        values[f.name] = _convert(f.name, kind, raw)
    return cls(**values)


def _convert(name: str, kind: Any, raw: Any) -> Any:
    if isinstance(kind, types.UnionType):
        kind = next(k for k in typing.get_args(kind) if k is not type(None))
    try:
        if kind is bool and isinstance(raw, str):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind is Path:
            return Path(raw)
        return kind(raw)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: cannot read {raw!r} as {getattr(kind, '__name__', kind)}") from None
