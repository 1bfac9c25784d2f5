"""TPM 2.0 attestation for DPS (EK, SRK, activation, in-TPM HMAC signing): not built yet."""

from __future__ import annotations
