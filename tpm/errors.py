"""Typed errors of the TPM package: every failure a caller can see is one of these."""

from __future__ import annotations


class TpmError(Exception):
    """Base class of every error raised by :mod:`tpm` (a TPM command failed, a key is missing)."""


class TpmUnavailable(TpmError):
    """The TPM cannot be reached through its TCTI (no device, no resource manager, swtpm down).

    ``tcti`` is the TCTI string that was tried, so the message can say where we looked.
    """

    def __init__(self, tcti: str, reason: str) -> None:
        self.tcti = tcti
        self.reason = reason
        super().__init__(f"cannot reach the TPM at {tcti}: {reason}")

    def __reduce__(self) -> tuple[type[TpmUnavailable], tuple[str, str]]:
        return (type(self), (self.tcti, self.reason))


class TpmActivationError(TpmError):
    """An activation blob was well-formed but the TPM refused it.

    Tampered or corrupted contents, a challenge made for another EK or bound to the wrong SRK name,
    or an identity key the TPM will not import. The message carries the TPM's response code text.
    """


class TpmBlobError(TpmError):
    """An activation blob is malformed: truncated, bad size prefixes, trailing bytes, bad TPM2Bs."""
