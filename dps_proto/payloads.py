"""JSON payloads of the DPS device protocol: register requests, operation status and error bodies.

Standard library only. Parsers accept unknown fields and any field order, and raise only
:class:`~dps_proto.errors.DpsParseError` on anything else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Union

from .errors import DpsParseError

STATUSES = ("unassigned", "assigning", "assigned", "failed", "disabled")
FINAL_STATUSES = ("assigned", "failed", "disabled")
#: A DPS payload larger than this is refused outright (Azure limits requests to 96 KB).
MAX_PAYLOAD_BYTES = 96 * 1024


def _load_object(data: bytes, what: str) -> dict[str, Any]:
    if not isinstance(data, (bytes, bytearray)):
        raise DpsParseError(f"{what} must be bytes")
    if len(data) > MAX_PAYLOAD_BYTES:
        raise DpsParseError(f"{what} is larger than {MAX_PAYLOAD_BYTES} bytes")
    try:
        value = json.loads(bytes(data).decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DpsParseError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise DpsParseError(f"{what} must be a JSON object")
    return value


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _opt_str(obj: dict[str, Any], key: str, where: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise DpsParseError(f"{where}.{key} must be a string")
    return value


def _opt_int(obj: dict[str, Any], key: str, where: str) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise DpsParseError(f"{where}.{key} must be an integer")
    return value


@dataclass(frozen=True)
class TpmAttestation:
    """Public TPM data a device sends: base64 of the marshalled TPM2B_PUBLIC of EK and SRK."""

    endorsement_key: str
    storage_root_key: str | None = None


@dataclass(frozen=True)
class RegisterRequest:
    """The body of a register request."""

    registration_id: str
    payload: Any = None
    tpm: TpmAttestation | None = None
    csr: str | None = None


def build_register_payload(request: RegisterRequest) -> bytes:
    """Serialise a register request as Azure expects it."""
    body: dict[str, Any] = {"registrationId": request.registration_id}
    if request.tpm is not None:
        tpm: dict[str, str] = {"endorsementKey": request.tpm.endorsement_key}
        if request.tpm.storage_root_key is not None:
            tpm["storageRootKey"] = request.tpm.storage_root_key
        body["tpm"] = tpm
    if request.payload is not None:
        body["payload"] = request.payload
    if request.csr is not None:
        body["csr"] = request.csr
    try:
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise DpsParseError(f"the custom payload is not JSON-serialisable: {exc}") from exc


def parse_register_payload(data: bytes) -> RegisterRequest:
    """Parse a register request body (the service's side)."""
    body = _load_object(data, "register request")
    registration_id = _opt_str(body, "registrationId", "request")
    if not registration_id:
        raise DpsParseError("register request has no registrationId")
    tpm_obj = body.get("tpm")
    tpm: TpmAttestation | None = None
    if tpm_obj is not None:
        if not isinstance(tpm_obj, dict):
            raise DpsParseError("request.tpm must be an object")
        ek = _opt_str(tpm_obj, "endorsementKey", "request.tpm")
        if not ek:
            raise DpsParseError("request.tpm has no endorsementKey")
        tpm = TpmAttestation(ek, _opt_str(tpm_obj, "storageRootKey", "request.tpm"))
    return RegisterRequest(
        registration_id=registration_id,
        payload=body.get("payload"),
        tpm=tpm,
        csr=_opt_str(body, "csr", "request"),
    )


@dataclass(frozen=True)
class RegistrationState:
    """``registrationState`` of an operation status (Azure's DeviceRegistrationResult)."""

    registration_id: str | None = None
    status: str | None = None
    assigned_hub: str | None = None
    device_id: str | None = None
    substatus: str | None = None
    error_code: int | None = None
    error_message: str | None = None
    created: str | None = None
    last_updated: str | None = None
    etag: str | None = None
    payload: Any = None
    tpm_authentication_key: str | None = None
    symmetric_key_group: str | None = None
    issued_certificate_chain: tuple[str, ...] | None = None
    #: ``x509`` of an X.509 registration: ``certificateInfo``, ``enrollmentGroupId``, ... as sent.
    x509: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """Azure's JSON shape, without absent fields."""
        out: dict[str, Any] = {
            "registrationId": self.registration_id,
            "createdDateTimeUtc": self.created,
            "assignedHub": self.assigned_hub,
            "deviceId": self.device_id,
            "status": self.status,
            "substatus": self.substatus,
            "errorCode": self.error_code,
            "errorMessage": self.error_message,
            "lastUpdatedDateTimeUtc": self.last_updated,
            "etag": self.etag,
            "payload": self.payload,
        }
        if self.tpm_authentication_key is not None:
            out["tpm"] = {"authenticationKey": self.tpm_authentication_key}
        if self.symmetric_key_group is not None:
            out["symmetricKey"] = {"enrollmentGroupId": self.symmetric_key_group}
        if self.x509 is not None:
            out["x509"] = dict(self.x509)
        if self.issued_certificate_chain is not None:
            out["issuedCertificateChain"] = list(self.issued_certificate_chain)
        return {key: value for key, value in out.items() if value is not None}


def _parse_registration_state(obj: object) -> RegistrationState:
    if not isinstance(obj, dict):
        raise DpsParseError("registrationState must be an object")
    where = "registrationState"
    status = _opt_str(obj, "status", where)
    if status is not None and status not in STATUSES:
        raise DpsParseError(f"registrationState.status {status[:40]!r} is unknown")
    hub = _opt_str(obj, "assignedHub", where)
    device = _opt_str(obj, "deviceId", where)
    if (hub is None) != (device is None):
        raise DpsParseError("registrationState has assignedHub without deviceId or the reverse")
    tpm = obj.get("tpm")
    auth_key: str | None = None
    if tpm is not None:
        if not isinstance(tpm, dict):
            raise DpsParseError("registrationState.tpm must be an object")
        auth_key = _opt_str(tpm, "authenticationKey", "registrationState.tpm")
    sym = obj.get("symmetricKey")
    group: str | None = None
    if sym is not None:
        if not isinstance(sym, dict):
            raise DpsParseError("registrationState.symmetricKey must be an object")
        group = _opt_str(sym, "enrollmentGroupId", "registrationState.symmetricKey")
    x509 = obj.get("x509")
    if x509 is not None and not isinstance(x509, dict):
        raise DpsParseError("registrationState.x509 must be an object")
    x509 = x509 or None  # Azure sends "x509": {} for devices that are not X.509 ones
    chain_obj = obj.get("issuedCertificateChain")
    chain: tuple[str, ...] | None = None
    if chain_obj is not None:
        if not isinstance(chain_obj, list) or not all(isinstance(c, str) for c in chain_obj):
            raise DpsParseError("registrationState.issuedCertificateChain must be a string list")
        chain = tuple(chain_obj)
    return RegistrationState(
        registration_id=_opt_str(obj, "registrationId", where),
        status=status,
        assigned_hub=hub,
        device_id=device,
        substatus=_opt_str(obj, "substatus", where),
        error_code=_opt_int(obj, "errorCode", where),
        error_message=_opt_str(obj, "errorMessage", where),
        created=_opt_str(obj, "createdDateTimeUtc", where),
        last_updated=_opt_str(obj, "lastUpdatedDateTimeUtc", where),
        etag=_opt_str(obj, "etag", where),
        payload=obj.get("payload"),
        tpm_authentication_key=auth_key,
        symmetric_key_group=group,
        issued_certificate_chain=chain,
        x509=x509,
    )


@dataclass(frozen=True)
class OperationStatus:
    """Azure's RegistrationOperationStatus: the answer to a register or a poll."""

    operation_id: str | None
    status: str
    registration_state: RegistrationState | None = None

    def to_json(self) -> dict[str, Any]:
        """Azure's JSON shape."""
        out: dict[str, Any] = {"operationId": self.operation_id or "", "status": self.status}
        if self.registration_state is not None:
            out["registrationState"] = self.registration_state.to_json()
        return out


@dataclass(frozen=True)
class ErrorBody:
    """Azure's ProvisioningServiceErrorDetails: what DPS says when it refuses a request."""

    error_code: int | None
    message: str | None
    tracking_id: str | None = None
    timestamp: str | None = None
    info: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """Azure's JSON shape."""
        out: dict[str, Any] = {
            "errorCode": self.error_code,
            "trackingId": self.tracking_id,
            "message": self.message,
            "timestampUtc": self.timestamp,
            "info": self.info,
        }
        return {key: value for key, value in out.items() if value is not None}


Response = Union[OperationStatus, ErrorBody]


def parse_response_payload(data: bytes) -> Response:
    """Parse a response body: an operation status, or an error body when it has neither
    ``operationId`` nor ``status``."""
    body = _load_object(data, "DPS response")
    status = body.get("status")
    operation_id = body.get("operationId")
    if status is None and operation_id is None:
        info = body.get("info")
        return ErrorBody(
            error_code=_opt_int(body, "errorCode", "error"),
            message=_opt_str(body, "message", "error"),
            tracking_id=_opt_str(body, "trackingId", "error"),
            timestamp=_opt_str(body, "timestampUtc", "error"),
            info=info if isinstance(info, dict) else None,
        )
    if not isinstance(status, str):
        raise DpsParseError("DPS response has no string 'status'")
    if status not in STATUSES:
        raise DpsParseError(f"DPS response status {status[:40]!r} is unknown")
    if operation_id is not None and not isinstance(operation_id, str):
        raise DpsParseError("DPS response operationId must be a string")
    state_obj = body.get("registrationState")
    state = _parse_registration_state(state_obj) if state_obj is not None else None
    return OperationStatus(
        operation_id=operation_id or None, status=status, registration_state=state
    )


def encode_json(value: OperationStatus | ErrorBody) -> bytes:
    """Serialise a response for the wire."""
    return json.dumps(value.to_json(), separators=(",", ":")).encode("utf-8")
