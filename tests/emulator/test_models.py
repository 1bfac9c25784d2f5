"""Tests of the emulator's enrollment and registration records: shapes, validation, round trips."""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.errors import EmulatorError, ValidationError
from emulator.models import (
    EnrollmentGroup,
    IndividualEnrollment,
    RegistrationRecord,
    SymmetricKeyAttestation,
    new_etag,
    utc_now_iso,
    validate_base64_key,
    validate_device_id,
    validate_host_name,
    validate_initial_twin,
    validate_registration_id,
)

NOW = "2026-11-28T16:57:35.123456Z"
KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(32, 64))).decode()


def no_key() -> str:
    raise AssertionError("no key should be generated")


def counting_keys() -> tuple[Callable[[], str], list[str]]:
    made: list[str] = []

    def generate() -> str:
        key = base64.b64encode(bytes([len(made)]) * 32).decode()
        made.append(key)
        return key

    return generate, made


def key_of(size: int) -> str:
    return base64.b64encode(b"k" * size).decode()


def enrollment_json(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "registrationId": "device-1",
        "attestation": {
            "type": "symmetricKey",
            "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B},
        },
    }
    data.update(overrides)
    return data


def parse(data: object) -> IndividualEnrollment:
    return IndividualEnrollment.from_json(data, now=NOW, generate_key=no_key)


# ---------------------------------------------------------------------------- strategies

reg_ids = st.from_regex(r"[a-z0-9](?:[a-z0-9._:-]{0,30}[a-z0-9-])?", fullmatch=True)
device_ids = st.from_regex(r"[A-Za-z0-9\-.%_*?!(),:=@$']{1,40}", fullmatch=True)
keys = st.binary(min_size=16, max_size=64).map(lambda raw: base64.b64encode(raw).decode())
hosts = st.from_regex(r"[a-z][a-z0-9-]{0,10}[a-z0-9](?:\.[a-z]{2,6}){1,2}", fullmatch=True)
timestamps = st.integers(min_value=0, max_value=4_000_000_000_000_000).map(
    lambda micros: utc_now_iso(micros / 1_000_000)
)
etags = st.uuids().map(lambda u: base64.b64encode(f'"{u}"'.encode()).decode())
twin_keys = st.text(
    alphabet=st.characters(
        codec="utf-8", exclude_categories=("Cc", "Cs"), exclude_characters=".$ "
    ),
    min_size=1,
    max_size=8,
)
json_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**53), max_value=2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10)
)
twin_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(twin_keys, inner, max_size=3),
    max_leaves=8,
)
twin_objects = st.dictionaries(twin_keys, twin_values, max_size=4)
initial_twins = st.none() | st.fixed_dictionaries(
    {},
    optional={
        "tags": twin_objects,
        "properties": st.fixed_dictionaries({}, optional={"desired": twin_objects}),
    },
)
reprovision = st.none() | st.fixed_dictionaries(
    {"updateHubAssignment": st.booleans(), "migrateDeviceData": st.booleans()}
)
attestations = st.builds(SymmetricKeyAttestation, primary_key=keys, secondary_key=keys)
common = {
    "attestation": attestations,
    "iot_hub_host_name": st.none() | hosts,
    "initial_twin": initial_twins,
    "provisioning_status": st.sampled_from(["enabled", "disabled"]),
    "allocation_policy": st.none() | st.sampled_from(["hashed", "geoLatency", "static", "custom"]),
    "iot_hubs": st.none() | st.lists(hosts, max_size=3, unique=True),
    "reprovision_policy": reprovision,
    "etag": etags,
    "created": timestamps,
    "last_updated": timestamps,
}
enrollments = st.builds(
    IndividualEnrollment,
    registration_id=reg_ids,
    device_id=st.none() | device_ids,
    **common,
)
groups = st.builds(EnrollmentGroup, enrollment_group_id=reg_ids, **common)
records = st.builds(
    RegistrationRecord,
    registration_id=reg_ids,
    status=st.sampled_from(["assigned", "failed", "disabled", "assigning", "unassigned"]),
    assigned_hub=st.none() | hosts,
    device_id=st.none() | device_ids,
    substatus=st.none()
    | st.sampled_from(
        [
            "initialAssignment",
            "deviceDataMigrated",
            "deviceDataReset",
            "reprovisionedToInitialAssignment",
        ]
    ),
    created=timestamps,
    last_updated=timestamps,
    etag=etags,
    error_code=st.none() | st.integers(min_value=100000, max_value=599999),
    error_message=st.none() | st.text(max_size=20).filter(lambda s: s != ""),
    enrollment_group_id=st.none() | reg_ids,
    payload=st.none() | st.dictionaries(st.text(max_size=5), twin_values, max_size=3),
)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = [
    "registrationId",
    "enrollmentGroupId",
    "deviceId",
    "attestation",
    "iotHubHostName",
    "initialTwin",
    "provisioningStatus",
    "allocationPolicy",
    "iotHubs",
    "reprovisionPolicy",
    "etag",
    "createdDateTimeUtc",
    "lastUpdatedDateTimeUtc",
    "capabilities",
    "status",
    "substatus",
    "assignedHub",
    "errorCode",
    "errorMessage",
    "payload",
    "symmetricKey",
]


def _through_json(data: dict[str, Any]) -> Any:
    return json.loads(json.dumps(data))


# ---------------------------------------------------------------------------- round trips


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(enrollments)
def test_enrollment_round_trip(enrollment: IndividualEnrollment) -> None:
    assert (
        IndividualEnrollment.from_json(
            _through_json(enrollment.to_json()), now=NOW, generate_key=no_key
        )
        == enrollment
    )


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(groups)
def test_group_round_trip(group: EnrollmentGroup) -> None:
    assert (
        EnrollmentGroup.from_json(_through_json(group.to_json()), now=NOW, generate_key=no_key)
        == group
    )


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_registration_round_trip(record: RegistrationRecord) -> None:
    assert RegistrationRecord.from_json(_through_json(record.to_json())) == record


# ---------------------------------------------------------------------------- arbitrary input


def _parsers() -> list[Callable[[object], Any]]:
    return [
        parse,
        lambda data: EnrollmentGroup.from_json(data, now=NOW, generate_key=no_key),
        RegistrationRecord.from_json,
    ]


@settings(max_examples=200)
@given(json_values)
def test_arbitrary_json_raises_only_validation_error(value: object) -> None:
    for parser in _parsers():
        with contextlib.suppress(ValidationError):
            parser(value)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(enrollments, groups, records),
    st.sampled_from(FIELDS),
    json_values,
    st.sampled_from([None, "primaryKey", "type", "tags", "properties", "desired", "x509"]),
)
def test_corrupted_field_raises_only_validation_error(
    record: IndividualEnrollment | EnrollmentGroup | RegistrationRecord,
    field: str,
    value: object,
    nested: str | None,
) -> None:
    data = _through_json(record.to_json())
    target = data
    if nested is not None:
        for container in (data.get("attestation"), data.get("initialTwin")):
            if isinstance(container, dict):
                target = container
    if nested is not None and target is not data:
        target[nested] = value
    else:
        data[field] = value
    for parser in _parsers():
        try:
            result = parser(data)
        except ValidationError:
            continue
        json.dumps(result.to_json())


@given(st.one_of(json_values, st.binary(), st.sets(st.integers())))
def test_validators_raise_only_validation_error(value: object) -> None:
    validators: list[Callable[[object], object]] = [
        validate_registration_id,
        validate_device_id,
        validate_host_name,
        validate_initial_twin,
        lambda v: validate_base64_key(v, "key"),
    ]
    for validator in validators:
        with contextlib.suppress(ValidationError):
            validator(value)


def test_validation_error_is_an_emulator_error_and_value_error() -> None:
    with pytest.raises(ValidationError) as info:
        validate_registration_id(None)
    assert isinstance(info.value, EmulatorError)
    assert isinstance(info.value, ValueError)


# ---------------------------------------------------------------------------- registration ids


def test_registration_id_length_boundaries() -> None:
    assert validate_registration_id("a" * 128) == "a" * 128
    with pytest.raises(ValidationError, match="longer than 128"):
        validate_registration_id("a" * 129)
    assert validate_registration_id("a") == "a"
    with pytest.raises(ValidationError, match="empty"):
        validate_registration_id("")


def test_registration_id_case_folding() -> None:
    assert validate_registration_id("My-Device.01:X_Y") == "my-device.01:x_y"
    assert parse(enrollment_json(registrationId="DEVICE-1")).registration_id == "device-1"


@pytest.mark.parametrize(
    "value",
    [
        "a b",
        "a/b",
        "a#",
        "a+b",
        "dé",
        "a\n",
        "\na",
        "-abc",
        ".abc",
        "abc.",
        "abc_",
        "abc:",
        "\u212aelvin",  # KELVIN SIGN lower-cases to ASCII 'k'; still not ASCII input
        "a\x00b",
    ],
)
def test_registration_id_bad_characters(value: str) -> None:
    with pytest.raises(ValidationError, match="registrationId"):
        validate_registration_id(value)


def test_registration_id_may_end_with_dash_and_use_specials() -> None:
    assert validate_registration_id("abc-") == "abc-"
    assert validate_registration_id("a.b_c:d-e") == "a.b_c:d-e"


@pytest.mark.parametrize("value", [None, 5, ["a"], {"a": 1}, b"abc", True])
def test_registration_id_must_be_a_string(value: object) -> None:
    with pytest.raises(ValidationError, match="must be a string"):
        validate_registration_id(value)


# ---------------------------------------------------------------------------- keys


@pytest.mark.parametrize(("size", "ok"), [(15, False), (16, True), (64, True), (65, False)])
def test_key_length_boundaries(size: int, ok: bool) -> None:
    key = key_of(size)
    if ok:
        assert validate_base64_key(key, "primaryKey") == key
    else:
        with pytest.raises(ValidationError, match=f"16..64 bytes, got {size}"):
            validate_base64_key(key, "primaryKey")


@pytest.mark.parametrize(
    "value",
    [
        key_of(32).rstrip("="),  # padding missing
        key_of(32)[:-1],  # truncated
        base64.urlsafe_b64encode(b"\xfb\xff" * 16).decode(),  # URL-safe alphabet
        " " + key_of(32),
        key_of(32) + "\n",
        key_of(16)[:-3] + "R==",  # non-zero trailing bits (non-canonical)
        "====",
        "",
        "***",
    ],
)
def test_bad_base64_is_rejected(value: str) -> None:
    with pytest.raises(ValidationError, match="primaryKey"):
        validate_base64_key(value, "primaryKey")


def test_key_errors_name_the_field() -> None:
    data = enrollment_json()
    data["attestation"]["symmetricKey"]["secondaryKey"] = key_of(8)
    with pytest.raises(ValidationError, match=r"attestation\.symmetricKey\.secondaryKey"):
        parse(data)


def test_missing_keys_are_generated() -> None:
    generate, made = counting_keys()
    data = enrollment_json(attestation={"type": "symmetricKey"})
    enrollment = IndividualEnrollment.from_json(data, now=NOW, generate_key=generate)
    assert made == [enrollment.attestation.primary_key, enrollment.attestation.secondary_key]
    generate, made = counting_keys()
    data = enrollment_json(
        attestation={"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY_A}}
    )
    enrollment = IndividualEnrollment.from_json(data, now=NOW, generate_key=generate)
    assert enrollment.attestation.primary_key == KEY_A
    assert made == [enrollment.attestation.secondary_key]


def test_bad_generated_key_is_a_validation_error() -> None:
    data = enrollment_json(attestation={"type": "symmetricKey"})
    with pytest.raises(ValidationError, match="generated"):
        IndividualEnrollment.from_json(data, now=NOW, generate_key=lambda: "short")


# ---------------------------------------------------------------------------- attestation


@pytest.mark.parametrize("kind", ["none"])
def test_unsupported_attestation_types(kind: str) -> None:
    with pytest.raises(ValidationError, match=f"attestation type '{kind}' is not supported yet"):
        parse(enrollment_json(attestation={"type": kind, kind: {}}))


def test_tpm_attestation_needs_a_marshalled_rsa_public_key() -> None:
    with pytest.raises(ValidationError, match=r"attestation\.tpm\.endorsementKey must be"):
        parse(enrollment_json(attestation={"type": "tpm", "tpm": {}}))
    with pytest.raises(ValidationError, match="not a marshalled TPM2B_PUBLIC"):
        parse(enrollment_json(attestation={"type": "tpm", "tpm": {"endorsementKey": "AAAA"}}))


def test_unknown_attestation_type_and_shape_errors() -> None:
    with pytest.raises(ValidationError, match=r"attestation\.type must be one of"):
        parse(enrollment_json(attestation={"type": "password"}))
    with pytest.raises(ValidationError, match=r"attestation\.type must be a string"):
        parse(enrollment_json(attestation={}))
    with pytest.raises(ValidationError, match="attestation must be a JSON object"):
        parse(enrollment_json(attestation="symmetricKey"))
    with pytest.raises(ValidationError, match=r"attestation\.x509 does not match"):
        parse(
            enrollment_json(
                attestation={"type": "symmetricKey", "x509": {"clientCertificates": {}}}
            )
        )


def test_tpm_is_not_allowed_for_groups() -> None:
    data = {"enrollmentGroupId": "g", "attestation": {"type": "tpm"}}
    with pytest.raises(ValidationError, match="not allowed for enrollment groups"):
        EnrollmentGroup.from_json(data, now=NOW, generate_key=no_key)


# ---------------------------------------------------------------------------- shapes


def test_enrollment_to_json_shape() -> None:
    enrollment = parse(
        enrollment_json(
            deviceId="Device-One",
            iotHubHostName="Hub1.Azure-Devices.net",
            initialTwin={"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}},
            reprovisionPolicy={"migrateDeviceData": False},
            allocationPolicy="static",
            iotHubs=["hub1.azure-devices.net", "hub2.azure-devices.net:8883"],
            etag="abc",
            registrationState={"status": "assigned"},
            capabilities={"iotEdge": False},
            someFutureField=1,
        )
    )
    assert enrollment.to_json() == {
        "registrationId": "device-1",
        "deviceId": "Device-One",
        "attestation": {
            "type": "symmetricKey",
            "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B},
        },
        "iotHubHostName": "hub1.azure-devices.net",
        "initialTwin": {"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}},
        "provisioningStatus": "enabled",
        "allocationPolicy": "static",
        "iotHubs": ["hub1.azure-devices.net", "hub2.azure-devices.net:8883"],
        "reprovisionPolicy": {"updateHubAssignment": True, "migrateDeviceData": False},
        "etag": "abc",
        "createdDateTimeUtc": NOW,
        "lastUpdatedDateTimeUtc": NOW,
    }


def test_minimal_enrollment_defaults_and_omissions() -> None:
    enrollment = parse(enrollment_json())
    assert enrollment.provisioning_status == "enabled"
    assert enrollment.device_id is None
    assert enrollment.created == NOW and enrollment.last_updated == NOW
    assert set(enrollment.to_json()) == {
        "registrationId",
        "attestation",
        "provisioningStatus",
        "createdDateTimeUtc",
        "lastUpdatedDateTimeUtc",
    }
    stamped = parse(
        enrollment_json(
            createdDateTimeUtc="2020-04-10T03:11:13.0276997Z",
            lastUpdatedDateTimeUtc="2021-01-01T00:00:00Z",
        )
    )
    assert stamped.created == "2020-04-10T03:11:13.0276997Z"
    assert stamped.last_updated == "2021-01-01T00:00:00Z"


def test_group_to_json_shape() -> None:
    group = EnrollmentGroup.from_json(
        {
            "enrollmentGroupId": "Floor-3",
            "attestation": {
                "type": "symmetricKey",
                "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B},
            },
            "provisioningStatus": "disabled",
        },
        now=NOW,
        generate_key=no_key,
    )
    assert group.to_json() == {
        "enrollmentGroupId": "floor-3",
        "attestation": {
            "type": "symmetricKey",
            "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B},
        },
        "provisioningStatus": "disabled",
        "createdDateTimeUtc": NOW,
        "lastUpdatedDateTimeUtc": NOW,
    }
    with pytest.raises(ValidationError, match="enrollmentGroupId"):
        EnrollmentGroup.from_json({"attestation": {}}, now=NOW, generate_key=no_key)


def test_registration_record_shape() -> None:
    record = RegistrationRecord(
        registration_id="device-1",
        status="assigned",
        assigned_hub="hub1.azure-devices.net",
        device_id="device-1",
        substatus="initialAssignment",
        created=NOW,
        last_updated=NOW,
        etag="IjYxMDA4ZDQ2LTAwMDAtMDEwMC0wMDAwLTVlOGZlM2QxMDAwMCI=",
        enrollment_group_id="floor-3",
        payload={"modelId": "dtmi:x;1"},
    )
    assert record.to_json() == {
        "registrationId": "device-1",
        "createdDateTimeUtc": NOW,
        "assignedHub": "hub1.azure-devices.net",
        "deviceId": "device-1",
        "status": "assigned",
        "substatus": "initialAssignment",
        "lastUpdatedDateTimeUtc": NOW,
        "etag": "IjYxMDA4ZDQ2LTAwMDAtMDEwMC0wMDAwLTVlOGZlM2QxMDAwMCI=",
        "payload": {"modelId": "dtmi:x;1"},
        "symmetricKey": {"enrollmentGroupId": "floor-3"},
    }
    failed = RegistrationRecord(
        registration_id="d",
        status="failed",
        assigned_hub=None,
        device_id=None,
        substatus=None,
        created=NOW,
        last_updated=NOW,
        etag="e",
        error_code=400207,
        error_message="Custom allocation failed with status code: 400",
    )
    assert failed.to_json() == {
        "registrationId": "d",
        "createdDateTimeUtc": NOW,
        "status": "failed",
        "errorCode": 400207,
        "errorMessage": "Custom allocation failed with status code: 400",
        "lastUpdatedDateTimeUtc": NOW,
        "etag": "e",
        "symmetricKey": {},
    }


def test_registration_record_validation() -> None:
    with pytest.raises(ValidationError, match="status is required"):
        RegistrationRecord.from_json({"registrationId": "d"})
    with pytest.raises(ValidationError, match="status must be one of"):
        RegistrationRecord.from_json({"registrationId": "d", "status": "done"})
    with pytest.raises(ValidationError, match="errorCode"):
        RegistrationRecord.from_json({"registrationId": "d", "status": "failed", "errorCode": True})
    with pytest.raises(ValidationError, match="payload"):
        RegistrationRecord.from_json(
            {"registrationId": "d", "status": "assigned", "payload": {"x": float("nan")}}
        )


# ---------------------------------------------------------------------------- other fields


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"deviceId": "a/b"}, "deviceId"),
        ({"deviceId": ""}, "deviceId"),
        ({"deviceId": "x" * 129}, "deviceId"),
        ({"iotHubHostName": "bad_host"}, "iotHubHostName"),
        ({"iotHubHostName": "hub:0"}, "invalid port"),
        ({"iotHubHostName": "hub:65536"}, "invalid port"),
        ({"iotHubHostName": "-hub.net"}, "iotHubHostName"),
        ({"provisioningStatus": "Enabled"}, "provisioningStatus must be one of"),
        ({"provisioningStatus": 1}, "provisioningStatus must be a string"),
        ({"allocationPolicy": "random"}, "allocationPolicy must be one of"),
        ({"iotHubs": "hub.net"}, "iotHubs must be a list"),
        ({"iotHubs": ["a.net", "A.net"]}, "twice"),
        ({"iotHubs": ["ok.net", 3]}, r"iotHubs\[1\]"),
        ({"reprovisionPolicy": {"updateHubAssignment": "yes"}}, "updateHubAssignment"),
        ({"reprovisionPolicy": {"other": True}}, "unknown field 'other'"),
        ({"capabilities": {"iotEdge": True}}, "iotEdge"),
        ({"capabilities": []}, "capabilities must be a JSON object"),
        ({"etag": 'a"b'}, "etag"),
        ({"etag": 5}, "etag"),
        ({"createdDateTimeUtc": "2026-13-01T00:00:00Z"}, "createdDateTimeUtc"),
        ({"createdDateTimeUtc": "2026-01-01 00:00:00"}, "createdDateTimeUtc"),
        ({"lastUpdatedDateTimeUtc": "yesterday"}, "lastUpdatedDateTimeUtc"),
        ({"registrationId": None}, "registrationId"),
    ],
)
def test_field_errors_name_the_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse(enrollment_json(**overrides))


def test_not_an_object() -> None:
    values: list[object] = [None, [], "x", 3]
    for value in values:
        with pytest.raises(ValidationError, match="must be a JSON object"):
            parse(value)


def test_initial_twin_rules() -> None:
    assert validate_initial_twin(None) is None
    assert validate_initial_twin({}) == {}
    assert validate_initial_twin({"properties": {}}) == {"properties": {}}
    good = {"tags": {"a": [1, {"b": None}]}, "properties": {"desired": {"c": {"d": "e"}}}}
    assert validate_initial_twin(good) == good
    bad: list[tuple[object, str]] = [
        ([], "initialTwin must be a JSON object"),
        ({"reported": {}}, "may only contain tags and properties"),
        ({"properties": {"reported": {}}}, "may only contain desired"),
        ({"tags": []}, r"initialTwin\.tags must be a JSON object"),
        ({"tags": {"a.b": 1}}, "invalid key"),
        ({"tags": {"$version": 1}}, "invalid key"),
        ({"tags": {"a b": 1}}, "invalid key"),
        ({"tags": {"": 1}}, "invalid key"),
        ({"tags": {"ok": {"\x01": 1}}}, "invalid key"),
        ({"properties": {"desired": {"x": float("inf")}}}, "NaN or infinite"),
        ({"tags": {"x": "\ud800"}}, "UTF-8"),
        ({"tags": {"x": {1, 2}}}, "only JSON values"),
        ({"tags": {"k" * 1025: 1}}, "longer than 1024"),
        ({"tags": {"big": "x" * 9000}}, "larger than 8192"),
        ({"properties": {"desired": {"big": "x" * 33000}}}, "larger than 32768"),
    ]
    for value, message in bad:
        with pytest.raises(ValidationError, match=message):
            validate_initial_twin(value)


def test_initial_twin_depth_limit() -> None:
    def nest(depth: int) -> dict[str, Any]:
        value: dict[str, Any] = {}
        for _ in range(depth - 1):
            value = {"n": value}
        return value

    assert validate_initial_twin({"tags": nest(10)}) is not None
    with pytest.raises(ValidationError, match="deeper than 10"):
        validate_initial_twin({"tags": nest(11)})
    deep: object = 1
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(ValidationError, match="deeper"):
        validate_initial_twin({"tags": {"x": deep}})


def test_host_names() -> None:
    assert validate_host_name("Hub.Azure-Devices.NET") == "hub.azure-devices.net"
    assert validate_host_name("localhost:8883") == "localhost:8883"
    assert validate_host_name("127.0.0.1") == "127.0.0.1"
    for bad in (
        "",
        "a..b",
        "a.",
        "ünï.net",
        "hub.net:",
        "hub.net:x",
        "a" * 64 + ".net",
        "\u212a.net",
    ):
        with pytest.raises(ValidationError):
            validate_host_name(bad)


def test_device_ids_are_case_sensitive() -> None:
    assert validate_device_id("Dev'ice(1)@$") == "Dev'ice(1)@$"
    for bad in ("a#b", "a+b", "a b", "é", ""):
        with pytest.raises(ValidationError):
            validate_device_id(bad)


def test_utc_now_iso_and_etag() -> None:
    assert utc_now_iso(0) == "1970-01-01T00:00:00.000000Z"
    moment = datetime(2026, 11, 28, 16, 57, 35, 123456, tzinfo=timezone.utc)
    assert utc_now_iso(moment.timestamp()) == "2026-11-28T16:57:35.123456Z"
    etag = new_etag()
    decoded = base64.b64decode(etag, validate=True).decode()
    assert decoded.startswith('"') and decoded.endswith('"')
    uuid.UUID(decoded[1:-1])
    assert new_etag() != etag
