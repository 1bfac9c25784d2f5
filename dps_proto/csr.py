"""Certificate issuance through DPS (api-version 2025-07-01-preview): the ``csr`` a device sends
when it registers, and the ``issuedCertificateChain`` it gets back.

:func:`csr_base64` and :func:`chain_pem` use the standard library only. Making a key and a CSR is
the caller's business (a secure element, OpenSSL, ...); :func:`generate_key_and_csr` is a
convenience that needs the ``cryptography`` package (imported when called). DPS's preview wants
an EC P-384 key and the registration id as the subject CN.
"""

from __future__ import annotations

import base64
import binascii
import re
import textwrap
from collections.abc import Sequence

from .errors import DpsError

__all__ = [
    "CSR_API_VERSION",
    "api_version_supports_csr",
    "chain_pem",
    "csr_base64",
    "generate_key_and_csr",
]

#: The first DPS device API version with ``csr`` and ``issuedCertificateChain``.
CSR_API_VERSION = "2025-07-01-preview"
#: A CSR larger than this is refused before it is sent.
MAX_CSR_BYTES = 16 * 1024

_PEM_CSR_RE = re.compile(
    r"-----BEGIN (?:NEW )?CERTIFICATE REQUEST-----([A-Za-z0-9+/=\s]*)"
    r"-----END (?:NEW )?CERTIFICATE REQUEST-----"
)


def api_version_supports_csr(api_version: str) -> bool:
    """Whether a DPS ``api-version`` (``YYYY-MM-DD[-preview]``) knows ``csr``."""
    return api_version[:10] >= CSR_API_VERSION[:10]


def csr_base64(csr: bytes | str) -> str:
    """A PKCS#10 request as DPS wants it in ``csr``: base64 of the DER, no PEM armour.

    Takes DER bytes, PEM (bytes or text) or base64 DER text; :class:`DpsError` if it is none of
    them. Only the framing is checked here; DPS checks the request itself.
    """
    if isinstance(csr, (bytes, bytearray)):
        data = bytes(csr)
        if not data.lstrip().startswith(b"-----BEGIN"):
            der = data
            return _checked(der)
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise DpsError("csr is neither DER nor PEM") from exc
    elif isinstance(csr, str):
        text = csr
    else:
        raise DpsError("csr must be bytes (DER or PEM) or str (PEM or base64 DER)")
    match = _PEM_CSR_RE.search(text)
    body = match.group(1) if match is not None else text
    if match is None and "-----BEGIN" in text:
        raise DpsError("csr PEM must be a CERTIFICATE REQUEST block")
    try:
        der = base64.b64decode("".join(body.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DpsError("csr is neither PEM nor base64 DER") from exc
    return _checked(der)


def _checked(der: bytes) -> str:
    if not der or der[0] != 0x30:  # a DER SEQUENCE
        raise DpsError("csr is not a DER PKCS#10 request")
    if len(der) > MAX_CSR_BYTES:
        raise DpsError(f"csr is larger than {MAX_CSR_BYTES} bytes")
    return base64.b64encode(der).decode("ascii")


def chain_pem(issued_certificate_chain: Sequence[str]) -> bytes:
    """DPS's ``issuedCertificateChain`` (base64 DER, leaf first) as one PEM file, leaf first:
    what ``client_cert`` of the hub clients takes (with the key in ``client_key``)."""
    if isinstance(issued_certificate_chain, str) or not issued_certificate_chain:
        raise DpsError("issuedCertificateChain must be a non-empty list of base64 certificates")
    blocks: list[str] = []
    for index, item in enumerate(issued_certificate_chain):
        try:
            der = base64.b64decode("".join(str(item).split()), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DpsError(f"issuedCertificateChain[{index}] is not base64") from exc
        if not der:
            raise DpsError(f"issuedCertificateChain[{index}] is empty")
        body = "\n".join(textwrap.wrap(base64.b64encode(der).decode("ascii"), 64))
        blocks.append(f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
    return "".join(blocks).encode("ascii")


def generate_key_and_csr(registration_id: str) -> tuple[bytes, bytes]:
    """A new EC P-384 private key (PEM, PKCS#8, unencrypted) and a CSR for it (DER) with subject
    CN = ``registration_id``, as DPS's certificate issuance wants. Needs ``cryptography``."""
    if not isinstance(registration_id, str) or not registration_id:
        raise DpsError("registration_id must be a non-empty string")
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as exc:  # pragma: no cover - cryptography is in every extra
        raise DpsError("generate_key_and_csr needs the 'cryptography' package") from exc
    key = ec.generate_private_key(ec.SECP384R1())
    try:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_id)]))
            .sign(key, hashes.SHA384())
        )
    except ValueError as exc:
        raise DpsError(f"cannot make a CSR for {registration_id!r}: {exc}") from exc
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, csr.public_bytes(serialization.Encoding.DER)
