"""The emulator's own PKI: a local CA and a TLS server certificate it signs, kept on disk.

The CA is generated once and reused forever (devices and SDKs are told to trust ``ca.pem``); the
server certificate is re-issued by the same CA whenever it nears expiry or lacks a requested name.
Certificates carry the extensions OpenSSL 3's strict verification (``VERIFY_X509_STRICT``, the
default since Python 3.13) insists on: critical basicConstraints and keyUsage, SKI, AKI, a SAN.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import CertificateError, ValidationError

__all__ = ["CertPaths", "ensure_certificates", "server_ssl_context"]

logger = logging.getLogger(__name__)

CA_COMMON_NAME = "dps-mqtt emulator CA"
CA_VALIDITY = datetime.timedelta(days=3650)
SERVER_VALIDITY = datetime.timedelta(days=825)
#: Certificates start this long before "now", to tolerate clocks that lag behind.
BACKDATE = datetime.timedelta(days=1)
#: A server certificate expiring sooner than this is replaced.
RENEW_MARGIN = datetime.timedelta(days=1)
#: A CA expiring sooner than this is replaced (clients must then trust the new ``ca.pem``).
CA_RENEW_MARGIN = datetime.timedelta(days=30)

_IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME_RE = re.compile(rf"(?:\*\.)?{_LABEL}(?:\.{_LABEL})*\.?")


@dataclass(frozen=True)
class CertPaths:
    """Where the emulator's CA and server certificate and keys live (all PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    """``not_valid_after`` as an aware UTC datetime, on old and new ``cryptography`` alike."""
    value = getattr(cert, "not_valid_after_utc", None)
    if isinstance(value, datetime.datetime):
        return value
    naive: datetime.datetime = cert.not_valid_after
    return naive.replace(tzinfo=datetime.timezone.utc)


def _not_before(cert: x509.Certificate) -> datetime.datetime:
    """``not_valid_before`` as an aware UTC datetime, on old and new ``cryptography`` alike."""
    value = getattr(cert, "not_valid_before_utc", None)
    if isinstance(value, datetime.datetime):
        return value
    naive: datetime.datetime = cert.not_valid_before
    return naive.replace(tzinfo=datetime.timezone.utc)


def _normalise_names(
    hostnames: Sequence[str], ip_addresses: Sequence[str]
) -> tuple[list[str], list[_IPAddress]]:
    """Validate the requested names; IP literals given as host names count as IP addresses."""
    if isinstance(hostnames, str) or isinstance(ip_addresses, str):
        raise ValidationError("hostnames and ip_addresses must be sequences, not strings")
    if not hostnames:
        raise ValidationError("at least one hostname is required for the server certificate")
    dns: list[str] = []
    ips: list[_IPAddress] = []
    for name in hostnames:
        if not isinstance(name, str):
            raise ValidationError(f"hostname {name!r} must be a string")
        try:
            ip = ipaddress.ip_address(name)
        except ValueError:
            if len(name) > 253 or not _DNS_NAME_RE.fullmatch(name):
                raise ValidationError(f"hostname {name!r} is not a valid DNS name") from None
            lowered = name.lower().rstrip(".")
            if lowered not in dns:
                dns.append(lowered)
        else:
            if ip not in ips:
                ips.append(ip)
    for text in ip_addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            raise ValidationError(f"ip address {text!r} is not a valid IP address") from None
        if ip not in ips:
            ips.append(ip)
    return dns, ips


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` through a temp file and ``os.replace``; never a half file."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    return key


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _generate_ca(now: datetime.datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False
        )
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """keyCertSign and cRLSign for a CA; digitalSignature only for an end entity."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _sign_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    validity: tuple[datetime.datetime, datetime.datetime],
    usage: x509.ObjectIdentifier,
    *extensions: x509.ExtensionType,
) -> x509.Certificate:
    """An end-entity certificate for ``public_key`` signed by the CA: CN ``common_name``, valid
    ``validity`` (not before, not after), the one extended key ``usage``, any further
    (non-critical) ``extensions``, and subject and authority key identifiers."""
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(validity[0])
        .not_valid_after(validity[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return (
        builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _issue_server(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    dns: list[str],
    ips: list[_IPAddress],
    now: datetime.datetime,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    common_name = (dns or [str(ip) for ip in ips])[0]
    if len(common_name) > 64:
        common_name = "dps-mqtt emulator"
    san: list[x509.GeneralName] = [x509.DNSName(name) for name in dns]
    san += [x509.IPAddress(ip) for ip in ips]
    validity = (now - BACKDATE, min(now + SERVER_VALIDITY, _not_after(ca_cert)))
    cert = _sign_leaf(
        ca_cert,
        ca_key,
        common_name,
        key.public_key(),
        validity,
        ExtendedKeyUsageOID.SERVER_AUTH,
        x509.SubjectAlternativeName(san),
    )
    return cert, key


def _load_ca(
    paths: CertPaths, now: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None:
    """The stored CA, or ``None`` when there is none (or it has expired) and one must be made.

    A present but unreadable CA is an error, never silently replaced: clients trust that file.
    """
    if not paths.ca_cert.exists():
        return None
    try:
        cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
        key = _load_key(paths.ca_key)
    except (OSError, ValueError, TypeError) as exc:
        raise CertificateError(
            f"the emulator CA in {paths.ca_cert.parent} is unreadable ({exc}); delete ca.pem and"
            " ca.key to create a new CA (clients must then trust the new ca.pem)"
        ) from exc
    if not _same_public_key(cert, key):
        raise CertificateError(
            f"{paths.ca_key} does not belong to {paths.ca_cert}; delete both to create a new CA"
        )
    if _not_after(cert) - now < CA_RENEW_MARGIN:
        logger.warning("the emulator CA %s has (nearly) expired; creating a new CA", paths.ca_cert)
        return None
    return cert, key


def _server_reusable(
    paths: CertPaths,
    ca_cert: x509.Certificate,
    dns: list[str],
    ips: list[_IPAddress],
    now: datetime.datetime,
) -> bool:
    """Whether the stored server certificate is from this CA, valid for a while, and names all."""
    try:
        cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
        key = _load_key(paths.server_key)
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, TypeError, InvalidSignature, x509.ExtensionNotFound):
        return False
    if not _same_public_key(cert, key):
        return False
    if _not_before(cert) > now or _not_after(cert) - now <= RENEW_MARGIN:
        return False
    have_dns = {name.lower() for name in san.get_values_for_type(x509.DNSName)}
    have_ips = set(san.get_values_for_type(x509.IPAddress))
    return set(dns) <= have_dns and set(ips) <= have_ips


def ensure_certificates(
    state_dir: Path,
    hostnames: Sequence[str],
    ip_addresses: Sequence[str] = ("127.0.0.1", "::1"),
    *,
    now: datetime.datetime | None = None,
) -> CertPaths:
    """Make sure ``state_dir`` holds a CA and a server certificate for these names; return paths.

    The CA is created on first use and then kept. The server certificate (CN = first host name,
    SAN = all host names and IPs) is kept while it is valid for more than a day and covers every
    requested name, otherwise re-issued by the same CA. ``now`` (aware UTC) is for tests.
    """
    dns, ips = _normalise_names(hostnames, ip_addresses)
    moment = now or _utcnow()
    if moment.tzinfo is None:
        raise ValidationError("now must be a timezone-aware datetime")
    state_dir = Path(state_dir)
    try:
        state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise CertificateError(f"cannot create the state directory {state_dir}: {exc}") from exc
    paths = CertPaths(
        ca_cert=state_dir / "ca.pem",
        ca_key=state_dir / "ca.key",
        server_cert=state_dir / "server.pem",
        server_key=state_dir / "server.key",
    )
    try:
        loaded = _load_ca(paths, moment)
        if loaded is None:
            ca_cert, ca_key = _generate_ca(moment)
            # Key first: a crash in between leaves no ca.pem, so the next run starts over.
            _write_atomic(paths.ca_key, _key_pem(ca_key), 0o600)
            _write_atomic(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
            logger.info("created the emulator CA %s", paths.ca_cert)
        else:
            ca_cert, ca_key = loaded
        if not _server_reusable(paths, ca_cert, dns, ips, moment):
            cert, key = _issue_server(ca_cert, ca_key, dns, ips, moment)
            _write_atomic(paths.server_key, _key_pem(key), 0o600)
            _write_atomic(paths.server_cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
            logger.info(
                "issued the emulator server certificate %s for %s",
                paths.server_cert,
                ", ".join([*dns, *(str(ip) for ip in ips)]),
            )
    except OSError as exc:
        raise CertificateError(f"cannot write certificates in {state_dir}: {exc}") from exc
    return paths


def server_ssl_context(paths: CertPaths) -> ssl.SSLContext:
    """A TLS server context with the emulator's certificate; TLS 1.2 and 1.3 (SDKs need 1.2)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certfile=str(paths.server_cert), keyfile=str(paths.server_key))
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"cannot load the server certificate {paths.server_cert}: {exc}"
        ) from exc
    return context
