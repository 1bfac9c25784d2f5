"""The emulator's IoT Hub: device authentication, twins, direct methods, C2D and telemetry rules.

Sans-IO: given an identity, a topic and a payload (or a service API body), it answers with the
messages to publish to that one device and the records to keep; the MQTT session
(:mod:`emulator.router`) moves the bytes and owns the live connections. Time is an argument.
Topics, property bags, twin limits and SAS checks come from :mod:`hub_proto` and
:mod:`dps_proto.sas`; nothing here parses the protocol itself.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import json
import logging
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from dps_proto.errors import SasError
from dps_proto.sas import (
    KeySigner,
    derive_device_key,
    hub_resource_uri,
    parse_sas_token,
    verify_sas_token,
)
from hub_proto.errors import HubParseError
from hub_proto.message import Message, message_from_properties, message_properties
from hub_proto.topics import (
    DESIRED_PATCH_PREFIX,
    METHOD_REQUEST_PREFIX,
    TWIN_RESPONSE_PREFIX,
    MethodResponseTopic,
    TelemetryTopic,
    TwinRequestTopic,
    c2d_topic,
    desired_patch_topic,
    method_request_topic,
    parse_client_id,
    parse_published_topic,
    parse_username,
    twin_response_topic,
)
from hub_proto.twin import (
    MAX_DESIRED_SIZE,
    MAX_REPORTED_SIZE,
    MAX_TAGS_SIZE,
    READ_ONLY_KEYS,
    apply_patch,
    decode_json_object,
    encode_json,
    validate_reported_patch,
    validate_section,
)

from .dps_service import (
    CONNACK_BAD_CREDENTIALS,
    CONNACK_IDENTIFIER_REJECTED,
    CONNACK_NOT_AUTHORIZED,
    ConnectRefused,
    ProtocolViolation,
    Reply,
)
from .errors import EmulatorError, NotFoundError
from .hub_store import C2DQueueFull, C2DRecord, DeviceRecord, HubStore, TelemetryRecord, TwinRecord
from .models import (
    EnrollmentGroup,
    IndividualEnrollment,
    SymmetricKeyAttestation,
    TpmAttestation,
    X509Attestation,
    utc_now_iso,
)
from .store import Store

__all__ = [
    "CONNACK_SERVER_UNAVAILABLE",
    "HubConfig",
    "HubIdentity",
    "HubService",
    "HubServiceError",
    "MethodInvocation",
    "MethodResponse",
    "PublishOutcome",
    "add_device_thumbprint",
    "register_assignment",
]

log = logging.getLogger(__name__)

#: CONNACK code Azure's hub uses for a disabled device (the C SDK reports it as "device disabled").
CONNACK_SERVER_UNAVAILABLE = 3

# Error codes of the service API answers (6 digits, the first three being the HTTP status).
ERROR_INVALID_ARGUMENT = 400004
ERROR_QUEUE_FULL = 403004
ERROR_DEVICE_NOT_FOUND = 404001
ERROR_DEVICE_NOT_ONLINE = 404103
ERROR_TOO_LARGE = 413001
ERROR_GATEWAY_TIMEOUT = 504101
ERROR_BAD_DEVICE_ANSWER = 502001

#: Roots of the topic filters a device may subscribe to (its own C2D root is added per device).
_SUBSCRIPTION_ROOTS = (TWIN_RESPONSE_PREFIX, DESIRED_PATCH_PREFIX, METHOD_REQUEST_PREFIX)

#: Telemetry system properties as Azure names them when it routes a message.
_ROUTED_SYSTEM_NAMES = {
    "$.mid": "message-id",
    "$.cid": "correlation-id",
    "$.uid": "user-id",
    "$.ct": "content-type",
    "$.ce": "content-encoding",
    "$.ctime": "iothub-creation-time-utc",
    "$.exp": "absolute-expiry-time",
    "$.sub": "dt-subject",
    "$.on": "iothub-outputname",
}

#: C2D system properties the service API accepts (JSON name -> property-bag key).
_C2D_SYSTEM_FIELDS = {
    "messageId": "message_id",
    "correlationId": "correlation_id",
    "userId": "user_id",
    "contentType": "content_type",
    "contentEncoding": "content_encoding",
    "expiryTimeUtc": "expiry_time",
}


class HubServiceError(EmulatorError):
    """A service API request the hub refuses: HTTP ``status`` and Azure ``error_code``."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        self.status = status
        self.error_code = error_code
        self.message = message
        super().__init__(f"{status} ({error_code}): {message}")


@dataclass(frozen=True)
class HubConfig:
    """Limits of the emulated hub (Azure's, except the shorter method time-outs allowed)."""

    max_subscriptions: int = 5
    max_c2d_pending: int = 50
    max_c2d_bytes: int = 64 * 1024
    max_telemetry_bytes: int = 256 * 1024
    #: Telemetry kept per device (oldest dropped first).
    telemetry_keep: int = 1000
    max_method_payload: int = 128 * 1024
    default_method_timeout: float = 30.0
    #: Azure's minimum is 5 s; smaller values are allowed so tests can exercise time-outs.
    min_method_timeout: float = 0.1
    max_method_timeout: float = 300.0


@dataclass(frozen=True)
class HubIdentity:
    """Who an authenticated hub connection belongs to."""

    hub: str
    device_id: str
    api_version: str
    client_type: str | None = None


@dataclass(frozen=True)
class MethodResponse:
    """A device's answer to a direct method; ``error`` is set when its body is unusable."""

    rid: str
    status: int
    payload: Any
    error: str | None = None


@dataclass(frozen=True)
class PublishOutcome:
    """What a device's PUBLISH led to: answers for it, a method result, a stored message."""

    replies: tuple[Reply, ...] = ()
    method_response: MethodResponse | None = None
    telemetry: TelemetryRecord | None = None


@dataclass(frozen=True)
class MethodInvocation:
    """A validated direct-method call from the service API."""

    name: str
    payload: Any
    timeout: float


def register_assignment(
    store: Store,
    *,
    hub: str,
    device_id: str,
    registration_id: str,
    enrollment: IndividualEnrollment | EnrollmentGroup,
    device_key: str,
    tpm_hub_key: str | None,
    now: float,
    initial_twin: dict[str, Any] | None = None,
    reset_twin: bool = False,
) -> None:
    """Create (or update) the hub identity of a device DPS has just assigned.

    Credentials follow Azure: an individual symmetric-key enrollment's two keys; a group's two keys
    derived for this registration id; for TPM the key delivered to the device for its hub. A new
    device starts with ``initial_twin`` (a custom allocation webhook's) or else the enrollment's
    initial twin; a known one keeps its twin unless ``reset_twin`` (reprovisioning with
    ``migrateDeviceData: false``) starts it again from that initial twin.
    """
    attestation = enrollment.attestation
    auth_type = "sas"
    keys: list[str]
    if isinstance(attestation, TpmAttestation):
        auth_type = "tpm"
        keys = [tpm_hub_key or device_key]
    elif isinstance(attestation, SymmetricKeyAttestation):
        if isinstance(enrollment, EnrollmentGroup):
            keys = [
                derive_device_key(attestation.primary_key, registration_id),
                derive_device_key(attestation.secondary_key, registration_id),
            ]
        else:
            keys = [attestation.primary_key, attestation.secondary_key]
        if device_key not in keys:
            keys.append(device_key)
    elif isinstance(attestation, X509Attestation):
        auth_type = "certificateAuthority" if attestation.signing else "selfSigned"
        keys = []
    else:
        keys = [device_key]
    auth: dict[str, Any] = {"type": auth_type, "keys": keys}
    if isinstance(attestation, X509Attestation):
        auth.update(_x509_auth(attestation))
    created = HubStore.attached(store).register_device(
        device_id,
        hub,
        auth,
        initial_twin if initial_twin is not None else enrollment.initial_twin,
        utc_now_iso(now),
        reset_twin=reset_twin,
    )
    log.info("hub %s: device %s %s", hub, device_id, "created" if created else "updated")


def _x509_auth(attestation: X509Attestation) -> dict[str, Any]:
    """Hub credentials of an X.509 enrollment's devices: the device certificates' SHA-256
    thumbprints (``selfSigned``), or the group's signing certificates (``certificateAuthority``:
    any certificate they issued whose CN is the device id)."""
    if attestation.signing:
        return {"signers": list(attestation.certificates)}
    from cryptography import x509

    from .x509 import thumbprints

    return {
        "thumbprints": [
            thumbprints(x509.load_pem_x509_certificate(pem.encode("ascii")))[1]
            for pem in attestation.certificates
        ]
    }


def add_device_thumbprint(store: Store, device_id: str, thumbprint: str) -> None:
    """Let a device also connect with the certificate of this SHA-256 thumbprint (one DPS issued
    from its CSR; it replaces the one issued before)."""
    devices = HubStore.attached(store)
    device = devices.get_device(device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} does not exist")
    auth = {**device.auth, "issuedThumbprints": [thumbprint.upper()]}
    devices.register_device(device_id, device.hub, auth, None, device.created)


def _strings(auth: Mapping[str, Any], *names: str) -> list[str]:
    """The strings in the lists ``auth[name]`` (stored credentials), in order."""
    out: list[str] = []
    for name in names:
        value = auth.get(name)
        if isinstance(value, list):
            out += [item for item in value if isinstance(item, str)]
    return out


def _certificate_problem(device: DeviceRecord, chain: Sequence[bytes], now: float) -> str | None:
    """Why the device may not connect with this TLS client certificate chain (None: it may).

    Accepted: a leaf (valid at ``now``) whose thumbprint the device's identity holds (its
    enrollment's, or issued from its CSR), or whose CN is the device id and whose chain leads to
    one of the identity's signing certificates (an X.509 group's CA or intermediate).
    """
    from cryptography import x509

    from .x509 import (
        CertificateRejected,
        check_validity,
        common_name,
        load_chain,
        matches_thumbprint,
        verify_chain,
    )

    wanted = _strings(device.auth, "thumbprints", "issuedThumbprints")
    signers = _strings(device.auth, "signers")
    if not wanted and not signers:
        return "the device has no X.509 credentials"
    try:
        certs = load_chain(chain)
        leaf = certs[0]
        check_validity(leaf, now, "the device certificate")
        if matches_thumbprint(leaf, wanted):
            return None
        if not signers:
            return "the certificate's thumbprint is not the device's"
        name = common_name(leaf)
        if name != device.device_id:
            return f"the certificate's CN {name!r} is not the device id"
        reasons = []
        for pem in signers:
            try:
                verify_chain(certs, x509.load_pem_x509_certificate(pem.encode("ascii")), now)
            except CertificateRejected as exc:
                reasons.append(str(exc))
                continue
            return None
        return "; ".join(reasons) or "no signing certificate"
    except CertificateRejected as exc:
        return str(exc)


def _bad_request(message: str) -> HubServiceError:
    return HubServiceError(400, ERROR_INVALID_ARGUMENT, message)


def _device_not_found(device_id: str) -> HubServiceError:
    return HubServiceError(404, ERROR_DEVICE_NOT_FOUND, f"device {device_id!r} does not exist")


def _section(value: Mapping[str, Any], version: int) -> dict[str, Any]:
    return {**value, "$version": version}


def _error_body(status: int, message: str) -> bytes:
    return encode_json({"errorCode": status * 1000 + 4, "message": message})


class HubService:
    """The device-facing and service-facing IoT Hub logic, shared by every connection."""

    def __init__(self, store: Store, config: HubConfig | None = None) -> None:
        self.store = store
        self.devices = HubStore.attached(store)
        self.config = config or HubConfig()

    # -- CONNECT ------------------------------------------------------------------------------

    def authenticate(
        self,
        client_id: str,
        username: str | None,
        password: bytes | None,
        now: float,
        *,
        client_chain: Sequence[bytes] = (),
    ) -> HubIdentity:
        """Check a hub CONNECT: a SAS token, or with an empty password the TLS client certificate
        chain (DER, leaf first); :class:`ConnectRefused` says why not (never naming a key)."""
        if username is None:
            raise ConnectRefused(CONNACK_BAD_CREDENTIALS, "no username")
        try:
            parsed = parse_username(username)
        except HubParseError as exc:
            raise ConnectRefused(CONNACK_BAD_CREDENTIALS, f"bad hub username: {exc}") from exc
        if parsed.module_id is not None:
            raise ConnectRefused(CONNACK_NOT_AUTHORIZED, "modules are not emulated")
        host = parsed.host.lower()
        if host not in self.store.list_hubs():
            raise ConnectRefused(CONNACK_NOT_AUTHORIZED, f"{parsed.host!r} is not a linked hub")
        try:
            client_device, client_module = parse_client_id(client_id)
        except HubParseError as exc:
            raise ConnectRefused(CONNACK_IDENTIFIER_REJECTED, str(exc)) from exc
        if client_device != parsed.device_id or client_module is not None:
            raise ConnectRefused(
                CONNACK_IDENTIFIER_REJECTED, "client id differs from the username's device id"
            )
        device = self.devices.get_device(parsed.device_id)
        if device is None or device.hub != host:
            raise ConnectRefused(
                CONNACK_NOT_AUTHORIZED, f"device {parsed.device_id!r} is not registered on {host}"
            )
        if device.status != "enabled":
            raise ConnectRefused(CONNACK_SERVER_UNAVAILABLE, "the device is disabled")
        if not password:
            if not client_chain:
                raise ConnectRefused(
                    CONNACK_NOT_AUTHORIZED, "neither a SAS token nor a client certificate"
                )
            problem = _certificate_problem(device, client_chain, now)
            if problem is not None:
                raise ConnectRefused(CONNACK_NOT_AUTHORIZED, f"invalid certificate: {problem}")
            return HubIdentity(host, parsed.device_id, parsed.api_version, parsed.client_type)
        try:
            token = parse_sas_token(password.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise ConnectRefused(CONNACK_BAD_CREDENTIALS, "the SAS token is not UTF-8") from exc
        except SasError as exc:
            raise ConnectRefused(CONNACK_BAD_CREDENTIALS, f"malformed SAS token: {exc}") from exc
        resource = hub_resource_uri(parsed.host, parsed.device_id)
        reason = "the device has no keys"
        for key in device.keys:
            try:
                verify_sas_token(token, KeySigner.from_base64(key), resource, now)
            except SasError as exc:
                reason = str(exc)
                continue
            return HubIdentity(host, parsed.device_id, parsed.api_version, parsed.client_type)
        raise ConnectRefused(CONNACK_NOT_AUTHORIZED, reason)

    # -- SUBSCRIBE ----------------------------------------------------------------------------

    @staticmethod
    def grant(identity: HubIdentity, topic_filter: str, requested_qos: int) -> int | None:
        """QoS granted for a filter (QoS 2 is granted 1), or None when the device may not use it.

        Allowed: filters under the twin response, desired-patch and method request topics, and
        under the device's own C2D topic (``devices/{id}/...`` or ``devices/+/...``).
        """
        roots = (
            *_SUBSCRIPTION_ROOTS,
            f"devices/{identity.device_id}/messages/devicebound/",
            "devices/+/messages/devicebound/",
        )
        if not any(topic_filter.startswith(root) for root in roots):
            return None
        return min(requested_qos, 1)

    # -- PUBLISH ------------------------------------------------------------------------------

    def handle_publish(
        self, identity: HubIdentity, topic: str, payload: bytes, retain: bool, now: float
    ) -> PublishOutcome:
        """Handle a device's PUBLISH; :class:`ProtocolViolation` means: close its connection."""
        try:
            parsed = parse_published_topic(topic)
        except HubParseError as exc:
            raise ProtocolViolation(str(exc)) from exc
        try:
            if isinstance(parsed, TelemetryTopic):
                return PublishOutcome(
                    telemetry=self._telemetry(identity, parsed, payload, retain, now)
                )
            if isinstance(parsed, TwinRequestTopic):
                return PublishOutcome(replies=(self._twin_request(identity, parsed, payload),))
            return PublishOutcome(method_response=self._method_response(parsed, payload))
        except HubParseError as exc:
            raise ProtocolViolation(str(exc)) from exc

    def _telemetry(
        self, identity: HubIdentity, topic: TelemetryTopic, payload: bytes, retain: bool, now: float
    ) -> TelemetryRecord:
        if topic.device_id != identity.device_id or topic.module_id is not None:
            raise ProtocolViolation("telemetry for another device or module")
        message = topic.message
        system = message.system_properties()
        properties = dict(message.properties)
        if retain:
            properties["mqtt-retain"] = "true"
        bag = (*system.items(), *properties.items())
        size = len(payload) + sum(len(k) + len(v) for k, v in bag)
        if size > self.config.max_telemetry_bytes:
            raise ProtocolViolation(
                f"message of {size} bytes exceeds {self.config.max_telemetry_bytes}"
            )
        enqueued = utc_now_iso(now)
        routed = {_ROUTED_SYSTEM_NAMES[key]: value for key, value in system.items()}
        routed["iothub-connection-device-id"] = identity.device_id
        routed["iothub-enqueuedtime"] = enqueued
        routed["iothub-message-source"] = "Telemetry"
        return self.devices.add_telemetry(
            identity.device_id, properties, routed, payload, enqueued, self.config.telemetry_keep
        )

    def _twin_request(
        self, identity: HubIdentity, topic: TwinRequestTopic, payload: bytes
    ) -> Reply:
        if topic.kind == "get":
            twin = self.devices.get_twin(identity.device_id)
            if twin is None:
                return Reply(twin_response_topic(404, topic.rid), _error_body(404, "no twin"))
            body = {
                "desired": _section(twin.desired, twin.desired_version),
                "reported": _section(twin.reported, twin.reported_version),
            }
            return Reply(twin_response_topic(200, topic.rid), encode_json(body))
        try:
            patch = decode_json_object(payload)
            validate_reported_patch(patch)

            def change(twin: TwinRecord) -> TwinRecord:
                reported = apply_patch(copy.deepcopy(twin.reported), patch)
                validate_section(reported, max_size=MAX_REPORTED_SIZE)
                return dataclasses.replace(
                    twin, reported=reported, reported_version=twin.reported_version + 1
                )

            updated = self.devices.update_twin(identity.device_id, change)
        except HubParseError as exc:
            log.info("device %s: reported patch refused: %s", identity.device_id, exc)
            return Reply(twin_response_topic(400, topic.rid), _error_body(400, str(exc)))
        except NotFoundError:
            return Reply(twin_response_topic(404, topic.rid), _error_body(404, "no twin"))
        return Reply(twin_response_topic(204, topic.rid, updated.reported_version), b"")

    def _method_response(self, topic: MethodResponseTopic, payload: bytes) -> MethodResponse:
        if len(payload) > self.config.max_method_payload:
            return MethodResponse(topic.rid, topic.status, None, "the answer is too large")
        if not payload:
            return MethodResponse(topic.rid, topic.status, None)
        try:
            value = _decode_json(payload)
        except HubParseError as exc:
            return MethodResponse(topic.rid, topic.status, None, f"the answer is not JSON: {exc}")
        return MethodResponse(topic.rid, topic.status, value)

    # -- service API: devices and twins -------------------------------------------------------

    def require_device(self, device_id: str) -> DeviceRecord:
        """The device, or a 404 :class:`HubServiceError`."""
        device = self.devices.get_device(device_id)
        if device is None:
            raise _device_not_found(device_id)
        return device

    def set_device_status(self, device_id: str, body: object) -> DeviceRecord:
        """Apply ``{"status": "enabled" | "disabled", "statusReason"?: str}`` (Azure's device
        fields; others are ignored, a ``deviceId`` must match). 400 or 404 otherwise."""
        self.require_device(device_id)
        if not isinstance(body, dict):
            raise _bad_request("the body must be a JSON object")
        named = body.get("deviceId")
        if named is not None and named != device_id:
            raise _bad_request("deviceId in the body does not match the one in the path")
        status = body.get("status")
        if status not in ("enabled", "disabled"):
            raise _bad_request('status must be "enabled" or "disabled"')
        reason = body.get("statusReason")
        if reason is not None and not isinstance(reason, str):
            raise _bad_request("statusReason must be a string")
        try:
            self.devices.set_device_status(device_id, status)
        except NotFoundError as exc:
            raise _device_not_found(device_id) from exc
        log.info("device %s %s", device_id, status)
        return self.require_device(device_id)

    def device_view(self, device: DeviceRecord, connected: bool) -> dict[str, Any]:
        """A device identity as the service API shows it (Azure's ``Device`` shape)."""
        auth: dict[str, Any] = {"type": device.auth.get("type", "sas")}
        keys = device.keys
        if auth["type"] == "sas" and keys:
            auth["symmetricKey"] = {
                "primaryKey": keys[0],
                "secondaryKey": keys[1] if len(keys) > 1 else None,
            }
        prints = _strings(device.auth, "thumbprints", "issuedThumbprints")
        if prints:
            auth["x509Thumbprint"] = {
                "primaryThumbprint": prints[0],
                "secondaryThumbprint": prints[1] if len(prints) > 1 else None,
            }
        return {
            "deviceId": device.device_id,
            "iotHubHostName": device.hub,
            "status": device.status,
            "connectionState": "Connected" if connected else "Disconnected",
            "authentication": auth,
            "cloudToDeviceMessageCount": self.devices.count_c2d(device.device_id),
            "createdDateTimeUtc": device.created,
        }

    def twin_view(self, device_id: str, connected: bool) -> dict[str, Any]:
        """A twin as the service API shows it (Azure's ``Twin`` shape, without metadata)."""
        device = self.require_device(device_id)
        twin = self.devices.get_twin(device_id)
        if twin is None:
            raise _device_not_found(device_id)
        return self._twin_json(device, twin, connected)

    @staticmethod
    def _twin_json(device: DeviceRecord, twin: TwinRecord, connected: bool) -> dict[str, Any]:
        return {
            "deviceId": device.device_id,
            "status": device.status,
            "connectionState": "Connected" if connected else "Disconnected",
            "tags": twin.tags,
            "properties": {
                "desired": _section(twin.desired, twin.desired_version),
                "reported": _section(twin.reported, twin.reported_version),
            },
        }

    def update_twin(
        self, device_id: str, body: object, connected: bool
    ) -> tuple[dict[str, Any], Reply | None]:
        """Merge a service patch ``{"tags": {..}, "properties": {"desired": {..}}}`` into the twin.

        Returns the new twin and, when desired properties changed, the notification for the
        device (its ``$version`` is the new desired version). 400 on a limit violation.
        """
        device = self.require_device(device_id)
        if not isinstance(body, dict):
            raise _bad_request("the body must be a JSON object")
        tags_patch = body.get("tags")
        if tags_patch is not None and not isinstance(tags_patch, dict):
            raise _bad_request("tags must be a JSON object")
        properties = body.get("properties")
        if properties is None:
            properties = {}
        if not isinstance(properties, dict):
            raise _bad_request("properties must be a JSON object")
        if properties.get("reported") is not None:
            raise _bad_request("reported properties can only be changed by the device")
        desired_patch = properties.get("desired")
        if desired_patch is not None and not isinstance(desired_patch, dict):
            raise _bad_request("properties.desired must be a JSON object")
        desired_patch = {k: v for k, v in (desired_patch or {}).items() if k not in READ_ONLY_KEYS}
        try:
            if tags_patch:
                validate_section(tags_patch, max_size=MAX_TAGS_SIZE, patch=True)
            if desired_patch:
                validate_section(desired_patch, max_size=MAX_DESIRED_SIZE, patch=True)

            def change(twin: TwinRecord) -> TwinRecord:
                tags, desired, version = twin.tags, twin.desired, twin.desired_version
                if tags_patch:
                    tags = apply_patch(copy.deepcopy(tags), tags_patch)
                    validate_section(tags, max_size=MAX_TAGS_SIZE)
                if desired_patch:
                    desired = apply_patch(copy.deepcopy(desired), desired_patch)
                    validate_section(desired, max_size=MAX_DESIRED_SIZE)
                    version += 1
                return dataclasses.replace(
                    twin, tags=tags, desired=desired, desired_version=version
                )

            updated = self.devices.update_twin(device_id, change)
        except HubParseError as exc:
            raise _bad_request(f"twin update refused: {exc}") from exc
        except NotFoundError as exc:
            raise _device_not_found(device_id) from exc
        push: Reply | None = None
        if desired_patch:
            notification = {**desired_patch, "$version": updated.desired_version}
            push = Reply(desired_patch_topic(updated.desired_version), encode_json(notification))
        return self._twin_json(device, updated, connected), push

    # -- service API: direct methods ----------------------------------------------------------

    def parse_invocation(self, body: object) -> MethodInvocation:
        """Check ``{"methodName", "payload", "responseTimeoutInSeconds"}`` (400 if invalid)."""
        if not isinstance(body, dict):
            raise _bad_request("the body must be a JSON object")
        name = body.get("methodName")
        if not isinstance(name, str) or not name:
            raise _bad_request("methodName must be a non-empty string")
        try:
            method_request_topic(name, "1")
        except HubParseError as exc:
            raise _bad_request(f"invalid methodName: {exc}") from exc
        payload = body.get("payload")
        try:
            size = len(encode_json(payload))
        except HubParseError as exc:
            raise _bad_request(str(exc)) from exc
        if size > self.config.max_method_payload:
            raise HubServiceError(
                413,
                ERROR_TOO_LARGE,
                f"method payload of {size} bytes exceeds {self.config.max_method_payload}",
            )
        timeout = self._seconds(
            body.get("responseTimeoutInSeconds"),
            "responseTimeoutInSeconds",
            self.config.default_method_timeout,
            self.config.min_method_timeout,
        )
        self._seconds(body.get("connectTimeoutInSeconds"), "connectTimeoutInSeconds", 0.0, 0.0)
        return MethodInvocation(name, payload, timeout)

    def _seconds(self, value: object, field: str, default: float, minimum: float) -> float:
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _bad_request(f"{field} must be a number of seconds")
        seconds = float(value)
        if not math.isfinite(seconds) or not minimum <= seconds <= self.config.max_method_timeout:
            raise _bad_request(
                f"{field} must be between {minimum:g} and {self.config.max_method_timeout:g}"
            )
        return seconds

    @staticmethod
    def method_request(invocation: MethodInvocation, rid: str) -> Reply:
        """The request message for the device (an absent payload is sent as JSON ``null``)."""
        return Reply(method_request_topic(invocation.name, rid), encode_json(invocation.payload))

    # -- service API: cloud-to-device ---------------------------------------------------------

    def enqueue_c2d(self, device_id: str, body: object, now: float) -> C2DRecord:
        """Queue a C2D message from a service API body (see :meth:`parse_c2d_body`)."""
        self.require_device(device_id)
        payload, properties = self.parse_c2d_body(device_id, body)
        try:
            return self.devices.enqueue_c2d(
                device_id, payload, properties, utc_now_iso(now), self.config.max_c2d_pending
            )
        except C2DQueueFull as exc:
            raise HubServiceError(403, ERROR_QUEUE_FULL, str(exc)) from exc

    def parse_c2d_body(self, device_id: str, body: object) -> tuple[bytes, dict[str, str]]:
        """Check a C2D body; return the payload and its property bag (``$.`` system keys).

        ``{"payload": text or any JSON, "payloadBase64": str, "properties": {str: str},
        "messageId", "correlationId", "userId", "contentType", "contentEncoding",
        "expiryTimeUtc"}``: text is sent as UTF-8, other JSON values as compact JSON; at most one
        of ``payload`` and ``payloadBase64``; a message id is generated when absent.
        """
        if not isinstance(body, dict):
            raise _bad_request("the body must be a JSON object")
        if "payload" in body and "payloadBase64" in body:
            raise _bad_request("give payload or payloadBase64, not both")
        payload = b""
        if "payloadBase64" in body:
            text = body["payloadBase64"]
            if not isinstance(text, str):
                raise _bad_request("payloadBase64 must be a base64 string")
            try:
                payload = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise _bad_request("payloadBase64 is not valid base64") from exc
        elif "payload" in body:
            value = body["payload"]
            try:
                payload = value.encode("utf-8") if isinstance(value, str) else encode_json(value)
            except (UnicodeEncodeError, HubParseError) as exc:
                raise _bad_request(f"unusable payload: {exc}") from exc
        application = body.get("properties") or {}
        if not isinstance(application, dict) or not all(
            isinstance(k, str) and k and isinstance(v, str) for k, v in application.items()
        ):
            raise _bad_request("properties must map non-empty strings to strings")
        fields: dict[str, str] = {}
        for name, attribute in _C2D_SYSTEM_FIELDS.items():
            value = body.get(name)
            if value is None:
                continue
            if not isinstance(value, str) or not value:
                raise _bad_request(f"{name} must be a non-empty string")
            fields[attribute] = value
        fields.setdefault("message_id", str(uuid.uuid4()))
        try:
            message = Message(payload=payload, properties=dict(application), **fields)
            bag = message_properties(message)
            c2d_topic(device_id, message)
        except (HubParseError, TypeError) as exc:
            raise _bad_request(f"invalid message: {exc}") from exc
        size = len(payload) + sum(len(k) + len(v) for k, v in bag.items())
        if size > self.config.max_c2d_bytes:
            raise HubServiceError(
                413,
                ERROR_TOO_LARGE,
                f"message of {size} bytes exceeds {self.config.max_c2d_bytes}",
            )
        return payload, bag

    @staticmethod
    def c2d_reply(record: C2DRecord) -> Reply:
        """The delivery message of a queued C2D message."""
        message = message_from_properties(record.properties, record.payload)
        return Reply(c2d_topic(record.device_id, message), record.payload)

    # -- service API: telemetry ---------------------------------------------------------------

    def telemetry_since(self, device_id: str, since: int, limit: int) -> list[dict[str, Any]]:
        """Stored telemetry of a device after sequence number ``since`` (404 if unknown)."""
        self.require_device(device_id)
        return [
            {"seq": record.seq, **telemetry_envelope(record)}
            for record in self.devices.telemetry_since(device_id, since, limit)
        ]


def telemetry_envelope(record: TelemetryRecord) -> dict[str, Any]:
    """The JSON a stored or routed telemetry message is shown as; ``body`` is the UTF-8 text of
    the payload, or its base64 when it is not UTF-8 (``bodyEncoding`` says which)."""
    try:
        body, encoding = record.payload.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(record.payload).decode("ascii"), "base64"
    return {
        "deviceId": record.device_id,
        "properties": record.properties,
        "systemProperties": record.system_properties,
        "enqueuedTime": record.enqueued,
        "body": body,
        "bodyEncoding": encoding,
    }


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:20]} is out of range")
    return value


def _decode_json(payload: bytes) -> Any:
    """Any JSON value (not only objects) from a device's answer; NaN and infinities refused."""
    try:
        return json.loads(
            payload.decode("utf-8"), parse_constant=_reject_constant, parse_float=_finite_float
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HubParseError(str(exc)) from exc
