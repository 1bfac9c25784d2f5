"""IoT Hub device protocol over MQTT: the sans-IO core (topics, property bags, messages, twin
documents, the :class:`HubSession` state machine) for device transports and the emulator's hub.

Importing this package loads only the standard library (and :mod:`dps_proto`'s SAS helpers,
which are standard library only too). The paho-mqtt transport (:class:`HubClient`,
:class:`AsyncHubClient`) and the telemetry spool (:class:`Spool`) are loaded on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dps_proto.sas import (
    KeySigner,
    SasToken,
    Signer,
    generate_sas_token,
    hub_resource_uri,
    parse_sas_token,
    verify_sas_token,
)

from .auth import sas_password
from .backoff import Backoff, BackoffPolicy
from .errors import (
    HubAuthError,
    HubError,
    HubParseError,
    HubRequestError,
    HubStateError,
    HubTimeout,
    QueueFullError,
)
from .events import (
    C2DMessage,
    DesiredPatch,
    Event,
    MessageDone,
    MethodRequest,
    OutgoingPublish,
    ReceiveError,
    RequestFailed,
    SessionFailed,
    TokenRenewalDue,
    TwinResponse,
    TwinSynced,
)
from .message import RESERVED_KEYS, SYSTEM_PROPERTIES, Message
from .properties import decode_properties, encode_properties
from .session import AUTH_RETURN_CODES, ConnectionState, HubSession
from .telemetry import (
    MAX_MESSAGE_BYTES,
    MessageTicket,
    OverflowPolicy,
    QueueLimits,
    QueueStats,
    TelemetryQueue,
    TicketState,
)
from .topics import (
    DEFAULT_API_VERSION,
    DESIRED_PATCH_SUBSCRIBE_TOPIC,
    METHODS_SUBSCRIBE_TOPIC,
    TWIN_RESPONSE_SUBSCRIBE_TOPIC,
    C2DTopic,
    DesiredPatchTopic,
    MethodRequestTopic,
    MethodResponseTopic,
    PublishedTopic,
    ReceivedTopic,
    TelemetryTopic,
    TwinRequestTopic,
    TwinResponseTopic,
    Username,
    c2d_subscribe_topic,
    c2d_topic,
    check_id,
    client_id,
    desired_patch_topic,
    method_request_topic,
    method_response_topic,
    parse_c2d_topic,
    parse_client_id,
    parse_desired_patch_topic,
    parse_method_request_topic,
    parse_method_response_topic,
    parse_published_topic,
    parse_received_topic,
    parse_telemetry_topic,
    parse_twin_request_topic,
    parse_twin_response_topic,
    parse_username,
    telemetry_topic,
    twin_get_topic,
    twin_patch_reported_topic,
    twin_response_topic,
    username,
)
from .tracker import Request, RequestState, RequestTracker, RetryPolicy
from .twin import (
    apply_patch,
    decode_json_object,
    encode_json,
    twin_size,
    validate_reported_patch,
    validate_section,
)
from .twin_sync import TwinSync

if TYPE_CHECKING:
    from .mqtt_transport import AsyncHubClient as AsyncHubClient
    from .mqtt_transport import HubClient as HubClient
    from .spool import Spool as Spool
    from .spool import SpoolError as SpoolError

#: Names served by modules loaded on first use (paho-mqtt only when a client is asked for).
_LAZY: dict[str, str] = {
    "AsyncHubClient": ".mqtt_transport",
    "HubClient": ".mqtt_transport",
    "Spool": ".spool",
    "SpoolError": ".spool",
}


def __getattr__(name: str) -> Any:
    """Load transports only when they are asked for."""
    module_name = _LAZY.get(name)
    if module_name is not None:
        import importlib

        return getattr(importlib.import_module(module_name, __name__), name)
    raise AttributeError(f"module 'hub_proto' has no attribute {name!r}")


__all__ = [
    "AUTH_RETURN_CODES",
    "DEFAULT_API_VERSION",
    "DESIRED_PATCH_SUBSCRIBE_TOPIC",
    "MAX_MESSAGE_BYTES",
    "METHODS_SUBSCRIBE_TOPIC",
    "RESERVED_KEYS",
    "SYSTEM_PROPERTIES",
    "TWIN_RESPONSE_SUBSCRIBE_TOPIC",
    "AsyncHubClient",
    "Backoff",
    "BackoffPolicy",
    "C2DMessage",
    "C2DTopic",
    "ConnectionState",
    "DesiredPatch",
    "DesiredPatchTopic",
    "Event",
    "HubAuthError",
    "HubClient",
    "HubError",
    "HubParseError",
    "HubRequestError",
    "HubSession",
    "HubStateError",
    "HubTimeout",
    "KeySigner",
    "Message",
    "MessageDone",
    "MessageTicket",
    "MethodRequest",
    "MethodRequestTopic",
    "MethodResponseTopic",
    "OutgoingPublish",
    "OverflowPolicy",
    "PublishedTopic",
    "QueueFullError",
    "QueueLimits",
    "QueueStats",
    "ReceiveError",
    "ReceivedTopic",
    "Request",
    "RequestFailed",
    "RequestState",
    "RequestTracker",
    "RetryPolicy",
    "SasToken",
    "SessionFailed",
    "Signer",
    "Spool",
    "SpoolError",
    "TelemetryQueue",
    "TelemetryTopic",
    "TicketState",
    "TokenRenewalDue",
    "TwinRequestTopic",
    "TwinResponse",
    "TwinResponseTopic",
    "TwinSync",
    "TwinSynced",
    "Username",
    "apply_patch",
    "c2d_subscribe_topic",
    "c2d_topic",
    "check_id",
    "client_id",
    "decode_json_object",
    "decode_properties",
    "desired_patch_topic",
    "encode_json",
    "encode_properties",
    "generate_sas_token",
    "hub_resource_uri",
    "method_request_topic",
    "method_response_topic",
    "parse_c2d_topic",
    "parse_client_id",
    "parse_desired_patch_topic",
    "parse_method_request_topic",
    "parse_method_response_topic",
    "parse_published_topic",
    "parse_received_topic",
    "parse_sas_token",
    "parse_telemetry_topic",
    "parse_twin_request_topic",
    "parse_twin_response_topic",
    "parse_username",
    "sas_password",
    "telemetry_topic",
    "twin_get_topic",
    "twin_patch_reported_topic",
    "twin_response_topic",
    "twin_size",
    "username",
    "validate_reported_patch",
    "validate_section",
    "verify_sas_token",
]
