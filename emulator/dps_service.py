"""The emulator's DPS: authenticates devices at CONNECT and answers their registration requests.

Sans-IO: it takes a CONNECT's credentials or a PUBLISH and returns replies for that one connection;
the MQTT server moves the bytes. Time is an argument. Records go to the :class:`Store`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import secrets
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from dps_proto import (
    DpsParseError,
    ErrorBody,
    KeySigner,
    OperationStatus,
    RegisterRequest,
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

from .allocation import (
    DEFAULT_WEBHOOK_TIMEOUT,
    ERROR_CUSTOM_ALLOCATION_FAILED,
    AllocationCall,
    LinkedHub,
    WebhookOutcome,
    build_allocation_request,
    candidate_hubs,
    choose_geo_latency,
    choose_hashed,
    effective_policy,
    interpret_webhook,
    static_hub,
)
from .errors import EmulatorError, ValidationError
from .hub_store import HubStore
from .models import (
    EnrollmentGroup,
    IndividualEnrollment,
    RegistrationRecord,
    SymmetricKeyAttestation,
    TpmAttestation,
    X509Attestation,
    new_etag,
    utc_now_iso,
    validate_registration_id,
)
from .store import Store

if TYPE_CHECKING:
    from .x509 import CertificateIssuer

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
    #: X.509 devices: ``registrationState.x509`` (``certificateInfo``, ``enrollmentGroupId``).
    x509: dict[str, Any] | None = field(default=None, compare=False)
    #: A register request's CSR (DER), once checked; DPS issues a certificate for it.
    csr: bytes | None = field(default=None, compare=False, repr=False)


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
    #: The service-level allocation policy (``hashed`` or ``geoLatency``); an enrollment's own
    #: ``allocationPolicy`` wins.
    allocation_policy: str = "hashed"
    #: Seconds a custom allocation webhook may take before the registration fails.
    webhook_timeout: float = DEFAULT_WEBHOOK_TIMEOUT


@dataclass(frozen=True)
class _PendingAllocation:
    """What a register request left for its custom allocation webhook's answer to finish."""

    identity: DpsIdentity
    enrollment: IndividualEnrollment | EnrollmentGroup
    linked_hubs: tuple[str, ...]


@dataclass
class _Operation:
    registration_id: str
    created: float
    #: The final status; None while a custom allocation webhook is being called.
    status: OperationStatus | None
    polls_left: int
    pending: _PendingAllocation | None = None


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
    #: Signs certificates for register requests with a ``csr`` (the emulator's CA); None: refused.
    issuer: CertificateIssuer | None = None
    #: Custom allocation webhook calls waiting to be made (see :meth:`take_allocation_calls`).
    _allocation_calls: list[AllocationCall] = field(default_factory=list)
    #: Called (on the caller's thread) when a webhook call has been queued.
    allocation_listener: Callable[[], None] | None = None
    #: Called with a device id whose hub identity moved to another hub (its old connection
    #: should be closed, as Azure removes the old registration).
    device_moved: Callable[[str], object] | None = None

    # -- CONNECT ----------------------------------------------------------------------------

    def authenticate(
        self,
        client_id: str,
        username: str | None,
        password: bytes | None,
        now: float,
        *,
        client_chain: Sequence[bytes] = (),
    ) -> DpsIdentity:
        """Check a CONNECT's credentials: a SAS token, or with an empty password the TLS client
        certificate chain (DER, leaf first); :class:`ConnectRefused` says why not."""
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
            if not client_chain:
                raise ConnectRefused(
                    CONNACK_NOT_AUTHORIZED, "neither a SAS token nor a client certificate"
                )
            return self.verify_certificate(
                parsed.id_scope, parsed.registration_id, client_chain, parsed.api_version, now
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

    def verify_certificate(
        self,
        id_scope: str,
        registration_id: str,
        chain: Sequence[bytes],
        api_version: str,
        now: float,
    ) -> DpsIdentity:
        """Check an X.509 device's TLS client certificate chain (DER, leaf first).

        The leaf's CN must be the registration id and the leaf valid at ``now``. An individual
        enrollment of that registration id must hold the leaf itself (SHA-1 or SHA-256
        thumbprint); without one, an enrollment group's signing certificate must be reached from
        the leaf through the presented certificates (:func:`emulator.x509.verify_chain`).
        :class:`ConnectRefused` (not authorized) says why not.
        """
        from .x509 import (
            CertificateRejected,
            certificate_info,
            check_validity,
            common_name,
            load_chain,
            matches_thumbprint,
            thumbprints,
        )

        if id_scope.lower() != self.config.id_scope.lower():
            raise ConnectRefused(CONNACK_NOT_AUTHORIZED, f"unknown ID scope {id_scope!r}")
        try:
            validate_registration_id(registration_id)
        except ValidationError as exc:
            raise ConnectRefused(CONNACK_IDENTIFIER_REJECTED, str(exc)) from exc
        try:
            certs = load_chain(chain)
            leaf = certs[0]
            name = common_name(leaf)
            if name is None or name.lower() != registration_id.lower():
                raise CertificateRejected(
                    f"the certificate's CN {name!r} is not the registration id {registration_id!r}"
                )
            check_validity(leaf, now, "the device certificate")
            info = certificate_info(leaf)
            enrollment = self.store.get_enrollment(registration_id)
            if enrollment is not None:
                att = enrollment.attestation
                if not isinstance(att, X509Attestation):
                    raise CertificateRejected("the individual enrollment is not an X.509 one")
                from cryptography import x509 as _x509

                enrolled = [_x509.load_pem_x509_certificate(p.encode()) for p in att.certificates]
                wanted = [print_ for cert in enrolled for print_ in thumbprints(cert)]
                if not matches_thumbprint(leaf, wanted):
                    raise CertificateRejected("the certificate is not the individual enrollment's")
                group_id: str | None = None
                x509_state: dict[str, Any] = {"certificateInfo": info}
            else:
                group_id, signer_info = self._x509_group(certs, now)
                x509_state = {
                    "certificateInfo": info,
                    "enrollmentGroupId": group_id,
                    "signingCertificateInfo": signer_info,
                }
        except CertificateRejected as exc:
            raise ConnectRefused(CONNACK_NOT_AUTHORIZED, f"invalid certificate: {exc}") from exc
        return DpsIdentity(
            registration_id=registration_id,
            id_scope=id_scope,
            api_version=api_version,
            enrollment_group_id=group_id,
            device_key="",
            x509=x509_state,
        )

    def _x509_group(self, chain: list[Any], now: float) -> tuple[str, dict[str, Any]]:
        """The X.509 group whose signing certificate the chain leads to, and that certificate's
        info; :class:`~emulator.x509.CertificateRejected` if none does."""
        from cryptography import x509 as _x509

        from .x509 import CertificateRejected, certificate_info, verify_chain

        reasons: list[str] = []
        for group in self.store.list_groups():
            att = group.attestation
            if not isinstance(att, X509Attestation):
                continue
            for pem in att.certificates:
                anchor = _x509.load_pem_x509_certificate(pem.encode())
                try:
                    verify_chain(chain, anchor, now)
                except CertificateRejected as exc:
                    reasons.append(f"{group.enrollment_group_id}: {exc}")
                    continue
                return group.enrollment_group_id, certificate_info(anchor)
        detail = "; ".join(reasons[:3]) if reasons else "there are no X.509 enrollment groups"
        raise CertificateRejected(f"no enrollment matches the certificate ({detail})")

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
        if body.csr is not None:
            try:
                identity = self._checked_csr(identity, body.csr)
            except EmulatorError as exc:
                log.info("registration %s: CSR refused: %s", identity.registration_id, exc)
                return _error(400, ERROR_INVALID_REQUEST, str(exc), now)
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
        operation_id = _new_operation_id()
        operation = _Operation(
            identity.registration_id.lower(), now, None, self.config.assigning_polls
        )
        self._operations[operation_id] = operation
        operation.status = self._assign(identity, enrollment, body, operation_id, now)
        state = RegistrationState(registration_id=identity.registration_id, status="assigning")
        pending = OperationStatus(operation_id, "assigning", state)
        return Answer(202, encode_json(pending), self.config.retry_after)

    def _checked_csr(self, identity: DpsIdentity, csr: str) -> DpsIdentity:
        """The identity carrying a register request's CSR once it is acceptable (api-version,
        signature, CN = registration id, EC P-384); :class:`~emulator.x509.CsrError` if not."""
        from cryptography.hazmat.primitives import serialization

        from .x509 import CSR_API_VERSION, CsrError, parse_csr

        if identity.api_version[:10] < CSR_API_VERSION[:10]:
            raise CsrError(
                f"csr needs api-version {CSR_API_VERSION} or later (the request used"
                f" {identity.api_version!r})"
            )
        if self.issuer is None:
            raise CsrError("this DPS does not issue certificates (no CA configured)")
        request = parse_csr(csr, identity.registration_id)
        der = request.public_bytes(serialization.Encoding.DER)
        return dataclasses.replace(identity, csr=der)

    def _certificate_state(
        self, identity: DpsIdentity, state: RegistrationState, now: float
    ) -> RegistrationState:
        """An assigned registration's state with what X.509 and CSRs add: ``x509`` (instead of
        ``symmetricKey``) for certificate devices, and for a CSR the issued chain, whose leaf
        the device's hub identity then accepts (by thumbprint)."""
        if identity.x509 is None and identity.csr is None:
            return state
        changes: dict[str, Any] = {}
        if identity.x509 is not None:
            changes["x509"] = {k: v for k, v in identity.x509.items() if v is not None}
            changes["symmetric_key_group"] = None
        if identity.csr is not None and self.issuer is not None and state.device_id:
            from cryptography import x509 as _x509

            from .hub_service import add_device_thumbprint
            from .x509 import thumbprints

            request = _x509.load_der_x509_csr(identity.csr)
            chain = self.issuer.issue(request, identity.registration_id, now)
            leaf = _x509.load_der_x509_certificate(chain[0])
            add_device_thumbprint(self.store, state.device_id, thumbprints(leaf)[1])
            changes["issued_certificate_chain"] = tuple(
                base64.b64encode(der).decode("ascii") for der in chain
            )
            log.info(
                "registration %s: issued a client certificate from its CSR",
                identity.registration_id,
            )
        return dataclasses.replace(state, **changes)

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
        request: RegisterRequest,
        operation_id: str,
        now: float,
    ) -> OperationStatus | None:
        """Pick the hub by the enrollment's allocation policy and finish the registration; for
        ``custom``, queue the webhook call instead and return None (see
        :meth:`complete_allocation`)."""
        policy = effective_policy(enrollment, self.config.allocation_policy)
        linked = self.store.list_linked_hubs()
        candidates = candidate_hubs(enrollment, linked)
        if policy == "custom":
            definition = enrollment.custom_allocation_definition
            if definition is None:
                return self._failed(
                    identity,
                    ERROR_CUSTOM_ALLOCATION_FAILED,
                    "Custom allocation failed: the enrollment has no customAllocationDefinition",
                    now,
                )
            names = tuple(hub.name for hub in candidates)
            current_hub, current_device = self._current_assignment(identity, enrollment, linked)
            body = build_allocation_request(
                enrollment,
                registration_id=identity.registration_id,
                linked_hubs=names,
                current_hub=current_hub,
                current_device_id=current_device,
                payload=request.payload,
                attestation=identity.x509,
            )
            self._operations[operation_id].pending = _PendingAllocation(
                identity, enrollment, names
            )
            self._allocation_calls.append(
                AllocationCall(operation_id, definition["webhookUrl"], body, names)
            )
            log.info("registration %s: custom allocation webhook queued", identity.registration_id)
            if self.allocation_listener is not None:
                self.allocation_listener()
            return None
        hub = self._choose_hub(identity.registration_id, enrollment, policy, linked, candidates)
        if hub is None:
            return self._failed(
                identity,
                ERROR_NO_HUB,
                f"no linked IoT hub is available for this enrollment ({policy} allocation)",
                now,
            )
        return self._complete(identity, enrollment, hub, now)

    def take_allocation_calls(self) -> list[AllocationCall]:
        """The webhook calls queued since the last time (the caller makes them, off the loop,
        and reports each with :meth:`complete_allocation`)."""
        calls, self._allocation_calls = self._allocation_calls, []
        return calls

    def complete_allocation(self, operation_id: str, outcome: WebhookOutcome, now: float) -> bool:
        """Finish the operation waiting for a webhook with what the webhook did; False when
        there is no such operation any more (expired, or already completed)."""
        operation = self._operations.get(operation_id)
        if operation is None or operation.pending is None:
            return False
        pending, operation.pending = operation.pending, None
        identity = pending.identity
        decision = interpret_webhook(outcome, pending.linked_hubs)
        if decision.hub is None:
            code = decision.error_code or ERROR_CUSTOM_ALLOCATION_FAILED
            message = decision.error_message or "Custom allocation failed"
            log.info("registration %s: %s", identity.registration_id, message)
            operation.status = self._failed(identity, code, message, now)
            return True
        try:
            operation.status = self._complete(
                identity,
                pending.enrollment,
                decision.hub,
                now,
                initial_twin=decision.initial_twin,
                payload=decision.payload,
            )
        except EmulatorError as exc:
            log.error("registration %s: cannot assign: %s", identity.registration_id, exc)
            operation.status = self._failed(
                identity, ERROR_CUSTOM_ALLOCATION_FAILED, f"Custom allocation failed: {exc}", now
            )
        return True

    def _failed(
        self, identity: DpsIdentity, error_code: int, message: str, now: float
    ) -> OperationStatus:
        """Record a failed registration and return its final operation status."""
        record = self._record(
            identity, "failed", None, None, None, None, now, error=(error_code, message)
        )
        state = RegistrationState(
            registration_id=identity.registration_id,
            status="failed",
            error_code=error_code,
            error_message=message,
            created=record.created,
            last_updated=record.last_updated,
            etag=record.etag,
        )
        return OperationStatus(None, "failed", state)

    @staticmethod
    def _device_id(
        identity: DpsIdentity, enrollment: IndividualEnrollment | EnrollmentGroup
    ) -> str:
        """The hub device id: an individual enrollment's ``deviceId``, else the registration id."""
        if isinstance(enrollment, IndividualEnrollment) and enrollment.device_id:
            return enrollment.device_id
        return identity.registration_id

    def _current_assignment(
        self,
        identity: DpsIdentity,
        enrollment: IndividualEnrollment | EnrollmentGroup,
        linked: list[LinkedHub],
    ) -> tuple[str | None, str | None]:
        """The linked hub the device's identity lives on now, and its device id (or Nones)."""
        device_id = self._device_id(identity, enrollment)
        device = HubStore.attached(self.store).get_device(device_id)
        if device is None or device.hub not in {hub.name for hub in linked}:
            return None, None
        return device.hub, device.device_id

    def _complete(
        self,
        identity: DpsIdentity,
        enrollment: IndividualEnrollment | EnrollmentGroup,
        hub: str,
        now: float,
        *,
        initial_twin: dict[str, Any] | None = None,
        payload: Any = None,
    ) -> OperationStatus:
        """Assign the device to ``hub`` as its reprovision policy allows, create or move its hub
        identity, record the registration, and return the final operation status.

        Reprovisioning (a device that already has an identity on a linked hub):
        ``updateHubAssignment: false`` keeps it where it is; moving to another hub migrates the
        twin (``deviceDataMigrated``) or, with ``migrateDeviceData: false``, starts it again from
        the initial twin (``deviceDataReset``); moving back to a hub the device was on before is
        ``reprovisionedToInitialAssignment``. Staying on the same hub is ``initialAssignment``.
        """
        device_id = self._device_id(identity, enrollment)
        linked = self.store.list_linked_hubs()
        current_hub, _ = self._current_assignment(identity, enrollment, linked)
        policy = enrollment.reprovision_policy or {}
        update = policy.get("updateHubAssignment", True)
        migrate = policy.get("migrateDeviceData", True)
        substatus = "initialAssignment"
        reset = False
        if current_hub is not None and not update:
            hub = current_hub
        elif current_hub is not None and hub != current_hub:
            reset = not migrate
            if hub in self.store.registration_hubs(identity.registration_id):
                substatus = "reprovisionedToInitialAssignment"
            else:
                substatus = "deviceDataMigrated" if migrate else "deviceDataReset"
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
            initial_twin=initial_twin,
            reset_twin=reset,
        )
        self.store.add_registration_hub(identity.registration_id, hub)
        record = self._record(identity, "assigned", hub, device_id, substatus, payload, now)
        if current_hub is not None and hub != current_hub:
            log.info(
                "registration %s moved from %s to %s (%s)",
                identity.registration_id,
                current_hub,
                hub,
                substatus,
            )
            if self.device_moved is not None:
                self.device_moved(device_id)
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
            payload=payload,
            symmetric_key_group=identity.enrollment_group_id,
            tpm_authentication_key=tpm_blob,
        )
        state = self._certificate_state(identity, state, now)
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
        self,
        registration_id: str,
        enrollment: IndividualEnrollment | EnrollmentGroup,
        policy: str,
        linked: list[LinkedHub],
        candidates: list[LinkedHub],
    ) -> str | None:
        """``static``: the enrollment's hub, if linked; ``geoLatency``: the lowest latency;
        else ``hashed`` over the candidates, weighted by ``allocationWeight``."""
        if policy == "static":
            hub = static_hub(enrollment)
            return hub if hub in {h.name for h in linked} else None
        if policy == "geoLatency":
            return choose_geo_latency(registration_id, candidates)
        return choose_hashed(registration_id, candidates)

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
            x509=None
            if identity.x509 is None
            else {k: v for k, v in identity.x509.items() if v is not None},
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
        if operation.status is None:  # the custom allocation webhook has not answered yet
            state = RegistrationState(registration_id=identity.registration_id, status="assigning")
            pending = OperationStatus(operation_id, "assigning", state)
            return Answer(202, encode_json(pending), max(1, self.config.retry_after))
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
