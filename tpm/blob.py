"""The DPS TPM activation blob (``authenticationKey``): six TPM2B structures back to back.

Layout (azure-protocol reference 3.4): TPM2B_ID_OBJECT | TPM2B_ENCRYPTED_SECRET | TPM2B_PRIVATE |
TPM2B_ENCRYPTED_SECRET | TPM2B_PUBLIC | TPM2B_DATA. Parsing is strict: every size must fit the
buffer, the first five must be non-empty, the public area must parse, and bytes after the
TPM2B_DATA are rejected. Only the TPM2B_DATA itself may be missing (read as empty), because SDKs
ignore it and a service may leave it out.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import TpmBlobError
from .marshal import Reader, parse_public, split_tpm2b

EMPTY_TPM2B = b"\x00\x00"


@dataclass(frozen=True)
class ActivationBlob:
    """Each field is the marshalled TPM2B *including* its 2-byte size prefix, ready for
    ``tpm2_pytss`` ``TPM2B_*.unmarshal``.
    """

    id_object: bytes
    """TPM2B_ID_OBJECT (MakeCredential's credentialBlob for the EK, bound to the SRK's Name)."""
    encrypted_secret: bytes
    """TPM2B_ENCRYPTED_SECRET (MakeCredential seed, RSA-OAEP to the EK)."""
    duplicate: bytes
    """TPM2B_PRIVATE (the identity key, inner- and outer-wrapped for import under the SRK)."""
    sym_seed: bytes
    """TPM2B_ENCRYPTED_SECRET (duplication seed, RSA-OAEP to the SRK)."""
    public: bytes
    """TPM2B_PUBLIC of the identity (HMAC) key."""
    data: bytes = EMPTY_TPM2B
    """TPM2B_DATA ("encrypted URI data"); SDKs ignore it."""


_REQUIRED = ("id_object", "encrypted_secret", "duplicate", "sym_seed", "public")


def parse_activation_blob(data: bytes) -> ActivationBlob:
    """Split an activation blob into its six TPM2B fields; malformed input raises TpmBlobError."""
    data = bytes(data)
    reader = Reader(data, "activation blob")
    parts: dict[str, bytes] = {}
    for field in _REQUIRED:
        start = reader.pos
        if not reader.tpm2b():
            raise TpmBlobError(f"activation blob: {field} is empty")
        parts[field] = data[start : reader.pos]
    parse_public(parts["public"])
    start = reader.pos
    if start < len(data):
        reader.tpm2b()
        reader.finish()
    parts["data"] = data[start:] or EMPTY_TPM2B
    return ActivationBlob(**parts)


def build_activation_blob(blob: ActivationBlob) -> bytes:
    """Concatenate the six fields, each checked as :func:`parse_activation_blob` checks it."""
    out = bytearray()
    for field in fields(blob):
        value: bytes = getattr(blob, field.name)
        if not split_tpm2b(value, f"activation blob {field.name}") and field.name in _REQUIRED:
            raise TpmBlobError(f"activation blob: {field.name} is empty")
        out += value
    parse_public(blob.public)
    return bytes(out)
