"""X.509 for the emulator: enrolled certificates, the chains devices present, thumbprints, and
certificates issued from a device's CSR.

DPS and the hub decide here whether a certificate chain is acceptable: the leaf's validity at the
emulator's clock, and for enrollment groups a path from the leaf through the certificates the
device presented (signatures, validity, ``basicConstraints`` CA and path length on every issuer)
up to the group's signing certificate. The TLS layer (:mod:`emulator.client_trust`) only filters;
everything Azure would refuse is refused here, with a reason for the log.

Certificate issuance follows Azure's 2025-07-01-preview: a PKCS#10 CSR (base64 DER) whose subject
CN is the registration id and whose key is EC P-384; the emulator's CA signs a 30-day client
certificate, returned as ``issuedCertificateChain`` (leaf first, then the CA).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import re
from collections.abc import Iterable, Sequence
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .certs import CertPaths, _sign_leaf
from .errors import CertificateError, EmulatorError, ValidationError

__all__ = [
    "CSR_API_VERSION",
    "ISSUED_VALIDITY",
    "CertificateIssuer",
    "CertificateRejected",
    "CsrError",
    "certificate_info",
    "certificate_pem",
    "common_name",
    "load_chain",
    "matches_thumbprint",
    "normalise_certificate",
    "parse_csr",
    "pem_certificate_info",
    "thumbprints",
    "verify_chain",
]

#: The first DPS device API version with ``csr`` / ``issuedCertificateChain``.
CSR_API_VERSION = "2025-07-01-preview"
#: How long a certificate issued from a CSR is valid.
ISSUED_VALIDITY = datetime.timedelta(days=30)
#: Issued certificates start this long before "now", for devices whose clock lags a little.
ISSUED_BACKDATE = datetime.timedelta(minutes=5)
#: Longest chain (leaf included) walked up to a signing certificate.
MAX_CHAIN_LENGTH = 8
#: Largest certificate or CSR accepted (DER bytes).
MAX_DER_BYTES = 16 * 1024

_PEM_CERT_RE = re.compile(
    r"-----BEGIN CERTIFICATE-----\s*([A-Za-z0-9+/=\s]+?)\s*-----END CERTIFICATE-----"
)


class CertificateRejected(EmulatorError):
    """A presented certificate or chain is not acceptable; the message says why (for logs)."""


class CsrError(EmulatorError):
    """A certificate signing request DPS cannot sign; the message is for the device."""


# ---------------------------------------------------------------------------- certificates


def _utc(moment: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(moment, tz=datetime.timezone.utc)


def _not_before(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_before_utc", None)
    if isinstance(value, datetime.datetime):
        return value
    naive: datetime.datetime = cert.not_valid_before
    return naive.replace(tzinfo=datetime.timezone.utc)


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    value = getattr(cert, "not_valid_after_utc", None)
    if isinstance(value, datetime.datetime):
        return value
    naive: datetime.datetime = cert.not_valid_after
    return naive.replace(tzinfo=datetime.timezone.utc)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def certificate_pem(cert: x509.Certificate) -> str:
    """The certificate as PEM text."""
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def thumbprints(cert: x509.Certificate) -> tuple[str, str]:
    """SHA-1 and SHA-256 thumbprints, upper-case hex (as Azure shows them)."""
    der = _der(cert)
    return hashlib.sha1(der).hexdigest().upper(), hashlib.sha256(der).hexdigest().upper()


def matches_thumbprint(cert: x509.Certificate, wanted: Iterable[str]) -> bool:
    """Whether the certificate's SHA-1 or SHA-256 thumbprint is among ``wanted`` (any case)."""
    own = set(thumbprints(cert))
    return any(isinstance(t, str) and t.replace(":", "").upper() in own for t in wanted)


def common_name(cert: x509.Certificate | x509.CertificateSigningRequest) -> str | None:
    """The subject's (last) common name, or None."""
    values = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not values:
        return None
    value = values[-1].value
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


def _iso(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def certificate_info(cert: x509.Certificate) -> dict[str, Any]:
    """Azure's ``X509CertificateInfo`` of a certificate."""
    sha1, sha256 = thumbprints(cert)
    return {
        "subjectName": cert.subject.rfc4514_string(),
        "sha1Thumbprint": sha1,
        "sha256Thumbprint": sha256,
        "issuerName": cert.issuer.rfc4514_string(),
        "notBeforeUtc": _iso(_not_before(cert)),
        "notAfterUtc": _iso(_not_after(cert)),
        "serialNumber": format(cert.serial_number, "X"),
        "version": cert.version.value + 1,
    }


def pem_certificate_info(pem: str) -> dict[str, Any]:
    """:func:`certificate_info` of a PEM certificate (as enrollments store them)."""
    return certificate_info(x509.load_pem_x509_certificate(pem.encode("ascii")))


def _is_ca(cert: x509.Certificate) -> tuple[bool, int | None]:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return False, None
    return constraints.ca, constraints.path_length


def _load_text(value: str) -> x509.Certificate:
    """A certificate from PEM text, base64 of DER, or base64 of PEM text."""
    text = value.strip()
    if "-----BEGIN" in text:
        match = _PEM_CERT_RE.search(text)
        if match is None:
            raise ValueError("no PEM CERTIFICATE block")
        text = match.group(1)
    raw = base64.b64decode("".join(text.split()), validate=True)
    if raw.lstrip().startswith(b"-----BEGIN"):
        return _load_text(raw.decode("ascii"))
    if len(raw) > MAX_DER_BYTES:
        raise ValueError(f"larger than {MAX_DER_BYTES} bytes")
    return x509.load_der_x509_certificate(raw)


def normalise_certificate(value: object, field: str, *, ca: bool) -> str:
    """Check an enrolled certificate (PEM, or base64 of DER or PEM) and return it as PEM.

    With ``ca`` (a group's signing certificate) it must be a CA (``basicConstraints`` CA:TRUE).
    Raises only :class:`~emulator.errors.ValidationError`.
    """
    if not isinstance(value, str) or not value.strip():
        raise ValidationError(f"{field} must be a PEM or base64 DER certificate")
    if len(value) > 4 * MAX_DER_BYTES:
        raise ValidationError(f"{field} is too large for a certificate")
    try:
        cert = _load_text(value)
        pem = certificate_pem(cert)
        is_ca, _ = _is_ca(cert)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise ValidationError(f"{field} is not a readable X.509 certificate: {exc}") from exc
    if ca and not is_ca:
        raise ValidationError(
            f"{field} must be a CA certificate (basicConstraints CA:TRUE) to sign devices"
        )
    return pem


def load_chain(chain: Sequence[bytes]) -> list[x509.Certificate]:
    """The DER certificates a device presented (leaf first); :class:`CertificateRejected` if none
    or unreadable."""
    if not chain:
        raise CertificateRejected("no client certificate was presented")
    certs: list[x509.Certificate] = []
    for index, der in enumerate(chain[:MAX_CHAIN_LENGTH]):
        try:
            certs.append(x509.load_der_x509_certificate(der))
        except ValueError as exc:
            raise CertificateRejected(f"certificate {index} of the chain is unreadable") from exc
    return certs


def check_validity(cert: x509.Certificate, now: float, what: str = "the certificate") -> None:
    """:class:`CertificateRejected` unless ``cert`` is valid at ``now`` (POSIX seconds)."""
    moment = _utc(now)
    if moment < _not_before(cert):
        raise CertificateRejected(f"{what} is not valid before {_iso(_not_before(cert))}")
    if moment > _not_after(cert):
        raise CertificateRejected(f"{what} expired at {_iso(_not_after(cert))}")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_chain(
    chain: Sequence[x509.Certificate], anchor: x509.Certificate, now: float
) -> list[x509.Certificate]:
    """Check that ``chain[0]`` leads to ``anchor`` (an enrolled CA or intermediate) through the
    other certificates of ``chain``; return the path (leaf first, anchor last).

    Every certificate on the path must be valid at ``now``, every issuer a CA whose path length
    allows the certificates below it, and every signature correct. :class:`CertificateRejected`
    says what failed.
    """
    if not chain:
        raise CertificateRejected("no client certificate was presented")
    leaf = chain[0]
    check_validity(leaf, now, "the device certificate")
    anchor_der = _der(anchor)
    path = [leaf]
    current = leaf
    pool = list(chain[1:])
    while len(path) <= MAX_CHAIN_LENGTH:
        below = len(path) - 1  # CA certificates between the next issuer and the leaf
        candidates: list[x509.Certificate] = [anchor]
        candidates += [c for c in pool if _der(c) != anchor_der]
        issuer = next((c for c in candidates if _issued_by(current, c)), None)
        if issuer is None:
            raise CertificateRejected(
                f"no certificate issued {current.subject.rfc4514_string()!r} on the way to"
                f" the signing certificate {anchor.subject.rfc4514_string()!r}"
            )
        is_ca, path_length = _is_ca(issuer)
        name = issuer.subject.rfc4514_string()
        if not is_ca:
            raise CertificateRejected(f"issuer {name!r} is not a CA (basicConstraints)")
        if path_length is not None and below > path_length:
            raise CertificateRejected(f"issuer {name!r} allows a path length of {path_length}")
        check_validity(issuer, now, f"issuer {name!r}")
        path.append(issuer)
        if issuer is anchor:
            return path
        pool.remove(issuer)
        current = issuer
    raise CertificateRejected(f"the chain is longer than {MAX_CHAIN_LENGTH} certificates")


# ---------------------------------------------------------------------------- CSR issuance


def parse_csr(value: str, registration_id: str) -> x509.CertificateSigningRequest:
    """Check a register request's ``csr`` (base64 DER PKCS#10): signed by its own key, subject CN
    equal to ``registration_id`` (case-insensitively, as registration ids are) and an EC P-384
    key. :class:`CsrError` says what is wrong."""
    if not isinstance(value, str) or not value:
        raise CsrError("csr must be a base64 DER PKCS#10 certificate signing request")
    try:
        raw = base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CsrError("csr is not valid base64 (base64 DER PKCS#10, no PEM armour)") from exc
    if len(raw) > MAX_DER_BYTES:
        raise CsrError(f"csr is larger than {MAX_DER_BYTES} bytes")
    try:
        csr = x509.load_der_x509_csr(raw)
        signed = csr.is_signature_valid
        key = csr.public_key()
    except (ValueError, TypeError) as exc:
        raise CsrError(f"csr is not a readable DER PKCS#10 request: {exc}") from exc
    if not signed:
        raise CsrError("csr signature does not verify with its own public key")
    name = common_name(csr)
    if name is None or name.lower() != registration_id.lower():
        raise CsrError(
            f"csr subject CN {name!r} must equal the registration id {registration_id!r}"
        )
    if not isinstance(key, ec.EllipticCurvePublicKey):
        kind = type(key).__name__.replace("PublicKey", "").lstrip("_") or "unknown"
        raise CsrError(f"csr key must be EC P-384 (secp384r1); got a {kind} key")
    if not isinstance(key.curve, ec.SECP384R1):
        raise CsrError(f"csr key must be EC P-384 (secp384r1); got curve {key.curve.name}")
    return csr


class CertificateIssuer:
    """Signs device certificates from CSRs with the emulator's CA."""

    def __init__(self, ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey) -> None:
        self.ca_cert = ca_cert
        self._ca_key = ca_key

    @classmethod
    def from_paths(cls, paths: CertPaths) -> CertificateIssuer:
        """The issuer for the emulator CA in ``paths``; :class:`CertificateError` if unreadable."""
        try:
            cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
            key = serialization.load_pem_private_key(paths.ca_key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise CertificateError(f"cannot load the emulator CA {paths.ca_cert}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CertificateError(f"{paths.ca_key} is not an EC private key")
        return cls(cert, key)

    def issue(
        self, csr: x509.CertificateSigningRequest, registration_id: str, now: float
    ) -> list[bytes]:
        """A client certificate for ``csr`` (CN = ``registration_id``, clientAuth, 30 days, never
        beyond the CA's own end); returns the chain as DER, leaf first, then the CA."""
        start = _utc(now)
        validity = (start - ISSUED_BACKDATE, min(start + ISSUED_VALIDITY, _not_after(self.ca_cert)))
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        leaf = _sign_leaf(
            self.ca_cert,
            self._ca_key,
            registration_id,
            public_key,
            validity,
            ExtendedKeyUsageOID.CLIENT_AUTH,
        )
        return [_der(leaf), _der(self.ca_cert)]
