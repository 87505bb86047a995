"""TLS settings are checked once, when the config is built, and name what is wrong; channels and
the serving port follow them (services/common/tls.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509

from services.common.certificates import ROLES, ensure_mesh_certificates
from services.common.config import RegistryConfig, RouterConfig, TlsConfig, WorkerConfig, build_config
from services.common.tls import PLAINTEXT, client_security
from tests.conftest import REPO_ROOT


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Stand-ins: the config checks that the files are there, gRPC reads them later."""
    names = {"cert": "server.pem", "key": "server.key", "client_ca": "clients-ca.pem", "ca": "ca.pem"}
    paths = {name: tmp_path / file for name, file in names.items()}
    for path in paths.values():
        path.write_text("PEM\n")
    return paths


def mtls(files, **extra) -> dict:
    return {"tls_mode": "mtls", "tls_cert_file": files["cert"], "tls_key_file": files["key"],
            "tls_client_ca_file": files["client_ca"], **extra}


def test_the_default_is_plaintext_everywhere():
    for config in (build_config(RouterConfig), build_config(RegistryConfig), build_config(WorkerConfig, {"model_name": "m"})):
        assert config.tls.tls_mode == "off"
        assert config.tls.serving() is None
        assert config.tls.channel_security() is PLAINTEXT


def test_mtls_without_a_client_ca_is_refused_by_name(files):
    with pytest.raises(ValueError, match="tls_mode mtls needs --tls-client-ca"):
        build_config(RouterConfig, mtls(files, tls_client_ca_file=None))


def test_tls_without_a_certificate_is_refused(files):
    with pytest.raises(ValueError, match="tls_mode tls needs --tls-cert and --tls-key"):
        build_config(RouterConfig, {"tls_mode": "tls", "tls_key_file": files["key"]})


def test_a_missing_file_is_named(files, tmp_path):
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(ValueError, match=f"tls_cert_file: {missing} is not a file"):
        build_config(RouterConfig, mtls(files, tls_cert_file=missing))
    with pytest.raises(ValueError, match="tls_ca_file: .* is not a file"):
        build_config(RouterConfig, {"tls_ca_file": missing})


def test_a_certificate_needs_its_key(files):
    with pytest.raises(ValueError, match="tls_cert_file and tls_key_file: give both or neither"):
        build_config(RouterConfig, {"tls_ca_file": files["ca"], "tls_cert_file": files["cert"]})


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="tls_mode must be off, tls or mtls, not 'on'"):
        TlsConfig(tls_mode="on")


def test_the_admin_tls_port_still_needs_its_three_files(files):
    with pytest.raises(ValueError, match="the admin TLS port needs --tls-cert, --tls-key and --tls-client-ca"):
        build_config(RegistryConfig, {"admin_tls_port": 7443, "tls_cert_file": files["cert"],
                                      "tls_key_file": files["key"]})
    config = build_config(RegistryConfig, {"admin_tls_port": 7443, "tls_cert_file": files["cert"],
                                           "tls_key_file": files["key"], "tls_client_ca_file": files["client_ca"]})
    assert config.admin.admin_tls(config.tls).port == 7443
    assert config.tls.serving() is None  # the serving port stays plaintext unless tls_mode says otherwise


def test_environment_variables_follow_the_config_scheme(files):
    env = {"TENSORYARD_TLS_MODE": "mtls", "TENSORYARD_TLS_CERT_FILE": str(files["cert"]),
           "TENSORYARD_TLS_KEY_FILE": str(files["key"]), "TENSORYARD_TLS_CLIENT_CA_FILE": str(files["client_ca"]),
           "TENSORYARD_TLS_SERVER_NAME": "tensoryard.internal"}
    config = build_config(WorkerConfig, {"model_name": "m"}, env)
    assert config.tls.tls_mode == "mtls" and config.tls.tls_cert_file == files["cert"]
    assert config.tls.channel_security().options() == [("grpc.ssl_target_name_override", "tensoryard.internal")]


def test_an_mtls_process_checks_servers_against_the_client_ca_and_presents_its_certificate(files):
    config = build_config(WorkerConfig, mtls(files, model_name="m"))
    security = config.tls.channel_security()
    assert (security.tls, security.ca_file, security.cert_file, security.key_file) == (
        True, files["client_ca"], files["cert"], files["key"])
    assert security.describe() == "mtls"
    assert build_config(WorkerConfig, mtls(files, model_name="m", tls_ca_file=files["ca"])).tls.channel_security().ca_file == files["ca"]


def test_admin_subjects_apply_on_an_mtls_serving_port_only(files):
    registry = build_config(RegistryConfig, mtls(files, admin_subjects="ops, release-bot"))
    serving = registry.tls.serving(registry.admin.admin_subject_set)
    assert serving.mutual and serving.admin_subjects == frozenset({"ops", "release-bot"})
    server_only = build_config(RegistryConfig, {"tls_mode": "tls", "tls_cert_file": files["cert"],
                                                "tls_key_file": files["key"]})
    serving = server_only.tls.serving(server_only.admin.admin_subject_set)
    assert not serving.mutual and serving.admin_subjects == frozenset()  # the token rule, as on plaintext


def test_a_ca_bundle_alone_makes_a_client_call_with_tls(files):
    args = SimpleNamespace(tls_ca_file=files["ca"], tls_cert_file=None, tls_key_file=None, tls_server_name=None)
    security = client_security(args, {})
    assert security.tls and not security.mutual and security.ca_file == files["ca"]
    assert client_security(SimpleNamespace(), {}) is PLAINTEXT
    from_env = client_security(SimpleNamespace(), {"TENSORYARD_TLS_CA_FILE": str(files["ca"])})
    assert from_env.tls and from_env.ca_file == files["ca"]


def test_the_cli_exits_2_naming_the_problem(files):
    """In a process of its own: the router's modules must not meet tritonclient's protos here."""
    ran = subprocess.run([sys.executable, "-m", "services.cli", "router", "--tls-mode", "mtls",
                          "--tls-cert", str(files["cert"]), "--tls-key", str(files["key"])],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 2
    assert "tls_mode mtls needs --tls-client-ca" in ran.stderr


def test_mesh_certificates_are_made_once_and_chain_to_their_ca(tmp_path):
    mesh = ensure_mesh_certificates(tmp_path / "tls", ("10.0.0.5",))
    ca = x509.load_pem_x509_certificate(mesh.ca_file.read_bytes())
    for role in ROLES:
        cert = x509.load_pem_x509_certificate(mesh.cert_file(role).read_bytes())
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
        assert mesh.key_file(role).stat().st_mode & 0o077 == 0
    admin = x509.load_pem_x509_certificate(mesh.cert_file("admin").read_bytes())
    assert admin.subject.rfc4514_string() == "CN=tensoryard-admin"
    before = mesh.cert_file("router").read_bytes()
    assert ensure_mesh_certificates(tmp_path / "tls").cert_file("router").read_bytes() == before  # kept


def test_missing_certificates_need_the_ca_key_to_be_issued(tmp_path):
    mesh = ensure_mesh_certificates(tmp_path / "tls")
    (tmp_path / "tls" / "ca.key").unlink()
    mesh.cert_file("worker").unlink()
    with pytest.raises(ValueError, match="needs both ca.pem and ca.key"):
        ensure_mesh_certificates(tmp_path / "tls")
