"""TPM 2.0 attestation the way Azure DPS does it.

Device side (needs the ``tpm`` extra, tpm2-pytss): :class:`TpmDevice` creates and persists the EK
and SRK, derives the registration id, imports DPS's activation blob and signs SAS tokens inside the
TPM. Service side (needs ``cryptography``): :func:`create_challenge` builds the activation blob the
emulator sends. Wire formats (:mod:`tpm.blob`, :mod:`tpm.marshal`) need only the standard library.
Importing this package loads neither tpm2-pytss nor cryptography.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .blob import ActivationBlob, build_activation_blob, parse_activation_blob
from .device import EK_HANDLE, ID_KEY_HANDLE, SRK_HANDLE, TpmDevice, TpmHandles, TpmSigner
from .errors import TpmActivationError, TpmBlobError, TpmError, TpmUnavailable
from .swtpm import SwtpmProcess
from .swtpm import available as swtpm_available

if TYPE_CHECKING:
    from .challenge import TpmChallenge as TpmChallenge
    from .challenge import create_challenge as create_challenge

_LAZY = {"TpmChallenge", "create_challenge"}


def __getattr__(name: str) -> Any:
    """Load the service-side challenge (and cryptography) only when asked for."""
    if name in _LAZY:
        from . import challenge

        return getattr(challenge, name)
    raise AttributeError(f"module 'tpm' has no attribute {name!r}")


__all__ = [
    "EK_HANDLE",
    "ID_KEY_HANDLE",
    "SRK_HANDLE",
    "ActivationBlob",
    "SwtpmProcess",
    "TpmActivationError",
    "TpmBlobError",
    "TpmDevice",
    "TpmError",
    "TpmHandles",
    "TpmSigner",
    "TpmUnavailable",
    "build_activation_blob",
    "parse_activation_blob",
    "swtpm_available",
]
