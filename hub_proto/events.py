"""What the session core hands the transport and the application: publishes and events."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from .errors import HubAuthError, HubError, HubParseError
    from .message import Message
    from .telemetry import MessageTicket
    from .tracker import Request


@dataclass(frozen=True)
class OutgoingPublish:
    """A PUBLISH for the transport. After handing it to the MQTT client, call
    ``session.publish_sent(token, packet_id)``; when the client reports it done (PUBACK for QoS 1,
    written for QoS 0), call ``session.puback(packet_id)``. ``token`` is opaque."""

    topic: str
    payload: bytes
    qos: int
    token: int


@dataclass(frozen=True)
class MessageDone:
    """A telemetry ticket reached a final state (acknowledged, sent, dropped, expired or lost)."""

    ticket: MessageTicket


@dataclass(frozen=True)
class TwinResponse:
    """The hub answered a twin request with a success status. ``twin`` is the document of a GET
    (``{"desired": {...}, "reported": {...}}``); ``version`` the new reported ``$version`` of a
    patch."""

    request: Request
    status: int
    version: int | None
    twin: dict[str, Any] | None


@dataclass(frozen=True)
class RequestFailed:
    """A twin request failed: :class:`~hub_proto.errors.HubRequestError` (error status after
    retries, connection lost twice), :class:`~hub_proto.errors.HubTimeout`, or
    :class:`~hub_proto.errors.HubParseError` for an unreadable answer."""

    request: Request
    error: HubError


@dataclass(frozen=True)
class TwinSynced:
    """The twin was (re)read after a connect: the full desired and reported sections."""

    desired: dict[str, Any]
    reported: dict[str, Any]
    desired_version: int | None
    reported_version: int | None


@dataclass(frozen=True)
class DesiredPatch:
    """A desired-properties change newer than what the device knew (``$version`` removed)."""

    version: int
    patch: dict[str, Any]


@dataclass(frozen=True)
class MethodRequest:
    """A direct-method call; answer with ``session.method_response(rid, status, payload)``."""

    name: str
    rid: str
    payload: bytes

    @property
    def component(self) -> str | None:
        """For a Plug and Play command ``component*command``: the component."""
        head, sep, _ = self.name.partition("*")
        return head if sep else None

    @property
    def command(self) -> str:
        """The command name (the method name without any ``component*`` prefix)."""
        return self.name.partition("*")[2] if "*" in self.name else self.name


@dataclass(frozen=True)
class C2DMessage:
    """A cloud-to-device message (the transport has already PUBACKed it)."""

    message: Message


@dataclass(frozen=True)
class TokenRenewalDue:
    """The SAS token reaches its renewal point: disconnect, then call
    ``connection_lost(now, "renewal")`` and reconnect with a fresh token."""

    renew_at: float


@dataclass(frozen=True)
class SessionFailed:
    """The hub refused the credentials too often; the session stopped reconnecting."""

    error: HubAuthError


@dataclass(frozen=True)
class ReceiveError:
    """Something arrived that could not be understood; it was ignored."""

    topic: str
    error: HubParseError = field(repr=True)


Event = Union[
    MessageDone,
    TwinResponse,
    RequestFailed,
    TwinSynced,
    DesiredPatch,
    MethodRequest,
    C2DMessage,
    TokenRenewalDue,
    SessionFailed,
    ReceiveError,
]
