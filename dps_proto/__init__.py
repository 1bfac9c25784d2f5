"""DPS device protocol: the sans-IO core (topics, payloads, SAS tokens, the registration state
machine) and, imported on demand, the MQTT transport (:func:`provision`, :func:`provision_async`).

Importing this package loads only the standard library.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import (
    DpsConnectionError,
    DpsError,
    DpsParseError,
    DpsServiceError,
    DpsStateError,
    ProvisioningTimeout,
    RegistrationDisabled,
    RegistrationFailed,
    SasError,
)
from .payloads import (
    ErrorBody,
    OperationStatus,
    RegisterRequest,
    RegistrationState,
    TpmAttestation,
    build_register_payload,
    encode_json,
    parse_register_payload,
    parse_response_payload,
)
from .registration import (
    Assignment,
    OutgoingPublish,
    Phase,
    Registration,
    RetryPolicy,
    TpmChallenge,
)
from .sas import (
    KeySigner,
    SasToken,
    Signer,
    derive_device_key,
    dps_resource_uri,
    generate_sas_token,
    hub_resource_uri,
    parse_sas_token,
    verify_sas_token,
)
from .topics import (
    DEFAULT_API_VERSION,
    RESPONSE_SUBSCRIBE_TOPIC,
    RequestTopic,
    ResponseTopic,
    Username,
    parse_request_topic,
    parse_response_topic,
    parse_username,
    poll_topic,
    register_topic,
    response_topic,
    username,
)

if TYPE_CHECKING:
    from .mqtt_transport import provision as provision
    from .mqtt_transport import provision_async as provision_async

_LAZY = {"provision", "provision_async"}


def __getattr__(name: str) -> Any:
    """Load the paho-mqtt transport only when it is asked for."""
    if name in _LAZY:
        from . import mqtt_transport

        return getattr(mqtt_transport, name)
    raise AttributeError(f"module 'dps_proto' has no attribute {name!r}")


__all__ = [
    "DEFAULT_API_VERSION",
    "RESPONSE_SUBSCRIBE_TOPIC",
    "Assignment",
    "DpsConnectionError",
    "DpsError",
    "DpsParseError",
    "DpsServiceError",
    "DpsStateError",
    "ErrorBody",
    "KeySigner",
    "OperationStatus",
    "OutgoingPublish",
    "Phase",
    "ProvisioningTimeout",
    "RegisterRequest",
    "Registration",
    "RegistrationDisabled",
    "RegistrationFailed",
    "RegistrationState",
    "RequestTopic",
    "ResponseTopic",
    "RetryPolicy",
    "SasError",
    "SasToken",
    "Signer",
    "TpmAttestation",
    "TpmChallenge",
    "Username",
    "build_register_payload",
    "derive_device_key",
    "dps_resource_uri",
    "encode_json",
    "generate_sas_token",
    "hub_resource_uri",
    "parse_register_payload",
    "parse_request_topic",
    "parse_response_payload",
    "parse_response_topic",
    "parse_sas_token",
    "parse_username",
    "poll_topic",
    "register_topic",
    "response_topic",
    "username",
    "verify_sas_token",
]
