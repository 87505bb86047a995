"""TLS for tensoryard's gRPC: the serving port, the admin port, and the channels between processes.

Serving port (`--tls-mode`, `TlsConfig` in config.py): `off` (plaintext, the default), `tls` (the
server's certificate; callers check it against their CA bundle) or `mtls` (and every caller must
present a client certificate signed by `--tls-client-ca`, else its handshake fails: UNAVAILABLE,
before any method runs). On an mTLS serving port the admin rule is the admin port's: an admin
method runs for a certificate whose subject common name is in `admin_subjects`, or with the admin
token when one is configured; any other verified certificate may read, infer and register in
discovery. On a `tls` or plaintext port only the token opens admin methods (none configured: open).

Admin port (`AdminTlsConfig`, `--admin-tls-port`): a second listener, always mTLS, for fleets whose
serving port is plaintext or `tls` and whose admins use certificates rather than a shared token.
gRPC's server credentials either require a client certificate of every caller or do not ask for
one — there is no "ask, and trust it if given" mode — hence a port of its own.

Channels (`ChannelSecurity`): every channel a tensoryard process opens to another (router to
workers and registry, worker to registry, the registry's autoscaler to workers, `up`, `status`,
`models`) is made from one of these, so the credential logic lives here only. TLS when the process
has `--tls-mode tls|mtls` or a CA bundle (`--tls-ca`); servers are checked against `--tls-ca`
(else `--tls-client-ca`: one CA for the whole mesh, else the system's roots), and the process's own
`--tls-cert`/`--tls-key` are its client certificate (certificates for the mesh carry both
serverAuth and clientAuth usage). A mesh is TLS or plaintext as a whole: a TLS channel cannot talk
to a plaintext port, nor the reverse.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_ADMIN_SUBJECT = "tensoryard-admin"
TLS_MODES = ("off", "tls", "mtls")


@dataclass(frozen=True, slots=True)
class AdminTlsConfig:
    port: int  # 0: any free port
    cert_file: Path  # the server's certificate chain (PEM)
    key_file: Path  # its private key (PEM)
    client_ca_file: Path  # the CA that signs admins' (and other callers') client certificates
    admin_subjects: frozenset[str] = frozenset({DEFAULT_ADMIN_SUBJECT})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"admin TLS port must be 0..65535, not {self.port}")
        for name in ("cert_file", "key_file", "client_ca_file"):
            if not Path(getattr(self, name)).is_file():
                raise ValueError(f"admin TLS {name}: {getattr(self, name)} is not a file")
        if not self.admin_subjects:
            raise ValueError("admin TLS needs at least one admin certificate subject")

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
            root_certificates=Path(self.client_ca_file).read_bytes(),
            require_client_auth=True,
        )


@dataclass(frozen=True, slots=True)
class ServingTls:
    """TLS on the serving port: the server's certificate; with `client_ca_file`, mTLS."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # set: client certificates signed by it are required
    # Who may call admin methods by certificate (mTLS only); empty: no admin check by certificate
    # (the router, which has no admin methods).
    admin_subjects: frozenset[str] = frozenset()

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(Path(self.key_file).read_bytes(), Path(self.cert_file).read_bytes())],
            root_certificates=Path(self.client_ca_file).read_bytes() if self.mutual else None,
            require_client_auth=self.mutual,
        )


@dataclass(frozen=True, slots=True)
class ChannelSecurity:
    """How a channel to another tensoryard process is made: plaintext (the default) or TLS.

    Files are read when a channel is made, not once: a router that meets a new worker after its
    certificate was renewed on disk presents the new one.
    """

    tls: bool = False
    ca_file: Path | None = None  # the servers' CA bundle; None: the system's roots
    cert_file: Path | None = None  # with key_file: the client certificate this process presents
    key_file: Path | None = None
    # Checked against the server's certificate instead of the address's host: for fleets whose
    # certificates name a service (DNS) rather than every node's IP.
    server_name: str = ""

    @property
    def mutual(self) -> bool:
        return self.tls and self.cert_file is not None and self.key_file is not None

    def describe(self) -> str:
        return "mtls" if self.mutual else "tls" if self.tls else "plaintext"

    def credentials(self) -> grpc.ChannelCredentials:
        if not self.tls:
            raise ValueError("a plaintext ChannelSecurity has no credentials")
        return grpc.ssl_channel_credentials(
            root_certificates=Path(self.ca_file).read_bytes() if self.ca_file is not None else None,
            private_key=Path(self.key_file).read_bytes() if self.mutual else None,
            certificate_chain=Path(self.cert_file).read_bytes() if self.mutual else None,
        )

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.tls and self.server_name else []

    def channel(self, address: str, options: Iterable = ()) -> grpc.Channel:
        """A blocking-API channel (the command-line tools, `up`)."""
        options = [*self.options(), *options]
        if not self.tls:
            return grpc.insecure_channel(address, options=options)
        return grpc.secure_channel(address, self.credentials(), options=options)

    def aio_channel(self, address: str, options: Iterable = ()) -> grpc.aio.Channel:
        """An asyncio channel; services use services.common.grpc_server.aio_channel, which adds the
        message-size limits."""
        options = [*self.options(), *options]
        if not self.tls:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, self.credentials(), options=options)


PLAINTEXT = ChannelSecurity()


def add_client_tls_flags(parser) -> None:
    """`--tls-ca`, `--tls-cert`, `--tls-key`, `--tls-server-name` for commands that only call
    (`models`, `status`); defaults from the same TENSORYARD_TLS_* variables the services read."""
    parser.add_argument("--tls-ca", type=Path, dest="tls_ca_file",
                        help="call with TLS, checking the server against this CA bundle (PEM)")
    parser.add_argument("--tls-cert", type=Path, dest="tls_cert_file",
                        help="client certificate to present (mTLS; CN tensoryard-admin may write)")
    parser.add_argument("--tls-key", type=Path, dest="tls_key_file", help="its private key (PEM)")
    parser.add_argument("--tls-server-name", dest="tls_server_name",
                        help="the name the server's certificate must carry (default: the address's host)")


def client_security(args, env) -> ChannelSecurity:
    """The ChannelSecurity a command-line client uses: its flags, else TENSORYARD_TLS_* in `env`."""
    from services.common.config import TlsConfig, build_config

    names = ("tls_ca_file", "tls_cert_file", "tls_key_file", "tls_server_name")
    return build_config(TlsConfig, {name: getattr(args, name, None) for name in names}, env).channel_security()


def peer_common_names(auth_context: dict) -> set[str]:
    """The verified client certificate's subject common names (empty: no certificate, plaintext)."""
    if auth_context.get("transport_security_type") != [b"ssl"]:
        return set()
    return {name.decode("utf-8", "replace") for name in auth_context.get("x509_common_name", ())}


def client_channel_credentials(ca_file: Path, cert_file: Path, key_file: Path) -> grpc.ChannelCredentials:
    """What a client shows an mTLS port: its certificate and key, and the CA to check the server's
    certificate against."""
    return ChannelSecurity(True, ca_file, cert_file, key_file).credentials()
