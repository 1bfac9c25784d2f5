"""Typed errors of the DPS device protocol: every failure a caller can see is one of these."""

from __future__ import annotations


class DpsError(Exception):
    """Base class of every error raised by :mod:`dps_proto`."""


class DpsParseError(DpsError):
    """A topic, payload, username or SAS token is not what the protocol allows."""


class SasError(DpsError):
    """A SAS token could not be built or did not verify (bad key, wrong resource, expired)."""


class DpsStateError(DpsError):
    """A registration state machine was driven in a way its current state does not allow."""


class DpsServiceError(DpsError):
    """The service answered with an error status that is not worth retrying (or retries ran out).

    Carries what the service said: HTTP-like status, Azure's 6-digit ``errorCode``, its message and
    tracking id, so the caller can tell a bad credential (401) from a missing enrollment (404).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        error_code: int | None = None,
        tracking_id: str | None = None,
    ) -> None:
        self.status = status
        self.error_code = error_code
        self.service_message = message
        self.tracking_id = tracking_id
        code = f" (errorCode {error_code})" if error_code is not None else ""
        super().__init__(f"DPS answered {status}{code}: {message}")


class RegistrationFailed(DpsError):
    """The registration ended as ``failed``; ``error_code`` and ``error_message`` say why."""

    def __init__(
        self, registration_id: str, error_code: int | None, error_message: str | None
    ) -> None:
        self.registration_id = registration_id
        self.error_code = error_code
        self.error_message = error_message
        super().__init__(
            f"registration of {registration_id!r} failed"
            f" (errorCode {error_code}): {error_message or 'no message'}"
        )


class RegistrationDisabled(DpsError):
    """The enrollment (or group) of this device is disabled; DPS will not assign it."""

    def __init__(self, registration_id: str) -> None:
        self.registration_id = registration_id
        super().__init__(f"the enrollment of {registration_id!r} is disabled")


class ProvisioningTimeout(DpsError):
    """Provisioning did not finish within the caller's overall timeout."""


class DpsConnectionError(DpsError):
    """The transport could not reach DPS, or DPS refused or dropped the connection."""

    def __init__(self, message: str, *, return_code: int | None = None) -> None:
        self.return_code = return_code
        super().__init__(message)
