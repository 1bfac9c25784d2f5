"""A local mosquitto broker with TLS for transport tests, and the PKI it serves.

The broker listens on two free loopback ports: TLS (for the client under test) and plain TCP
(for test-side peers such as a fake DPS or a fake hub). It can be stopped and started again on
the same ports, and (with ``persistence=True``) keeps persistent sessions and queued QoS 1
messages across such a restart. Every process started here is stopped by :meth:`Mosquitto.stop`.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)


# -- TLS material -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    """A test CA, an unrelated CA, and a server certificate for localhost / 127.0.0.1."""

    ca_file: str
    wrong_ca_file: str
    server_cert: str
    server_key: str


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_cert(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write_cert(path: Path, cert: x509.Certificate) -> str:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path)


def make_pki(directory: Path) -> Pki:
    """Write a fresh CA, a wrong CA and a localhost server certificate into ``directory``."""
    ca_key, ca_cert = _ca("dps-mqtt test CA")
    _, wrong_ca = _ca("some other CA")
    server_key, server_cert = _server_cert(ca_key, ca_cert)
    key_path = directory / "server.key"
    key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return Pki(
        ca_file=_write_cert(directory / "ca.pem", ca_cert),
        wrong_ca_file=_write_cert(directory / "wrong-ca.pem", wrong_ca),
        server_cert=_write_cert(directory / "server.pem", server_cert),
        server_key=str(key_path),
    )


# -- mosquitto --------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, process: subprocess.Popen[bytes], log_file: Path) -> None:
    """Wait (at most 10 s) until ``process`` accepts connections on ``port``."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log_file.read_text() if log_file.exists() else ""
            pytest.fail(f"mosquitto exited with {process.returncode}:\n{text}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail("mosquitto did not start listening within 10 s")


class Mosquitto:
    """One mosquitto process (started by :meth:`start` or ``with``), restartable on its ports."""

    def __init__(self, pki: Pki, directory: Path, *, persistence: bool = False) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed")
        self.tls_port = free_port()
        self.plain_port = free_port()
        self.log_file = directory / "mosquitto.log"
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        lines = [
            f"pid_file {directory / 'mosquitto.pid'}",
            f"log_dest file {self.log_file}",
            "log_type all",
            "set_tcp_nodelay true",
            "allow_anonymous true",
            f"listener {self.tls_port} 127.0.0.1",
            f"cafile {pki.ca_file}",
            f"certfile {pki.server_cert}",
            f"keyfile {pki.server_key}",
            f"listener {self.plain_port} 127.0.0.1",
        ]
        if persistence:
            lines += ["persistence true", f"persistence_location {directory}/"]
        else:
            lines.append("persistence false")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Otherwise mosquitto drops to user 'mosquitto', who cannot read the temporary files.
            lines.insert(0, "user root")
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        """Start the broker and wait until both listeners accept connections."""
        assert self.process is None, "already running"
        assert MOSQUITTO is not None
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.starts += 1
        try:
            wait_listening(self.tls_port, self.process, self.log_file)
            wait_listening(self.plain_port, self.process, self.log_file)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the broker (SIGTERM: it saves its persistence file), killing it if needed."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart(self) -> None:
        """Stop, then start again on the same ports."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
