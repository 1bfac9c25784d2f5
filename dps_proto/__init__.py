"""DPS device protocol: the sans-IO core (topics, payloads, SAS tokens, the registration state
machine) and, imported on demand, the MQTT transport (:func:`provision`, :func:`provision_async`)
and the HTTPS transport (:func:`provision_https`, :func:`provision_https_async`; needed for TPM).

Importing this package loads only the standard library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .attestation import TpmProvider
from .csr import CSR_API_VERSION, chain_pem, csr_base64, generate_key_and_csr
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
    from .https_transport import provision_https as provision_https
    from .https_transport import provision_https_async as provision_https_async
    from .mqtt_transport import provision as provision
    from .mqtt_transport import provision_async as provision_async

#: Transport functions and the module each lives in, imported on first access.
_LAZY = {
    "provision": "mqtt_transport",
    "provision_async": "mqtt_transport",
    "provision_https": "https_transport",
    "provision_https_async": "https_transport",
}


def __getattr__(name: str) -> Any:
    """Load a transport (paho-mqtt, or http.client and ssl) only when it is asked for."""
    module = _LAZY.get(name)
    if module is not None:
        return getattr(importlib.import_module(f".{module}", __name__), name)
    raise AttributeError(f"module 'dps_proto' has no attribute {name!r}")


__all__ = [
    "CSR_API_VERSION",
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
    "TpmProvider",
    "Username",
    "build_register_payload",
    "chain_pem",
    "csr_base64",
    "derive_device_key",
    "dps_resource_uri",
    "encode_json",
    "generate_key_and_csr",
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
