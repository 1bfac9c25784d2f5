"""Test PKI, made fresh in each test (nothing is checked in): CAs, intermediates, device
certificates and PEM files of them for X.509 attestation, and the TLS material of test servers."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode("ascii")

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def write(self, directory: Path, name: str, *chain: Issued) -> tuple[str, str]:
        """Write ``name.pem`` (this certificate, then ``chain``) and ``name.key``; their paths."""
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_text(self.pem + "".join(c.pem for c in chain))
        key_path.write_bytes(self.key_pem)
        return str(cert_path), str(key_path)


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


def make_cert(
    common_name: str,
    *,
    issuer: Issued | None = None,
    ca: bool = False,
    path_length: int | None = None,
    not_before: datetime.datetime | None = None,
    not_after: datetime.datetime | None = None,
    server: bool = False,
) -> Issued:
    """A certificate for ``common_name`` signed by ``issuer`` (None: self-signed); a CA with
    ``ca``, a localhost / 127.0.0.1 server certificate with ``server``, else a client certificate
    (clientAuth)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.cert.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - DAY)
        .not_valid_after(not_after or now + 2 * DAY)
        .add_extension(
            x509.BasicConstraints(ca=ca, path_length=path_length if ca else None), critical=True
        )
        .add_extension(_key_usage(ca=ca), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        ).add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        if issuer is not None:
            builder = builder.add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
                critical=False,
            )
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer.key if issuer else key, hashes.SHA256())
    return Issued(cert, key)


def expired(common_name: str, issuer: Issued | None = None) -> Issued:
    """A client certificate that expired yesterday."""
    now = _now()
    return make_cert(common_name, issuer=issuer, not_before=now - 10 * DAY, not_after=now - DAY)


@dataclass(frozen=True)
class Pki:
    """PEM files of a test CA, an unrelated CA, and a server certificate for localhost."""

    ca_file: str
    wrong_ca_file: str
    server_cert: str
    server_key: str


def make_pki(directory: Path, ca_name: str = "dps-mqtt test CA") -> Pki:
    """Write a fresh CA, a wrong CA and a localhost server certificate into ``directory``."""
    ca = make_cert(ca_name, ca=True)
    wrong_ca = make_cert("some other CA", ca=True)
    server_cert, server_key = make_cert("localhost", issuer=ca, server=True).write(
        directory, "server"
    )
    (directory / "ca.pem").write_text(ca.pem)
    (directory / "wrong-ca.pem").write_text(wrong_ca.pem)
    return Pki(
        ca_file=str(directory / "ca.pem"),
        wrong_ca_file=str(directory / "wrong-ca.pem"),
        server_cert=server_cert,
        server_key=server_key,
    )
