"""The emulator's DPS: authenticates devices at CONNECT and answers their registration requests.

Sans-IO: it takes a CONNECT's credentials or a PUBLISH and returns replies for that one connection;
the MQTT server moves the bytes. Time is an argument. Records go to the :class:`Store`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import uuid
from collections import deque
from dataclasses import dataclass, field

from dps_proto import (
    DpsParseError,
    ErrorBody,
    KeySigner,
    OperationStatus,
    RegistrationState,
    SasError,
    derive_device_key,
    dps_resource_uri,
    encode_json,
    parse_register_payload,
    parse_request_topic,
    parse_sas_token,
    parse_username,
    response_topic,
    verify_sas_token,
)

from .errors import ValidationError
from .models import (
    EnrollmentGroup,
    IndividualEnrollment,
    RegistrationRecord,
    SymmetricKeyAttestation,
    TpmAttestation,
    new_etag,
    utc_now_iso,
    validate_registration_id,
)
from .store import Store

log = logging.getLogger(__name__)

#: CONNACK return codes the DPS side uses (MQTT 3.1.1).
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5

#: Azure's payload limit for DPS requests.
MAX_DPS_PAYLOAD = 96 * 1024
#: The only topic filter a DPS client may subscribe to.
DPS_SUBSCRIPTION = "$dps/registrations/res/#"

# Error codes the emulator answers with (6 digits, the first three being the HTTP status).
ERROR_INVALID_REQUEST = 400004
ERROR_TPM_OVER_MQTT = 400010
ERROR_NO_HUB = 400208
ERROR_UNAUTHORIZED = 401002
ERROR_OPERATION_NOT_FOUND = 404203
ERROR_THROTTLED = 429001


class ConnectRefused(Exception):
    """A CONNECT must be refused with ``return_code``; ``reason`` is for the log only."""

    def __init__(self, return_code: int, reason: str) -> None:
        self.return_code = return_code
        self.reason = reason
        super().__init__(f"CONNECT refused ({return_code}): {reason}")


class ProtocolViolation(Exception):
    """The device sent something DPS does not allow: its connection must be closed."""


@dataclass(frozen=True)
class DpsIdentity:
    """Who an authenticated DPS connection belongs to, and by which enrollment."""

    registration_id: str
    id_scope: str
    api_version: str
    enrollment_group_id: str | None
    device_key: str


@dataclass(frozen=True)
class Reply:
    """A message to publish to the connection that asked."""

    topic: str
    payload: bytes


@dataclass(frozen=True)
class Answer:
    """A transport-neutral answer: status, JSON body and optional ``retry-after`` seconds."""

    status: int
    body: bytes
    retry_after: int | None = None

    def reply(self, rid: str) -> Reply:
        """The same answer as an MQTT response message for request ``rid``."""
        return Reply(response_topic(self.status, rid, self.retry_after), self.body)


@dataclass
class DpsConfig:
    """Behaviour knobs of the emulated DPS."""

    id_scope: str = "0ne00000000"
    #: ``retry-after`` (seconds) sent with every 202 answer.
    retry_after: int = 1
    #: Polls answered ``assigning`` before the result is revealed (to exercise polling).
    assigning_polls: int = 0
    #: Poll throttle: at most this many polls per registration in ``poll_window`` seconds.
    polls_per_window: int = 5
    poll_window: float = 10.0
    #: Operations are forgotten after this long, and at most ``max_operations`` are kept.
    operation_ttl: float = 600.0
    max_operations: int = 10_000


@dataclass
class _Operation:
    registration_id: str
    created: float
    status: OperationStatus
    polls_left: int


@dataclass
class DpsService:
    """The device-facing DPS logic, shared by every connection."""

    store: Store
    config: DpsConfig = field(default_factory=DpsConfig)
    _operations: dict[str, _Operation] = field(default_factory=dict)
    _poll_times: dict[str, deque[float]] = field(default_factory=dict)
    #: Keys issued through TPM challenges (registration id -> base64 key), and the SRKs used.
    _tpm_keys: dict[str, str] = field(default_factory=dict)
    _tpm_srks: dict[str, str] = field(default_factory=dict)
    #: Keys delivered to TPM devices for their hub (registration id -> base64 key).
    hub_keys: dict[str, str] = field(default_factory=dict)

    # -- CONNECT ----------------------------------------------------------------------------

    def authenticate(
        self, client_id: str, username: str | None, password: bytes | None, now: float
    ) -> DpsIdentity:
        """Check a CONNECT's credentials; :class:`ConnectRefused` says why not."""
        if username is None:
            raise ConnectRefused(CONNACK_BAD_CREDENTIALS, "no username")
        try:
            parsed = parse_username(username)
        except DpsParseError as exc:
            raise ConnectRefused(CONNACK_BAD_CREDENTIALS, str(exc)) from exc
        if parsed.id_scope.lower() != self.config.id_scope.lower():
            raise ConnectRefused(CONNACK_NOT_AUTHORIZED, f"unknown ID scope {parsed.id_scope!r}")
        try:
            registration_id = validate_registration_id(parsed.registration_id)
        except ValidationError as exc:
            raise ConnectRefused(CONNACK_IDENTIFIER_REJECTED, str(exc)) from exc
        if client_id.lower() != registration_id:
            raise ConnectRefused(
                CONNACK_IDENTIFIER_REJECTED, "client id differs from the registration id"
            )
        if not password:
            raise ConnectRefused(
                CONNACK_NOT_AUTHORIZED, "no SAS token (X.509 is not supported yet)"
            )
        try:
            token_text = password.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ConnectRefused(CONNACK_BAD_CREDENTIALS, "the SAS token is not UTF-8") from exc
        return self.verify_token(
            parsed.id_scope, parsed.registration_id, token_text, parsed.api_version, now
        )

    def verify_token(
        self, id_scope: str, registration_id: str, token_text: str, api_version: str, now: float
    ) -> DpsIdentity:
        """Check a registration SAS token (MQTT password or HTTPS Authorization header)."""
        if id_scope.lower() != self.config.id_scope.lower():
            raise ConnectRefused(CONNACK_NOT_AUTHORIZED, f"unknown ID scope {id_scope!r}")
        try:
            token = parse_sas_token(token_text)
        except SasError as exc:
            raise ConnectRefused(CONNACK_BAD_CREDENTIALS, f"malformed SAS token: {exc}") from exc
        resource = dps_resource_uri(id_scope, registration_id)
        reason = "no enrollment matches this registration id"
        for group_id, key in self._candidate_keys(registration_id.lower()):
            try:
                verify_sas_token(token, KeySigner.from_base64(key), resource, now)
            except SasError as exc:
                reason = str(exc)
                continue
            return DpsIdentity(
                registration_id=registration_id,
                id_scope=id_scope,
                api_version=api_version,
                enrollment_group_id=group_id,
                device_key=key,
            )
        raise ConnectRefused(CONNACK_NOT_AUTHORIZED, reason)

    def _candidate_keys(self, registration_id: str) -> list[tuple[str | None, str]]:
        """Device keys that may sign this device's token: its own enrollment's, else groups'."""
        enrollment = self.store.get_enrollment(registration_id)
        if enrollment is not None:
            att = enrollment.attestation
            if isinstance(att, SymmetricKeyAttestation):
                return [(None, att.primary_key), (None, att.secondary_key)]
            issued = self._tpm_keys.get(registration_id)
            return [(None, issued)] if issued else []
        keys: list[tuple[str | None, str]] = []
        for group in self.store.list_groups():
            att = group.attestation
            if isinstance(att, SymmetricKeyAttestation):
                for group_key in (att.primary_key, att.secondary_key):
                    keys.append(
                        (group.enrollment_group_id, derive_device_key(group_key, registration_id))
                    )
        return keys

    # -- SUBSCRIBE / PUBLISH ----------------------------------------------------------------

    @staticmethod
    def grant(topic_filter: str, requested_qos: int) -> int | None:
        """QoS granted for a subscription, or None to refuse it (only the response filter)."""
        if topic_filter != DPS_SUBSCRIPTION:
            return None
        return min(requested_qos, 1)

    def handle_publish(
        self, identity: DpsIdentity, topic: str, payload: bytes, now: float
    ) -> list[Reply]:
        """Answer a register or poll request; :class:`ProtocolViolation` closes the connection."""
        if len(payload) > MAX_DPS_PAYLOAD:
            raise ProtocolViolation(f"payload of {len(payload)} bytes exceeds {MAX_DPS_PAYLOAD}")
        try:
            request = parse_request_topic(topic)
        except DpsParseError as exc:
            raise ProtocolViolation(str(exc)) from exc
        if request.kind == "register":
            answer = self.register(identity, payload, now, transport="mqtt")
        else:
            assert request.operation_id is not None
            answer = self.poll(identity, request.operation_id, now)
        return [answer.reply(request.rid)]

    # -- register ---------------------------------------------------------------------------

    def register(
        self, identity: DpsIdentity, payload: bytes, now: float, *, transport: str = "mqtt"
    ) -> Answer:
        """Answer an authenticated register request."""
        self._expire_operations(now)
        try:
            body = parse_register_payload(payload)
        except DpsParseError as exc:
            return _error(400, ERROR_INVALID_REQUEST, f"invalid register request: {exc}", now)
        if body.registration_id.lower() != identity.registration_id.lower():
            return _error(
                400,
                ERROR_INVALID_REQUEST,
                "registrationId in the request differs from the credentials'",
                now,
            )
        if body.tpm is not None and transport == "mqtt":
            return _error(
                400,
                ERROR_TPM_OVER_MQTT,
                "TPM attestation is not supported over MQTT; use HTTPS or AMQP",
                now,
            )
        enrollment: IndividualEnrollment | EnrollmentGroup | None
        if identity.enrollment_group_id is None:
            enrollment = self.store.get_enrollment(identity.registration_id)
        else:
            enrollment = self.store.get_group(identity.enrollment_group_id)
        if enrollment is None:
            return _error(401, ERROR_UNAUTHORIZED, "the enrollment no longer exists", now)
        if enrollment.provisioning_status == "disabled":
            self._record(identity, "disabled", None, None, None, None, now)
            log.info("registration %s: enrollment disabled", identity.registration_id)
            status = OperationStatus(operation_id=None, status="disabled")
            return Answer(200, encode_json(status))
        result = self._assign(identity, enrollment, now)
        operation_id = _new_operation_id()
        self._operations[operation_id] = _Operation(
            identity.registration_id.lower(), now, result, self.config.assigning_polls
        )
        state = RegistrationState(registration_id=identity.registration_id, status="assigning")
        pending = OperationStatus(operation_id, "assigning", state)
        return Answer(202, encode_json(pending), self.config.retry_after)

    def register_tpm_challenge(
        self, id_scope: str, registration_id: str, payload: bytes, now: float
    ) -> Answer:
        """Answer an unauthenticated TPM register with 401 and an activation blob (HTTPS only).

        The device opens the blob in its TPM and registers again with a SAS token signed by the
        key inside; the service keeps that key to verify it.
        """
        if id_scope.lower() != self.config.id_scope.lower():
            return _error(401, ERROR_UNAUTHORIZED, f"unknown ID scope {id_scope!r}", now)
        try:
            body = parse_register_payload(payload)
        except DpsParseError as exc:
            return _error(400, ERROR_INVALID_REQUEST, f"invalid register request: {exc}", now)
        if body.registration_id.lower() != registration_id.lower():
            return _error(400, ERROR_INVALID_REQUEST, "registrationId differs from the URL's", now)
        if body.tpm is None:
            return _error(401, ERROR_UNAUTHORIZED, "no Authorization header", now)
        enrollment = self.store.get_enrollment(registration_id)
        att = enrollment.attestation if enrollment is not None else None
        if not isinstance(att, TpmAttestation) or not _same_key(
            att.endorsement_key, body.tpm.endorsement_key
        ):
            return _error(401, ERROR_UNAUTHORIZED, "no TPM enrollment matches this EK", now)
        srk = body.tpm.storage_root_key or att.storage_root_key
        if srk is None:
            return _error(400, ERROR_INVALID_REQUEST, "the request has no storageRootKey", now)
        from tpm.challenge import create_challenge
        from tpm.errors import TpmBlobError

        try:
            challenge = create_challenge(
                base64.b64decode(att.endorsement_key), base64.b64decode(srk)
            )
        except (TpmBlobError, ValueError) as exc:
            return _error(400, ERROR_INVALID_REQUEST, f"unusable TPM keys: {exc}", now)
        self._tpm_keys[registration_id.lower()] = base64.b64encode(challenge.key).decode()
        self._tpm_srks[registration_id.lower()] = srk
        log.info("registration %s: TPM challenge issued", registration_id)
        blob = base64.b64encode(challenge.blob).decode("ascii")
        return Answer(
            401,
            json.dumps(
                {"authenticationKey": blob, "keyName": "registration"}, separators=(",", ":")
            ).encode(),
        )

    def _assign(
        self,
        identity: DpsIdentity,
        enrollment: IndividualEnrollment | EnrollmentGroup,
        now: float,
    ) -> OperationStatus:
        """Pick the hub, record the registration, and return the final operation status."""
        hub = self._choose_hub(identity.registration_id, enrollment)
        if hub is None:
            message = "no linked IoT hub is available for this enrollment"
            record = self._record(
                identity, "failed", None, None, None, None, now, error=(ERROR_NO_HUB, message)
            )
            state = RegistrationState(
                registration_id=identity.registration_id,
                status="failed",
                error_code=ERROR_NO_HUB,
                error_message=message,
                created=record.created,
                last_updated=record.last_updated,
                etag=record.etag,
            )
            return OperationStatus(None, "failed", state)
        device_id = (
            enrollment.device_id
            if isinstance(enrollment, IndividualEnrollment) and enrollment.device_id
            else identity.registration_id
        )
        previous = self.store.get_registration(identity.registration_id)
        moved = previous is not None and previous.assigned_hub not in (None, hub)
        substatus = "deviceDataMigrated" if moved else "initialAssignment"
        record = self._record(identity, "assigned", hub, device_id, substatus, None, now)
        tpm_blob = self._tpm_hub_key(identity, enrollment)
        from .hub_service import register_assignment

        register_assignment(
            self.store,
            hub=hub,
            device_id=device_id,
            registration_id=identity.registration_id,
            enrollment=enrollment,
            device_key=identity.device_key,
            tpm_hub_key=self.hub_keys.get(identity.registration_id.lower()),
            now=now,
        )
        log.info("registration %s assigned to %s as %s", identity.registration_id, hub, device_id)
        state = RegistrationState(
            registration_id=identity.registration_id,
            status="assigned",
            assigned_hub=hub,
            device_id=device_id,
            substatus=substatus,
            created=record.created,
            last_updated=record.last_updated,
            etag=record.etag,
            symmetric_key_group=identity.enrollment_group_id,
            tpm_authentication_key=tpm_blob,
        )
        return OperationStatus(None, "assigned", state)

    def _tpm_hub_key(
        self, identity: DpsIdentity, enrollment: IndividualEnrollment | EnrollmentGroup
    ) -> str | None:
        """For TPM devices, a second activation blob carrying the key for the hub."""
        att = enrollment.attestation
        srk = self._tpm_srks.get(identity.registration_id.lower())
        if not isinstance(att, TpmAttestation) or srk is None:
            return None
        from tpm.challenge import create_challenge

        challenge = create_challenge(base64.b64decode(att.endorsement_key), base64.b64decode(srk))
        self.hub_keys[identity.registration_id.lower()] = base64.b64encode(challenge.key).decode()
        return base64.b64encode(challenge.blob).decode("ascii")

    def _choose_hub(
        self, registration_id: str, enrollment: IndividualEnrollment | EnrollmentGroup
    ) -> str | None:
        """Static hub if the enrollment names one, else hashed over its (linked) hubs."""
        linked = self.store.list_hubs()
        if enrollment.iot_hub_host_name:
            return enrollment.iot_hub_host_name if enrollment.iot_hub_host_name in linked else None
        hubs = sorted(h for h in (enrollment.iot_hubs or linked) if h in linked)
        if not hubs:
            return None
        digest = hashlib.sha256(registration_id.lower().encode("utf-8")).digest()
        return hubs[int.from_bytes(digest[:8], "big") % len(hubs)]

    def _record(
        self,
        identity: DpsIdentity,
        status: str,
        hub: str | None,
        device_id: str | None,
        substatus: str | None,
        payload: object,
        now: float,
        error: tuple[int, str] | None = None,
    ) -> RegistrationRecord:
        previous = self.store.get_registration(identity.registration_id)
        stamp = utc_now_iso(now)
        record = RegistrationRecord(
            registration_id=identity.registration_id.lower(),
            status=status,
            assigned_hub=hub,
            device_id=device_id,
            substatus=substatus,
            created=previous.created if previous is not None else stamp,
            last_updated=stamp,
            etag=new_etag(),
            error_code=error[0] if error else None,
            error_message=error[1] if error else None,
            enrollment_group_id=identity.enrollment_group_id,
            payload=payload,
        )
        self.store.put_registration(record)
        return record

    # -- poll -------------------------------------------------------------------------------

    def poll(self, identity: DpsIdentity, operation_id: str, now: float) -> Answer:
        """Answer an operation status request."""
        self._expire_operations(now)
        key = identity.registration_id.lower()
        times = self._poll_times.pop(key, None) or deque()
        self._poll_times[key] = times  # re-inserted: the dict stays in order of last poll
        while times and times[0] <= now - self.config.poll_window:
            times.popleft()
        if len(times) >= self.config.polls_per_window:
            wait = max(1, int(times[0] + self.config.poll_window - now + 0.999))
            return _error(
                429,
                ERROR_THROTTLED,
                "too many operation status requests",
                now,
                retry_after=wait,
            )
        times.append(now)
        operation = self._operations.get(operation_id)
        if operation is None or operation.registration_id != key:
            return _error(404, ERROR_OPERATION_NOT_FOUND, "operation not found", now)
        if operation.polls_left > 0:
            operation.polls_left -= 1
            state = RegistrationState(registration_id=identity.registration_id, status="assigning")
            pending = OperationStatus(operation_id, "assigning", state)
            return Answer(202, encode_json(pending), self.config.retry_after)
        final = OperationStatus(
            operation_id, operation.status.status, operation.status.registration_state
        )
        return Answer(200, encode_json(final))

    def _expire_operations(self, now: float) -> None:
        """Forget old operations: they sit in creation order, so only the oldest are looked at."""
        limit = now - self.config.operation_ttl
        operations = self._operations
        while operations:
            oldest = next(iter(operations))
            if operations[oldest].created >= limit and len(operations) < self.config.max_operations:
                break
            del operations[oldest]
        polls = self._poll_times
        while polls:
            quiet = next(iter(polls))
            if polls[quiet] and polls[quiet][-1] >= limit:
                break
            del polls[quiet]


def _new_operation_id() -> str:
    """An operation id of the form Azure uses: ``<digit>.<16 hex>.<uuid>``."""
    return f"{secrets.randbelow(10)}.{secrets.token_hex(8)}.{uuid.uuid4()}"


def _error(
    status: int,
    error_code: int,
    message: str,
    now: float,
    retry_after: int | None = None,
) -> Answer:
    body = ErrorBody(error_code, message, str(uuid.uuid4()), utc_now_iso(now))
    return Answer(status, encode_json(body), retry_after)


def _same_key(a_b64: str, b_b64: str) -> bool:
    """Whether two base64 texts carry the same bytes (padding and line breaks aside)."""
    try:
        return base64.b64decode(a_b64) == base64.b64decode(b_b64)
    except (ValueError, TypeError):
        return False
