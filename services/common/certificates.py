"""Certificates for a local mTLS mesh (`tensoryard up --tls-dir DIR`): a CA and one certificate per role.

The folder holds PEM files: `ca.pem` (and `ca.key` when made here), `<role>.pem` and `<role>.key`
for `registry`, `router`, `worker`, and `admin` (subject CN `tensoryard-admin`: what `up` itself
and an operator's `tensoryard models ...` present to write). Files already there are used as they
are, so an operator may bring their own; missing ones are issued from `ca.key`, which must then be
there too (a new CA is made only in an empty folder). Each role's certificate names the address it
is reached at (SAN IP and `localhost`) and carries both serverAuth and clientAuth usage, since
every process serves and calls. Keys are ECDSA P-256 (gRPC's TLS takes them, and they are made
in milliseconds), written 0600.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

ROLES = ("registry", "router", "worker", "admin")
ADMIN_SUBJECT = "tensoryard-admin"
VALID_DAYS = 365


@dataclass(frozen=True, slots=True)
class MeshCertificates:
    folder: Path

    @property
    def ca_file(self) -> Path:
        return self.folder / "ca.pem"

    def cert_file(self, role: str) -> Path:
        return self.folder / f"{role}.pem"

    def key_file(self, role: str) -> Path:
        return self.folder / f"{role}.key"

    def serve_flags(self, role: str) -> tuple[str, ...]:
        """The flags that run `role` with mTLS on its port and on its calls to the others."""
        return ("--tls-mode", "mtls", "--tls-cert", str(self.cert_file(role)), "--tls-key", str(self.key_file(role)),
                "--tls-client-ca", str(self.ca_file), "--tls-ca", str(self.ca_file))

    def client_flags(self) -> str:
        """What a `tensoryard models ...` or `status` command adds to reach this mesh as an admin."""
        return (f"--tls-ca {self.ca_file} --tls-cert {self.cert_file('admin')} "
                f"--tls-key {self.key_file('admin')}")


def ensure_mesh_certificates(folder: Path, hosts: tuple[str, ...] = ("127.0.0.1",)) -> MeshCertificates:
    """Certificates for every role in `folder`: those present are kept, the missing ones issued."""
    mesh = MeshCertificates(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = [role for role in ROLES if not (mesh.cert_file(role).is_file() and mesh.key_file(role).is_file())]
    if not missing:
        if not mesh.ca_file.is_file():
            raise ValueError(f"tls_dir: {folder} has certificates but no ca.pem to check them against")
        return mesh
    ca_key_file = folder / "ca.key"
    if mesh.ca_file.is_file() != ca_key_file.is_file():
        raise ValueError(f"tls_dir: {folder} lacks {', '.join(f'{r}.pem/.key' for r in missing)}, and issuing "
                         "them needs both ca.pem and ca.key")
    if not mesh.ca_file.is_file():
        _make_ca(mesh.ca_file, ca_key_file)
    for role in missing:
        _issue(role, mesh, ca_key_file, hosts)
    return mesh


def _new_key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write_key(path: Path, key) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(data)


def _write_cert(path: Path, cert) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def _builder(subject: str, issuer, public_key):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))  # clocks a little apart
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS)))


def _make_ca(cert_file: Path, key_file: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tensoryard local CA")])
    cert = (_builder("tensoryard local CA", name, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    _write_key(key_file, key)
    _write_cert(cert_file, cert)


def _issue(role: str, mesh: MeshCertificates, ca_key_file: Path, hosts: tuple[str, ...]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_cert = x509.load_pem_x509_certificate(mesh.ca_file.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_file.read_bytes(), password=None)
    key = _new_key()
    names: list[x509.GeneralName] = [x509.DNSName("localhost")]
    for host in dict.fromkeys((*hosts, "127.0.0.1")):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = ADMIN_SUBJECT if role == "admin" else f"tensoryard-{role}"
    cert = (_builder(subject, ca_cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write_key(mesh.key_file(role), key)
    _write_cert(mesh.cert_file(role), cert)
