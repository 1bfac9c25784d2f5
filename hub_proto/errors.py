"""Typed errors of the IoT Hub device protocol: every failure a caller can see is one of these."""

from __future__ import annotations


class HubError(Exception):
    """Base class of every error raised by :mod:`hub_proto`."""


class HubParseError(HubError):
    """A topic, property bag, username, JSON body or twin document is not what the protocol allows
    (including Azure's size and shape limits)."""


class HubStateError(HubError):
    """A session was driven in a way its current state does not allow."""


class HubRequestError(HubError):
    """A twin request failed: the hub answered an error status (after any retries), the connection
    was lost, or (subclass :class:`HubTimeout`) no answer came in time.

    ``status`` is the hub's status (0 when the hub never answered).
    """

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        self.service_message = message
        super().__init__(f"hub request failed ({status}): {message}" if status else message)


class HubTimeout(HubRequestError):
    """A twin request got no answer within the request time-out."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)


class HubAuthError(HubError):
    """The hub refused the credentials (CONNACK 2, 4 or 5, or an authorisation drop) too often.

    Reconnecting with the same credentials will not help; ``return_code`` is the last CONNACK code
    (None when the hub closed an established connection).
    """

    def __init__(self, message: str, *, return_code: int | None = None) -> None:
        self.return_code = return_code
        super().__init__(message)


class QueueFullError(HubError):
    """A telemetry message was refused because the bounded outgoing queue is full (or the message
    alone is larger than the queue's byte limit) and the overflow policy is ``reject``."""
