"""Tests of the emulator PKI: generation, reuse, re-issue, file modes and real TLS handshakes."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from emulator.certs import CertPaths, ensure_certificates, server_ssl_context
from emulator.errors import CertificateError, ValidationError

TIMEOUT = 10.0


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _ext(
    cert: x509.Certificate, kind: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(kind)


def _not_before(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_before_utc


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_after_utc


def _snapshot(paths: CertPaths) -> dict[str, bytes]:
    return {
        name: getattr(paths, name).read_bytes()
        for name in ("ca_cert", "ca_key", "server_cert", "server_key")
    }


@pytest.fixture(scope="module")
def shared_paths(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """One certificate set for the handshake tests (generation is cheap, but no need to repeat)."""
    return ensure_certificates(tmp_path_factory.mktemp("pki"), ["localhost", "emulator.test"])


# ---------------------------------------------------------------------------- generation


def test_generates_ca_and_server_certificate(tmp_path: Path) -> None:
    state = tmp_path / "nested" / "state"
    before = datetime.datetime.now(datetime.timezone.utc)
    paths = ensure_certificates(state, ["localhost", "dps.example.test"])

    assert paths == CertPaths(
        state / "ca.pem", state / "ca.key", state / "server.pem", state / "server.key"
    )
    ca = _load(paths.ca_cert)
    server = _load(paths.server_cert)

    assert ca.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "dps-mqtt emulator CA"
    )
    assert ca.issuer == ca.subject
    bc = _ext(ca, x509.BasicConstraints)
    assert bc.critical and isinstance(bc.value, x509.BasicConstraints) and bc.value.ca
    ku = _ext(ca, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage) and ku.key_cert_sign and ku.crl_sign
    ca_ski = _ext(ca, x509.SubjectKeyIdentifier).value
    assert isinstance(ca_ski, x509.SubjectKeyIdentifier)
    ca_key = ca.public_key()
    assert isinstance(ca_key, ec.EllipticCurvePublicKey) and ca_key.curve.name == "secp256r1"
    assert _not_after(ca) - before > datetime.timedelta(days=3640)

    assert server.issuer == ca.subject
    server.verify_directly_issued_by(ca)
    assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "localhost"
    san = _ext(server, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "dps.example.test"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    eku = _ext(server, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    server_bc = _ext(server, x509.BasicConstraints).value
    assert isinstance(server_bc, x509.BasicConstraints) and not server_bc.ca
    aki = _ext(server, x509.AuthorityKeyIdentifier).value
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == ca_ski.digest
    server_key = server.public_key()
    assert isinstance(server_key, ec.EllipticCurvePublicKey)
    assert server_key.curve.name == "secp256r1"
    assert before - _not_before(server) > datetime.timedelta(hours=23)
    lifetime = _not_after(server) - _not_before(server)
    assert datetime.timedelta(days=820) < lifetime < datetime.timedelta(days=830)


def test_second_call_reuses_everything(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost"])
    first = _snapshot(paths)
    again = ensure_certificates(tmp_path, ["localhost"])
    assert again == paths
    assert _snapshot(again) == first


def test_subset_of_names_reuses_server_certificate(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost", "other.test"], ["127.0.0.1", "10.0.0.1"])
    first = _snapshot(paths)
    ensure_certificates(tmp_path, ["LOCALHOST"], ["10.0.0.1"])
    assert _snapshot(paths) == first


def test_new_hostname_reissues_server_certificate_with_same_ca(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost"])
    first = _snapshot(paths)
    ensure_certificates(tmp_path, ["localhost", "new.example.test"])
    second = _snapshot(paths)
    assert second["ca_cert"] == first["ca_cert"]
    assert second["ca_key"] == first["ca_key"]
    assert second["server_cert"] != first["server_cert"]
    assert second["server_key"] != first["server_key"]
    server = _load(paths.server_cert)
    server.verify_directly_issued_by(_load(paths.ca_cert))
    san = _ext(server, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert "new.example.test" in san.get_values_for_type(x509.DNSName)


def test_new_ip_address_reissues_server_certificate(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost"])
    first = _snapshot(paths)
    ensure_certificates(tmp_path, ["localhost"], ["192.0.2.7"])
    assert _snapshot(paths)["server_cert"] != first["server_cert"]
    assert _snapshot(paths)["ca_cert"] == first["ca_cert"]


def test_ip_literal_in_hostnames_goes_to_ip_san(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost", "192.0.2.1"], [])
    san = _ext(_load(paths.server_cert), x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.1")]


def test_server_certificate_near_expiry_is_reissued(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost"])
    first = _snapshot(paths)
    expiry = _not_after(_load(paths.server_cert))
    ensure_certificates(tmp_path, ["localhost"], now=expiry - datetime.timedelta(days=2))
    assert _snapshot(paths) == first
    later = expiry - datetime.timedelta(hours=12)
    ensure_certificates(tmp_path, ["localhost"], now=later)
    second = _snapshot(paths)
    assert second["ca_cert"] == first["ca_cert"]
    assert second["server_cert"] != first["server_cert"]
    assert _not_after(_load(paths.server_cert)) > later + datetime.timedelta(days=800)


def test_corrupt_server_certificate_is_reissued(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost"])
    ca_before = paths.ca_cert.read_bytes()
    paths.server_cert.write_bytes(b"not a certificate")
    ensure_certificates(tmp_path, ["localhost"])
    _load(paths.server_cert).verify_directly_issued_by(_load(paths.ca_cert))
    assert paths.ca_cert.read_bytes() == ca_before


def test_server_certificate_of_a_replaced_ca_is_reissued(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost"])
    old_server = paths.server_cert.read_bytes()
    paths.ca_cert.unlink()
    paths.ca_key.unlink()
    ensure_certificates(tmp_path, ["localhost"])
    assert paths.server_cert.read_bytes() != old_server
    _load(paths.server_cert).verify_directly_issued_by(_load(paths.ca_cert))


def test_ca_without_its_key_is_an_error_not_a_silent_new_ca(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost"])
    ca_before = paths.ca_cert.read_bytes()
    paths.ca_key.unlink()
    with pytest.raises(CertificateError, match="unreadable"):
        ensure_certificates(tmp_path, ["localhost"])
    assert paths.ca_cert.read_bytes() == ca_before


def test_ca_key_of_another_ca_is_an_error(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path / "a", ["localhost"])
    other = ensure_certificates(tmp_path / "b", ["localhost"])
    paths.ca_key.write_bytes(other.ca_key.read_bytes())
    with pytest.raises(CertificateError, match="does not belong"):
        ensure_certificates(tmp_path / "a", ["localhost"])


def test_private_keys_are_private_and_no_temp_files_remain(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost"])
    ensure_certificates(tmp_path, ["localhost", "second.test"])
    for key in (paths.ca_key, paths.server_key):
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    for cert in (paths.ca_cert, paths.server_cert):
        assert stat.S_IMODE(os.stat(cert).st_mode) == 0o644
    assert sorted(os.listdir(tmp_path)) == ["ca.key", "ca.pem", "server.key", "server.pem"]


@pytest.mark.parametrize(
    ("hostnames", "ips"),
    [
        ([], ["127.0.0.1"]),
        (["bad host"], []),
        (["under score-."], []),
        (["-leading.test"], []),
        (["héllo.test"], []),
        ("localhost", []),
        (["localhost"], ["999.1.1.1"]),
        (["localhost"], ["not-an-ip"]),
    ],
)
def test_bad_names_raise_validation_error(
    tmp_path: Path, hostnames: list[str], ips: list[str]
) -> None:
    with pytest.raises(ValidationError):
        ensure_certificates(tmp_path, hostnames, ips)


def test_naive_now_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        ensure_certificates(tmp_path, ["localhost"], now=datetime.datetime(2030, 1, 1))


# ---------------------------------------------------------------------------- TLS


def test_server_context_settings(shared_paths: CertPaths) -> None:
    context = server_ssl_context(shared_paths)
    assert context.protocol == ssl.PROTOCOL_TLS_SERVER
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_server_context_without_files_raises(tmp_path: Path) -> None:
    missing = CertPaths(*(tmp_path / name for name in ("a", "b", "c", "d")))
    with pytest.raises(CertificateError):
        server_ssl_context(missing)


def _handshake(
    server_context: ssl.SSLContext, client_context: ssl.SSLContext, server_hostname: str
) -> str:
    """Do a real TLS handshake over loopback TCP and echo one message; return the TLS version."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(TIMEOUT)
    port = listener.getsockname()[1]
    server_errors: list[BaseException] = []

    def serve() -> None:
        try:
            conn, _ = listener.accept()
            conn.settimeout(TIMEOUT)
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(64).upper())
        except (OSError, ssl.SSLError) as exc:
            server_errors.append(exc)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        raw = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
        with raw, client_context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            tls.sendall(b"ping")
            assert tls.recv(64) == b"PING"
            version = tls.version()
    finally:
        thread.join(TIMEOUT)
        listener.close()
    assert not thread.is_alive()
    assert not server_errors, server_errors
    assert version is not None
    return version


def _strict_client(cafile: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cafile))
    assert context.check_hostname and context.verify_mode == ssl.CERT_REQUIRED
    # Python 3.13's default: OpenSSL's strict RFC 5280 checks must pass too.
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    return context


def test_tls_handshake_with_default_client(shared_paths: CertPaths) -> None:
    client = _strict_client(shared_paths.ca_cert)
    version = _handshake(server_ssl_context(shared_paths), client, "localhost")
    assert version in ("TLSv1.2", "TLSv1.3")


def test_tls_handshake_tls12_only_client(shared_paths: CertPaths) -> None:
    client = _strict_client(shared_paths.ca_cert)
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    assert _handshake(server_ssl_context(shared_paths), client, "localhost") == "TLSv1.2"


def test_tls_handshake_with_cadata_like_azure_sdk(shared_paths: CertPaths) -> None:
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.minimum_version = ssl.TLSVersion.TLSv1_2
    client.maximum_version = ssl.TLSVersion.TLSv1_2
    client.load_verify_locations(cadata=shared_paths.ca_cert.read_text("ascii"))
    version = _handshake(server_ssl_context(shared_paths), client, "emulator.test")
    assert version == "TLSv1.2"


def test_tls_handshake_by_ip_address(shared_paths: CertPaths) -> None:
    client = _strict_client(shared_paths.ca_cert)
    _handshake(server_ssl_context(shared_paths), client, "127.0.0.1")


def test_tls_handshake_rejects_name_not_in_certificate(shared_paths: CertPaths) -> None:
    client = _strict_client(shared_paths.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ssl_context(shared_paths), client, "not-in-the-cert.test")


def test_tls_handshake_rejects_foreign_ca(shared_paths: CertPaths, tmp_path: Path) -> None:
    other = ensure_certificates(tmp_path, ["localhost"])
    client = _strict_client(other.ca_cert)
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(server_ssl_context(shared_paths), client, "localhost")
