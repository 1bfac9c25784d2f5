"""Enrollment and registration records of the DPS emulator, in Azure's DPS service REST shapes.

Standard library only. ``from_json`` parsers validate every field they know, ignore fields they
do not (Azure's own tools send read-only and unrelated ones), and raise only
:class:`~emulator.errors.ValidationError`, whose message names the offending field. Identifiers
Azure treats as case-insensitive (registration and group ids, host names) are stored lower-case.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, ClassVar, Union
from urllib.parse import urlsplit

from .errors import ValidationError

__all__ = [
    "ALLOCATION_POLICIES",
    "PROVISIONING_STATUSES",
    "REGISTRATION_STATUSES",
    "REGISTRATION_SUBSTATUSES",
    "Attestation",
    "EnrollmentGroup",
    "IndividualEnrollment",
    "RegistrationRecord",
    "SymmetricKeyAttestation",
    "TpmAttestation",
    "X509Attestation",
    "new_etag",
    "utc_now_iso",
    "validate_base64_key",
    "validate_device_id",
    "validate_enrollment_group_id",
    "validate_host_name",
    "validate_initial_twin",
    "validate_registration_id",
    "validate_webhook_url",
]

PROVISIONING_STATUSES = ("enabled", "disabled")
ALLOCATION_POLICIES = ("hashed", "geoLatency", "static", "custom")
REGISTRATION_STATUSES = ("unassigned", "assigning", "assigned", "failed", "disabled")
REGISTRATION_SUBSTATUSES = (
    "initialAssignment",
    "deviceDataMigrated",
    "deviceDataReset",
    "reprovisionedToInitialAssignment",
)
#: Attestation types Azure knows but the emulator does not implement yet.
UNSUPPORTED_ATTESTATION_TYPES = ("none",)

MAX_ID_LENGTH = 128
MIN_KEY_BYTES = 16
MAX_KEY_BYTES = 64
#: IoT Hub twin limits: nesting depth, key length, tags / desired-properties size in bytes.
MAX_TWIN_DEPTH = 10
MAX_TWIN_KEY_BYTES = 1024
MAX_TAGS_BYTES = 8 * 1024
MAX_DESIRED_BYTES = 32 * 1024
#: Generic JSON values (device payloads) may nest at most this deep.
MAX_JSON_DEPTH = 64

_ID_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._:-]{0,126}[A-Za-z0-9-])?")
_DEVICE_ID_RE = re.compile(r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}")
_LABEL_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_BASE64_RE = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")
_TIMESTAMP_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,7})?Z"
)
_ETAG_RE = re.compile(r"[\x21\x23-\x7e]{0,256}")
_TWIN_KEY_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f-\x9f.$ ]")


# ---------------------------------------------------------------------------- small helpers


def utc_now_iso(now: float) -> str:
    """Format a POSIX time as Azure's UTC timestamp, e.g. ``2026-11-28T16:57:35.123456Z``."""
    return datetime.fromtimestamp(now, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def new_etag() -> str:
    """A fresh etag in Azure's form: base64 of a double-quoted random UUID."""
    return base64.b64encode(f'"{uuid.uuid4()}"'.encode("ascii")).decode("ascii")


def _where(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _require_object(value: object, field: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValidationError(f"{field} must be a JSON object")
    return value


def _opt_str(data: Mapping[str, Any], key: str, prefix: str = "") -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValidationError(f"{_where(prefix, key)} must be a string")
    return value


def _opt_bool(data: Mapping[str, Any], key: str, prefix: str, default: bool) -> bool:
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ValidationError(f"{_where(prefix, key)} must be a boolean")
    return value


def _opt_choice(
    data: Mapping[str, Any], key: str, choices: tuple[str, ...], prefix: str = ""
) -> str | None:
    value = _opt_str(data, key, prefix)
    if value is not None and value not in choices:
        allowed = ", ".join(choices)
        raise ValidationError(f"{_where(prefix, key)} must be one of {allowed}; got {value!r}")
    return value


def _validate_timestamp(value: object, field: str) -> str:
    if not isinstance(value, str) or not _TIMESTAMP_RE.fullmatch(value):
        raise ValidationError(f"{field} must be a UTC timestamp like 2026-01-31T12:00:00.000000Z")
    try:
        datetime.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")
    except ValueError as exc:
        raise ValidationError(f"{field} is not a valid date and time: {value!r}") from exc
    return value


def _opt_timestamp(data: Mapping[str, Any], key: str, default: str) -> str:
    value = data.get(key)
    if value is None or value == "":
        return default
    return _validate_timestamp(value, key)


def _opt_etag(data: Mapping[str, Any]) -> str:
    value = data.get("etag")
    if value is None:
        return ""
    if not isinstance(value, str) or not _ETAG_RE.fullmatch(value):
        raise ValidationError("etag must be a string of at most 256 visible ASCII characters")
    return value


def _put(out: dict[str, Any], key: str, value: object) -> None:
    """Add ``key`` to a JSON object unless the value is absent (``None`` or an unset ``""``)."""
    if value is not None and value != "":
        out[key] = value


def _json_size(value: object) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def _check_json_value(value: object, field: str, depth: int, max_depth: int, twin: bool) -> None:
    """Check that ``value`` is plain JSON data; with ``twin``, also IoT Hub's twin key rules."""
    if value is None or isinstance(value, (bool, int, str)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(f"{field} must not contain NaN or infinite numbers")
        return
    if depth >= max_depth:
        raise ValidationError(f"{field} is nested deeper than {max_depth} levels")
    if isinstance(value, list):
        for index, item in enumerate(value):
            _check_json_value(item, f"{field}[{index}]", depth + 1, max_depth, twin)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError(f"{field} has a non-string key")
            if twin:
                if not key or _TWIN_KEY_FORBIDDEN.search(key):
                    raise ValidationError(
                        f"{field} has an invalid key {key!r}: twin keys must be non-empty and"
                        " contain no '.', '$', space or control characters"
                    )
                if len(key.encode("utf-8", "surrogatepass")) > MAX_TWIN_KEY_BYTES:
                    raise ValidationError(
                        f"{field} has a key longer than {MAX_TWIN_KEY_BYTES} bytes"
                    )
            _check_json_value(item, f"{field}.{key}", depth + 1, max_depth, twin)
        return
    raise ValidationError(f"{field} must contain only JSON values")


def _check_encodable(value: object, field: str) -> None:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, TypeError) as exc:
        raise ValidationError(f"{field} is not encodable as UTF-8 JSON") from exc


# ---------------------------------------------------------------------------- public validators


def _validate_id(value: object, field: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string")
    if not value:
        raise ValidationError(f"{field} must not be empty")
    if len(value) > MAX_ID_LENGTH:
        raise ValidationError(f"{field} is longer than {MAX_ID_LENGTH} characters")
    if not _ID_RE.fullmatch(value):
        raise ValidationError(
            f"{field} {value!r} is invalid: use ASCII letters, digits and - . _ : only, starting"
            " with a letter or digit and ending with a letter, digit or '-'"
        )
    return value.lower()


def validate_registration_id(value: object) -> str:
    """Check a registration id (1..128 chars of ``[A-Za-z0-9._:-]``) and return it lower-cased.

    The first character must be alphanumeric; the last alphanumeric or ``-`` (Azure's docs and
    REST model disagree about the end; we follow the docs). Ids are case-insensitive in Azure, so
    the emulator stores and compares them lower-case.
    """
    return _validate_id(value, "registrationId")


def validate_enrollment_group_id(value: object) -> str:
    """Check an enrollment group id (same rules as a registration id) and return it lower-cased."""
    return _validate_id(value, "enrollmentGroupId")


def validate_device_id(value: object, field: str = "deviceId") -> str:
    """Check an IoT Hub device id: 1..128 ASCII letters, digits or ``-.%_*?!(),:=@$'``.

    Device ids are case-sensitive in IoT Hub, so the value is returned unchanged.
    """
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string")
    if not _DEVICE_ID_RE.fullmatch(value):
        raise ValidationError(
            f"{field} {value!r} is invalid: use 1..128 ASCII letters, digits or"
            " - . % _ * ? ! ( ) , : = @ $ '"
        )
    return value


def validate_host_name(value: object, field: str = "iotHubHostName") -> str:
    """Check a hub host name (DNS name, optionally ``:port``) and return it lower-cased."""
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a string")
    if not value.isascii():
        raise ValidationError(f"{field} {value!r} is not a valid host name")
    host, sep, port = value.partition(":")
    if sep and not (port.isdigit() and not port.startswith("0") and int(port) <= 65535):
        raise ValidationError(f"{field} {value!r} has an invalid port")
    host = host.lower()
    labels = host.split(".")
    if not host or len(host) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValidationError(f"{field} {value!r} is not a valid host name")
    return f"{host}{sep}{port}"


def validate_base64_key(value: object, field: str) -> str:
    """Check a symmetric key: canonical padded standard base64 decoding to 16..64 bytes."""
    if not isinstance(value, str):
        raise ValidationError(f"{field} must be a base64 string")
    if not _BASE64_RE.fullmatch(value):
        raise ValidationError(f"{field} is not valid base64 (standard alphabet, padding required)")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError(f"{field} is not valid base64: {exc}") from exc
    if base64.b64encode(raw).decode("ascii") != value:
        raise ValidationError(f"{field} is not canonical base64 (non-zero trailing bits)")
    if not MIN_KEY_BYTES <= len(raw) <= MAX_KEY_BYTES:
        raise ValidationError(
            f"{field} must decode to {MIN_KEY_BYTES}..{MAX_KEY_BYTES} bytes, got {len(raw)}"
        )
    return value


def validate_initial_twin(value: object, field: str = "initialTwin") -> dict[str, Any] | None:
    """Check an initial twin ``{"tags": {...}, "properties": {"desired": {...}}}``; nothing else.

    Keys follow IoT Hub's twin rules (no ``.``, ``$``, space or control characters), nesting is at
    most 10 levels, tags at most 8 KB and desired properties at most 32 KB of JSON.
    """
    if value is None:
        return None
    twin = _require_object(value, field)
    extra = sorted(str(key) for key in twin if key not in ("tags", "properties"))
    if extra:
        raise ValidationError(f"{field} may only contain tags and properties; got {extra[0]!r}")
    result: dict[str, Any] = {}
    tags = twin.get("tags")
    if tags is not None:
        tags = dict(_require_object(tags, f"{field}.tags"))
        _check_json_value(tags, f"{field}.tags", 0, MAX_TWIN_DEPTH, twin=True)
        _check_encodable(tags, f"{field}.tags")
        if _json_size(tags) > MAX_TAGS_BYTES:
            raise ValidationError(f"{field}.tags is larger than {MAX_TAGS_BYTES} bytes")
        result["tags"] = tags
    properties = twin.get("properties")
    if properties is not None:
        properties = _require_object(properties, f"{field}.properties")
        extra = sorted(str(key) for key in properties if key != "desired")
        if extra:
            raise ValidationError(f"{field}.properties may only contain desired; got {extra[0]!r}")
        result_properties: dict[str, Any] = {}
        desired = properties.get("desired")
        if desired is not None:
            where = f"{field}.properties.desired"
            desired = dict(_require_object(desired, where))
            _check_json_value(desired, where, 0, MAX_TWIN_DEPTH, twin=True)
            _check_encodable(desired, where)
            if _json_size(desired) > MAX_DESIRED_BYTES:
                raise ValidationError(f"{where} is larger than {MAX_DESIRED_BYTES} bytes")
            result_properties["desired"] = desired
        result["properties"] = result_properties
    return result


def _validate_hub_list(value: object, field: str) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ValidationError(f"{field} must be a list of host names")
    hubs: list[str] = []
    for index, item in enumerate(value):
        hub = validate_host_name(item, f"{field}[{index}]")
        if hub in hubs:
            raise ValidationError(f"{field} lists {hub!r} twice")
        hubs.append(hub)
    return hubs


def _validate_reprovision_policy(value: object, field: str) -> dict[str, bool] | None:
    if value is None:
        return None
    policy = _require_object(value, field)
    extra = sorted(
        str(key) for key in policy if key not in ("updateHubAssignment", "migrateDeviceData")
    )
    if extra:
        raise ValidationError(f"{field} has an unknown field {extra[0]!r}")
    return {
        "updateHubAssignment": _opt_bool(policy, "updateHubAssignment", field, True),
        "migrateDeviceData": _opt_bool(policy, "migrateDeviceData", field, True),
    }


def validate_webhook_url(value: object, field: str = "webhookUrl") -> str:
    """An ``http`` or ``https`` URL with a host, at most 2048 ASCII characters (Azure requires
    https; the emulator also takes http, for webhooks on the local machine)."""
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{field} must be an http(s) URL")
    if len(value) > 2048 or not value.isascii() or any(c.isspace() for c in value):
        raise ValidationError(f"{field} must be an http(s) URL of at most 2048 ASCII characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValidationError(f"{field} is not a usable URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"{field} must be an http:// or https:// URL with a host")
    if port == 0:
        raise ValidationError(f"{field} must not use port 0")
    return value


def _validate_custom_allocation(value: object, field: str) -> dict[str, str] | None:
    """``customAllocationDefinition {webhookUrl, apiVersion}`` (apiVersion optional here)."""
    if value is None:
        return None
    definition = _require_object(value, field)
    extra = sorted(str(key) for key in definition if key not in ("webhookUrl", "apiVersion"))
    if extra:
        raise ValidationError(f"{field} has an unknown field {extra[0]!r}")
    url = validate_webhook_url(definition.get("webhookUrl"), f"{field}.webhookUrl")
    result = {"webhookUrl": url}
    api_version = _opt_str(definition, "apiVersion", field)
    if api_version is not None:
        if not api_version or len(api_version) > 64 or not api_version.isascii():
            raise ValidationError(f"{field}.apiVersion must be a short API version string")
        result["apiVersion"] = api_version
    return result


def _check_capabilities(data: Mapping[str, Any]) -> None:
    """Refuse IoT Edge enrollments (not emulated) rather than provision a plain device."""
    value = data.get("capabilities")
    if value is None:
        return
    capabilities = _require_object(value, "capabilities")
    if _opt_bool(capabilities, "iotEdge", "capabilities", False):
        raise ValidationError("capabilities.iotEdge is not supported by the emulator")


# ---------------------------------------------------------------------------- attestation


@dataclass
class SymmetricKeyAttestation:
    """Symmetric-key attestation: two base64 keys, each decoding to 16..64 bytes."""

    TYPE: ClassVar[str] = "symmetricKey"

    primary_key: str
    secondary_key: str

    def to_json(self) -> dict[str, Any]:
        """Azure's ``AttestationMechanism`` object for this attestation."""
        return {
            "type": self.TYPE,
            "symmetricKey": {"primaryKey": self.primary_key, "secondaryKey": self.secondary_key},
        }


@dataclass
class TpmAttestation:
    """TPM attestation: the device's EK (and optionally SRK), base64 of marshalled TPM2B_PUBLIC."""

    TYPE: ClassVar[str] = "tpm"

    endorsement_key: str
    storage_root_key: str | None = None

    def to_json(self) -> dict[str, Any]:
        """Azure's ``AttestationMechanism`` object for this attestation."""
        body: dict[str, Any] = {"endorsementKey": self.endorsement_key}
        if self.storage_root_key is not None:
            body["storageRootKey"] = self.storage_root_key
        return {"type": self.TYPE, "tpm": body}


@dataclass
class X509Attestation:
    """X.509 attestation, certificates as PEM: an individual enrollment's device certificate(s)
    (``clientCertificates``), or a group's CA or intermediate (``signingCertificates``) that
    signed its devices' certificates. Checked with ``cryptography`` (:mod:`emulator.x509`)."""

    TYPE: ClassVar[str] = "x509"

    primary: str
    secondary: str | None = None
    #: True for ``signingCertificates`` (groups), False for ``clientCertificates``.
    signing: bool = False

    @property
    def certificates(self) -> list[str]:
        """The primary and (if any) secondary certificate, PEM."""
        return [self.primary] if self.secondary is None else [self.primary, self.secondary]

    def to_json(self) -> dict[str, Any]:
        """Azure's ``AttestationMechanism`` object: each certificate with its ``info``."""
        from .x509 import pem_certificate_info

        section: dict[str, Any] = {}
        for name, pem in (("primary", self.primary), ("secondary", self.secondary)):
            if pem is not None:
                section[name] = {"certificate": pem, "info": pem_certificate_info(pem)}
        kind = "signingCertificates" if self.signing else "clientCertificates"
        return {"type": self.TYPE, "x509": {kind: section}}


#: Every attestation the emulator implements.
Attestation = Union[SymmetricKeyAttestation, TpmAttestation, X509Attestation]

_AttestationParser = Callable[[Mapping[str, Any], str, Callable[[], str]], Attestation]


def _parse_symmetric_key(
    body: Mapping[str, Any], field: str, generate_key: Callable[[], str]
) -> SymmetricKeyAttestation:
    """Parse ``symmetricKey``; a missing key is generated (Azure generates 32-byte keys)."""
    keys: list[str] = []
    for name in ("primaryKey", "secondaryKey"):
        where = f"{field}.{name}"
        value = body.get(name)
        if value is None or value == "":
            value = generate_key()
            where = f"generated {where}"
        keys.append(validate_base64_key(value, where))
    return SymmetricKeyAttestation(primary_key=keys[0], secondary_key=keys[1])


def _validate_tpm_public(value: object, field: str) -> str:
    """A base64 TPM2B_PUBLIC of an RSA key, as Azure stores EKs and SRKs."""
    if not isinstance(value, str) or not value:
        raise ValidationError(f"{field} must be a base64 string")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValidationError(f"{field} is not valid base64") from exc
    from tpm.errors import TpmBlobError
    from tpm.marshal import rsa_public_key

    try:
        rsa_public_key(raw)
    except TpmBlobError as exc:
        raise ValidationError(f"{field} is not a marshalled TPM2B_PUBLIC RSA key: {exc}") from exc
    return base64.b64encode(raw).decode("ascii")


def _parse_tpm(
    body: Mapping[str, Any], field: str, generate_key: Callable[[], str]
) -> TpmAttestation:
    """Parse ``tpm``: the endorsement key is required, the storage root key optional."""
    del generate_key
    ek = _validate_tpm_public(body.get("endorsementKey"), f"{field}.endorsementKey")
    srk_value = body.get("storageRootKey")
    srk = (
        None
        if srk_value in (None, "")
        else _validate_tpm_public(srk_value, f"{field}.storageRootKey")
    )
    return TpmAttestation(endorsement_key=ek, storage_root_key=srk)


def _parse_x509(
    body: Mapping[str, Any], field: str, generate_key: Callable[[], str]
) -> X509Attestation:
    """Parse ``x509``: exactly one of ``clientCertificates`` or ``signingCertificates``, each with
    a ``primary`` and an optional ``secondary`` ``{certificate}`` (PEM or base64 DER)."""
    del generate_key
    if body.get("caReferences") is not None:
        raise ValidationError(
            f"{field}.caReferences (CA certificates uploaded to DPS) are not emulated; give the"
            " CA itself in signingCertificates"
        )
    client, signing = body.get("clientCertificates"), body.get("signingCertificates")
    if (client is None) == (signing is None):
        raise ValidationError(
            f"{field} needs exactly one of clientCertificates or signingCertificates"
        )
    kind = "clientCertificates" if client is not None else "signingCertificates"
    section = _require_object(client if client is not None else signing, f"{field}.{kind}")
    from .x509 import normalise_certificate

    pems: list[str | None] = []
    for name in ("primary", "secondary"):
        entry = section.get(name)
        where = f"{field}.{kind}.{name}"
        if entry is None:
            if name == "primary":
                raise ValidationError(f"{where} is required")
            pems.append(None)
            continue
        entry = _require_object(entry, where)
        pems.append(
            normalise_certificate(
                entry.get("certificate"), f"{where}.certificate", ca=signing is not None
            )
        )
    assert pems[0] is not None
    return X509Attestation(primary=pems[0], secondary=pems[1], signing=signing is not None)


#: Attestation type name -> parser of its body.
_ATTESTATION_PARSERS: dict[str, _AttestationParser] = {
    SymmetricKeyAttestation.TYPE: _parse_symmetric_key,
    TpmAttestation.TYPE: _parse_tpm,
    X509Attestation.TYPE: _parse_x509,
}
_ATTESTATION_BODIES = ("symmetricKey", "tpm", "x509")


def _parse_attestation(
    value: object, generate_key: Callable[[], str], *, group: bool
) -> Attestation:
    attestation = _require_object(value, "attestation")
    kind = attestation.get("type")
    if not isinstance(kind, str):
        raise ValidationError("attestation.type must be a string")
    if group and kind == "tpm":
        raise ValidationError("attestation type 'tpm' is not allowed for enrollment groups")
    parser = _ATTESTATION_PARSERS.get(kind)
    if parser is None:
        if kind in UNSUPPORTED_ATTESTATION_TYPES:
            raise ValidationError(f"attestation type {kind!r} is not supported yet")
        allowed = ", ".join([*_ATTESTATION_PARSERS, *UNSUPPORTED_ATTESTATION_TYPES])
        raise ValidationError(f"attestation.type must be one of {allowed}; got {kind!r}")
    for other in _ATTESTATION_BODIES:
        if other != kind and attestation.get(other) is not None:
            raise ValidationError(f"attestation.{other} does not match attestation type {kind!r}")
    body = attestation.get(kind)
    body = {} if body is None else _require_object(body, f"attestation.{kind}")
    parsed = parser(body, f"attestation.{kind}", generate_key)
    if isinstance(parsed, X509Attestation) and parsed.signing != group:
        raise ValidationError(
            "enrollment groups take attestation.x509.signingCertificates (the CA or intermediate"
            " that signs device certificates)"
            if group
            else "individual enrollments take attestation.x509.clientCertificates (the device"
            " certificate)"
        )
    return parsed


# ---------------------------------------------------------------------------- enrollments


@dataclass
class _EnrollmentFields:
    """Fields individual enrollments and enrollment groups share, parsed from Azure JSON."""

    iot_hub_host_name: str | None
    initial_twin: dict[str, Any] | None
    provisioning_status: str
    allocation_policy: str | None
    iot_hubs: list[str] | None
    reprovision_policy: dict[str, bool] | None
    custom_allocation_definition: dict[str, str] | None
    etag: str
    created: str
    last_updated: str

    @classmethod
    def parse(cls, data: Mapping[str, Any], now: str) -> _EnrollmentFields:
        _check_capabilities(data)
        host = data.get("iotHubHostName")
        return cls(
            iot_hub_host_name=None if host is None else validate_host_name(host),
            initial_twin=validate_initial_twin(data.get("initialTwin")),
            provisioning_status=_opt_choice(data, "provisioningStatus", PROVISIONING_STATUSES)
            or "enabled",
            allocation_policy=_opt_choice(data, "allocationPolicy", ALLOCATION_POLICIES),
            iot_hubs=_validate_hub_list(data.get("iotHubs"), "iotHubs"),
            reprovision_policy=_validate_reprovision_policy(
                data.get("reprovisionPolicy"), "reprovisionPolicy"
            ),
            custom_allocation_definition=_validate_custom_allocation(
                data.get("customAllocationDefinition"), "customAllocationDefinition"
            ),
            etag=_opt_etag(data),
            created=_opt_timestamp(data, "createdDateTimeUtc", now),
            last_updated=_opt_timestamp(data, "lastUpdatedDateTimeUtc", now),
        )


def _common_json(
    out: dict[str, Any], record: IndividualEnrollment | EnrollmentGroup
) -> dict[str, Any]:
    """Add the fields individual enrollments and groups share to ``out`` (absent ones omitted)."""
    _put(out, "iotHubHostName", record.iot_hub_host_name)
    _put(out, "initialTwin", record.initial_twin)
    _put(out, "provisioningStatus", record.provisioning_status)
    _put(out, "allocationPolicy", record.allocation_policy)
    _put(out, "iotHubs", None if record.iot_hubs is None else list(record.iot_hubs))
    policy = record.reprovision_policy
    _put(out, "reprovisionPolicy", None if policy is None else dict(policy))
    custom = record.custom_allocation_definition
    _put(out, "customAllocationDefinition", None if custom is None else dict(custom))
    _put(out, "etag", record.etag)
    _put(out, "createdDateTimeUtc", record.created)
    _put(out, "lastUpdatedDateTimeUtc", record.last_updated)
    return out


@dataclass
class IndividualEnrollment:
    """One device's enrollment: its attestation and how DPS should assign it to a hub."""

    registration_id: str
    attestation: Attestation
    device_id: str | None = None
    iot_hub_host_name: str | None = None
    initial_twin: dict[str, Any] | None = None
    provisioning_status: str = "enabled"
    allocation_policy: str | None = None
    iot_hubs: list[str] | None = None
    reprovision_policy: dict[str, bool] | None = None
    etag: str = ""
    created: str = ""
    last_updated: str = ""
    custom_allocation_definition: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """Azure's ``IndividualEnrollment`` JSON (absent values omitted)."""
        out: dict[str, Any] = {"registrationId": self.registration_id}
        _put(out, "deviceId", self.device_id)
        out["attestation"] = self.attestation.to_json()
        return _common_json(out, self)

    @classmethod
    def from_json(
        cls, data: object, *, now: str, generate_key: Callable[[], str]
    ) -> IndividualEnrollment:
        """Parse and validate Azure JSON; missing keys from ``generate_key``, times from ``now``."""
        obj = _require_object(data, "individual enrollment")
        registration_id = validate_registration_id(obj.get("registrationId"))
        device_id = obj.get("deviceId")
        device_id = None if device_id is None else validate_device_id(device_id)
        attestation = _parse_attestation(obj.get("attestation"), generate_key, group=False)
        fields = _EnrollmentFields.parse(obj, now)
        return cls(
            registration_id=registration_id,
            attestation=attestation,
            device_id=device_id,
            iot_hub_host_name=fields.iot_hub_host_name,
            initial_twin=fields.initial_twin,
            provisioning_status=fields.provisioning_status,
            allocation_policy=fields.allocation_policy,
            iot_hubs=fields.iot_hubs,
            reprovision_policy=fields.reprovision_policy,
            etag=fields.etag,
            created=fields.created,
            last_updated=fields.last_updated,
            custom_allocation_definition=fields.custom_allocation_definition,
        )


@dataclass
class EnrollmentGroup:
    """A group of devices sharing one attestation (for symmetric keys: per-device derived keys)."""

    enrollment_group_id: str
    attestation: Attestation
    iot_hub_host_name: str | None = None
    initial_twin: dict[str, Any] | None = None
    provisioning_status: str = "enabled"
    allocation_policy: str | None = None
    iot_hubs: list[str] | None = None
    reprovision_policy: dict[str, bool] | None = None
    etag: str = ""
    created: str = ""
    last_updated: str = ""
    custom_allocation_definition: dict[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        """Azure's ``EnrollmentGroup`` JSON (absent values omitted)."""
        out: dict[str, Any] = {
            "enrollmentGroupId": self.enrollment_group_id,
            "attestation": self.attestation.to_json(),
        }
        return _common_json(out, self)

    @classmethod
    def from_json(
        cls, data: object, *, now: str, generate_key: Callable[[], str]
    ) -> EnrollmentGroup:
        """Parse and validate Azure JSON; missing keys from ``generate_key``, times from ``now``."""
        obj = _require_object(data, "enrollment group")
        group_id = validate_enrollment_group_id(obj.get("enrollmentGroupId"))
        attestation = _parse_attestation(obj.get("attestation"), generate_key, group=True)
        fields = _EnrollmentFields.parse(obj, now)
        return cls(
            enrollment_group_id=group_id,
            attestation=attestation,
            iot_hub_host_name=fields.iot_hub_host_name,
            initial_twin=fields.initial_twin,
            provisioning_status=fields.provisioning_status,
            allocation_policy=fields.allocation_policy,
            iot_hubs=fields.iot_hubs,
            reprovision_policy=fields.reprovision_policy,
            etag=fields.etag,
            created=fields.created,
            last_updated=fields.last_updated,
            custom_allocation_definition=fields.custom_allocation_definition,
        )


# ---------------------------------------------------------------------------- registrations


@dataclass
class RegistrationRecord:
    """The outcome of a device's latest registration, as DPS reports it (``registrationState``)."""

    registration_id: str
    status: str
    assigned_hub: str | None
    device_id: str | None
    substatus: str | None
    created: str
    last_updated: str
    etag: str
    error_code: int | None = None
    error_message: str | None = None
    enrollment_group_id: str | None = None
    payload: Any = None
    #: ``registrationState.x509`` of an X.509 device (``certificateInfo``, ``enrollmentGroupId``).
    x509: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        """Azure's ``DeviceRegistrationResult`` JSON (absent values omitted)."""
        out: dict[str, Any] = {"registrationId": self.registration_id}
        _put(out, "createdDateTimeUtc", self.created)
        _put(out, "assignedHub", self.assigned_hub)
        _put(out, "deviceId", self.device_id)
        out["status"] = self.status
        _put(out, "substatus", self.substatus)
        _put(out, "errorCode", self.error_code)
        _put(out, "errorMessage", self.error_message)
        _put(out, "lastUpdatedDateTimeUtc", self.last_updated)
        _put(out, "etag", self.etag)
        if self.payload is not None:
            out["payload"] = self.payload
        if self.x509 is not None:
            out["x509"] = dict(self.x509)
            return out
        out["symmetricKey"] = (
            {}
            if self.enrollment_group_id is None
            else {"enrollmentGroupId": self.enrollment_group_id}
        )
        return out

    @classmethod
    def from_json(cls, data: object) -> RegistrationRecord:
        """Parse and validate ``DeviceRegistrationResult`` JSON (as written by :meth:`to_json`)."""
        obj = _require_object(data, "registration")
        registration_id = validate_registration_id(obj.get("registrationId"))
        status = _opt_choice(obj, "status", REGISTRATION_STATUSES)
        if status is None:
            raise ValidationError("status is required")
        hub = obj.get("assignedHub")
        device_id = obj.get("deviceId")
        error_code = obj.get("errorCode")
        if error_code is not None and (
            isinstance(error_code, bool) or not isinstance(error_code, int)
        ):
            raise ValidationError("errorCode must be an integer")
        payload = obj.get("payload")
        if payload is not None:
            _check_json_value(payload, "payload", 0, MAX_JSON_DEPTH, twin=False)
            _check_encodable(payload, "payload")
        group_id: str | None = None
        symmetric_key = obj.get("symmetricKey")
        if symmetric_key is not None:
            group = _require_object(symmetric_key, "symmetricKey").get("enrollmentGroupId")
            if group is not None:
                group_id = validate_enrollment_group_id(group)
        x509_state = obj.get("x509")
        if x509_state is not None:
            x509_state = dict(_require_object(x509_state, "x509"))
            _check_json_value(x509_state, "x509", 0, MAX_JSON_DEPTH, twin=False)
            _check_encodable(x509_state, "x509")
            group = x509_state.get("enrollmentGroupId")
            if group is not None:
                group_id = validate_enrollment_group_id(group)
        return cls(
            registration_id=registration_id,
            status=status,
            assigned_hub=None if hub is None else validate_host_name(hub, "assignedHub"),
            device_id=None if device_id is None else validate_device_id(device_id),
            substatus=_opt_choice(obj, "substatus", REGISTRATION_SUBSTATUSES),
            created=_opt_timestamp(obj, "createdDateTimeUtc", ""),
            last_updated=_opt_timestamp(obj, "lastUpdatedDateTimeUtc", ""),
            etag=_opt_etag(obj),
            error_code=error_code,
            error_message=_opt_str(obj, "errorMessage"),
            enrollment_group_id=group_id,
            payload=payload,
            x509=x509_state,
        )
