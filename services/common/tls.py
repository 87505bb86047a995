"""The admin port: a second listener on the same gRPC server, TLS with client certificates required.

An operator who would rather not hand out a shared admin token gives admins client certificates
instead. The server then listens twice: its usual plaintext port (inference, reads, and admin calls
that carry the token) and an mTLS port where every caller must present a certificate signed by the
configured client CA. On that port an admin method runs when the certificate's subject common name
is one of `admin_subjects`; any other verified certificate may read and infer, like a caller of
the plaintext port.

Why a second port rather than TLS on the only one: workers, routers and `up` talk to each other on
loopback without certificates, and gRPC's server credentials can either require a client
certificate of every caller or not request one at all — no "ask, and trust it if given" mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

DEFAULT_ADMIN_SUBJECT = "tensoryard-admin"


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


def peer_common_names(auth_context: dict) -> set[str]:
    """The verified client certificate's subject common names (empty: no certificate, plaintext)."""
    if auth_context.get("transport_security_type") != [b"ssl"]:
        return set()
    return {name.decode("utf-8", "replace") for name in auth_context.get("x509_common_name", ())}


def client_channel_credentials(ca_file: Path, cert_file: Path, key_file: Path) -> grpc.ChannelCredentials:
    """What a client (the `models` commands) shows the admin port: its certificate and key, and
    the CA to check the server's certificate against."""
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes(),
        private_key=Path(key_file).read_bytes(),
        certificate_chain=Path(cert_file).read_bytes(),
    )
