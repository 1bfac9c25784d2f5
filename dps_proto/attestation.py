"""What the DPS transports need from a TPM, and the base64 glue around it (standard library only).

The ``tpm`` package's ``TpmDevice`` satisfies :class:`TpmProvider`; tests use a software fake.
Keeping the protocol here lets the transports drive TPM attestation without importing tpm2-pytss.
"""

from __future__ import annotations

import base64
import binascii
from typing import Protocol, cast, runtime_checkable

from .errors import DpsError, DpsParseError
from .payloads import TpmAttestation
from .sas import Signer

__all__ = ["TpmProvider", "check_tpm_provider", "decode_activation_blob", "tpm_attestation"]

_METHODS = (
    "endorsement_key",
    "storage_root_key",
    "registration_id",
    "import_activation_blob",
    "signer",
)


@runtime_checkable
class TpmProvider(Protocol):
    """A TPM as DPS attestation sees it: public EK/SRK, the activation-blob import, an HMAC signer.

    Errors a provider raises (the ``tpm`` package's typed errors) pass through the transports
    unchanged.
    """

    def endorsement_key(self) -> bytes:
        """The marshalled TPM2B_PUBLIC of the endorsement key."""
        ...

    def storage_root_key(self) -> bytes:
        """The marshalled TPM2B_PUBLIC of the storage root key."""
        ...

    def registration_id(self) -> str:
        """The registration id derived from the EK (lower-case base32 of its SHA-256)."""
        ...

    def import_activation_blob(self, blob: bytes) -> None:
        """Activate and import an ``authenticationKey`` blob, replacing the identity key."""
        ...

    def signer(self) -> Signer:
        """A signer that HMACs with the imported identity key inside the TPM."""
        ...


def check_tpm_provider(tpm: object) -> TpmProvider:
    """``tpm`` if it has every :class:`TpmProvider` method; else :class:`DpsError` naming gaps."""
    missing = [name for name in _METHODS if not callable(getattr(tpm, name, None))]
    if missing:
        raise DpsError(f"tpm must provide {', '.join(missing)}() (see dps_proto.TpmProvider)")
    return cast(TpmProvider, tpm)


def tpm_attestation(tpm: TpmProvider) -> TpmAttestation:
    """The ``tpm`` part of a register request: base64 of the EK's and SRK's TPM2B_PUBLIC."""
    parts: list[str] = []
    for what, value in (
        ("endorsement_key", tpm.endorsement_key()),
        ("storage_root_key", tpm.storage_root_key()),
    ):
        if not isinstance(value, (bytes, bytearray)) or not value:
            raise DpsError(f"tpm.{what}() must return non-empty bytes (a marshalled TPM2B_PUBLIC)")
        parts.append(base64.b64encode(bytes(value)).decode("ascii"))
    return TpmAttestation(endorsement_key=parts[0], storage_root_key=parts[1])


def decode_activation_blob(authentication_key: str, where: str = "authenticationKey") -> bytes:
    """Decode a base64 activation blob from DPS; :class:`DpsParseError` if it is not one."""
    if not isinstance(authentication_key, str):
        raise DpsParseError(f"{where} must be a base64 string")
    try:
        blob = base64.b64decode(authentication_key.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DpsParseError(f"{where} is not valid base64") from exc
    if not blob:
        raise DpsParseError(f"{where} is empty")
    return blob
