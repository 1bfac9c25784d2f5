"""Typed errors of the emulator: every failure a caller of its API can see is one of these."""

from __future__ import annotations


class EmulatorError(Exception):
    """Base class of every error raised by :mod:`emulator`."""


class ValidationError(EmulatorError, ValueError):
    """A record, id, key or setting does not satisfy the rules Azure applies to it.

    The message names the offending field (for example ``attestation.symmetricKey.primaryKey``) so
    the management API can pass it straight back to the client as a 400 answer.
    """


class NotFoundError(EmulatorError):
    """The enrollment, group, registration or hub that was asked for does not exist."""


class ConflictError(EmulatorError):
    """A write lost a race: the stored record's etag is not the one the caller expected."""


class CertificateError(EmulatorError):
    """The emulator's CA or server certificate files are unusable and cannot be fixed silently."""
