"""Tests of dps_proto.payloads: register requests, operation status and error bodies."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dps_proto import (
    DpsParseError,
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
from dps_proto.payloads import MAX_PAYLOAD_BYTES, STATUSES

SETTINGS = settings(max_examples=150, deadline=None)

# -- the Embedded C SDK's parser test cases (test_az_iot_provisioning_client_parser.c) ---------

REG_ID = "myRegistrationId"
HUB = "contoso.azure-devices.net"
DEVICE = "my-device-id1"
OP_ID = "4.d0a671905ea5b2c8.42d78160-4c78-479e-8be7-61d5e55dac0d"
ETAG = "IjYxMDA4ZDQ2LTAwMDAtMDEwMC0wMDAwLTVlOGZlM2QxMDAwMCI="
TRACKING_ID = "8ad0463c-6427-4479-9dfa-3e8bb7003e9b"
TIMESTAMP = "2020-04-10T05:24:22.4718526Z"
ALLOCATION_ERROR = "Custom allocation failed with status code: 400"
CUSTOM_PAYLOAD = (
    '{"hello":"world","o1":{"v1":123, "o2": {"v2":321}}, "arr":[1,2,3,4,5,6],"num":123}'
)


def assigned_body(extra: str = "", *, hub: bool = True, device: bool = True) -> bytes:
    return (
        '{"operationId":"' + OP_ID + '","status":"assigned","registrationState":{'
        '"x509":{},'
        '"registrationId":"' + REG_ID + '",'
        '"createdDateTimeUtc":"2020-04-10T03:11:13.0276997Z",'
        + ('"assignedHub":"' + HUB + '",' if hub else "")
        + ('"deviceId":"' + DEVICE + '",' if device else "")
        + '"status":"assigned",'
        '"substatus":"initialAssignment",'
        '"lastUpdatedDateTimeUtc":"2020-04-10T03:11:13.2096201Z",'
        '"etag":"' + ETAG + '"' + extra + "}}"
    ).encode()


FAILED_STATE = (
    '"registrationState":{'
    '"registrationId":"' + REG_ID + '",'
    '"createdDateTimeUtc":"2020-04-10T03:11:13.0276997Z",'
    '"status":"failed",'
    '"errorCode":400207,'
    '"errorMessage":"' + ALLOCATION_ERROR + '",'
    '"lastUpdatedDateTimeUtc":"' + TIMESTAMP + '",'
    '"etag":"' + ETAG + '"}'
)


def test_esdk_assigning() -> None:
    body = parse_response_payload(('{"operationId":"' + OP_ID + '","status":"assigning"}').encode())
    assert body == OperationStatus(OP_ID, "assigning", None)


def test_esdk_assigning_with_registration_state() -> None:
    body = parse_response_payload(
        (
            '{"operationId":"' + OP_ID + '","status":"assigning",'
            '"registrationState":{"registrationId":"' + REG_ID + '","status":"assigning"}}'
        ).encode()
    )
    assert body == OperationStatus(
        OP_ID, "assigning", RegistrationState(registration_id=REG_ID, status="assigning")
    )


def test_esdk_assigned_full_state() -> None:
    body = parse_response_payload(assigned_body())
    assert isinstance(body, OperationStatus)
    assert body.operation_id == OP_ID
    assert body.status == "assigned"
    assert body.registration_state == RegistrationState(
        registration_id=REG_ID,
        status="assigned",
        assigned_hub=HUB,
        device_id=DEVICE,
        substatus="initialAssignment",
        created="2020-04-10T03:11:13.0276997Z",
        last_updated="2020-04-10T03:11:13.2096201Z",
        etag=ETAG,
    )


def test_esdk_invalid_certificate_error_body() -> None:
    body = parse_response_payload(
        (
            '{"errorCode":401002,"trackingId":"' + TRACKING_ID + '",'
            '"message":"Invalid certificate.","timestampUtc":"' + TIMESTAMP + '"}'
        ).encode()
    )
    assert body == ErrorBody(401002, "Invalid certificate.", TRACKING_ID, TIMESTAMP)
    assert body.error_code is not None and body.error_code // 1000 == 401


def test_esdk_disabled_with_empty_operation_id() -> None:
    body = parse_response_payload(
        (
            '{"operationId":"","status":"disabled",'
            '"registrationState":{"registrationId":"' + REG_ID + '","status":"disabled"}}'
        ).encode()
    )
    assert body == OperationStatus(
        None, "disabled", RegistrationState(registration_id=REG_ID, status="disabled")
    )


def test_esdk_failed_allocation() -> None:
    body = parse_response_payload(
        ('{"operationId":"' + OP_ID + '","status":"failed",' + FAILED_STATE + "}").encode()
    )
    assert isinstance(body, OperationStatus)
    assert (body.operation_id, body.status) == (OP_ID, "failed")
    state = body.registration_state
    assert state is not None
    assert state.error_code == 400207
    assert state.error_message == ALLOCATION_ERROR
    assert state.last_updated == TIMESTAMP
    assert state.assigned_hub is None and state.device_id is None


def test_esdk_payload_not_an_object() -> None:
    with pytest.raises(DpsParseError, match="object"):
        parse_response_payload(b"123")


def test_esdk_missing_operation_id_is_accepted() -> None:
    # The ESDK refuses this; we accept it (a poll answer may lack operationId: the state machine
    # reuses the cached one), and the result is the same operation status without an id.
    body = parse_response_payload(('{"status":"failed",' + FAILED_STATE + "}").encode())
    assert isinstance(body, OperationStatus)
    assert body.operation_id is None
    assert body.status == "failed"


def test_esdk_missing_status() -> None:
    with pytest.raises(DpsParseError, match="status"):
        parse_response_payload(('{"operationId":"' + OP_ID + '",' + FAILED_STATE + "}").encode())


def test_esdk_error_body_without_error_code() -> None:
    # The ESDK refuses this; we keep what there is as an error body without a code.
    body = parse_response_payload(
        (
            '{"trackingId":"' + TRACKING_ID + '","message":"Invalid certificate.",'
            '"timestampUtc":"' + TIMESTAMP + '"}'
        ).encode()
    )
    assert body == ErrorBody(None, "Invalid certificate.", TRACKING_ID, TIMESTAMP)


def test_esdk_registration_state_not_an_object() -> None:
    with pytest.raises(DpsParseError, match="registrationState"):
        parse_response_payload(
            ('{"operationId":"' + OP_ID + '","status":"failed","registrationState":123}').encode()
        )


def test_esdk_truncated_json() -> None:
    with pytest.raises(DpsParseError, match="JSON"):
        parse_response_payload(
            (
                '{"operationId":"' + OP_ID + '","registrationState":{'
                '"registrationId":"' + REG_ID + '",'
            ).encode()
        )


@pytest.mark.parametrize(("hub", "device"), [(False, True), (True, False)])
def test_esdk_assigned_hub_xor_device_id(hub: bool, device: bool) -> None:
    with pytest.raises(DpsParseError, match="assignedHub"):
        parse_response_payload(assigned_body(hub=hub, device=device))


def test_esdk_unknown_status() -> None:
    with pytest.raises(DpsParseError, match="unknown"):
        parse_response_payload(
            ('{"operationId":"' + OP_ID + '","status":"unknown status123!@#"}').encode()
        )


@pytest.mark.parametrize("status", STATUSES)
def test_esdk_every_known_status(status: str) -> None:
    body = parse_response_payload(
        ('{"operationId":"' + OP_ID + '","status":"' + status + '"}').encode()
    )
    assert body == OperationStatus(OP_ID, status)
    assert set(STATUSES) == {"unassigned", "assigning", "assigned", "failed", "disabled"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (CUSTOM_PAYLOAD, json.loads(CUSTOM_PAYLOAD)),
        ("{}", {}),
        (" null ", None),
    ],
)
def test_esdk_custom_payload(text: str, expected: Any) -> None:
    body = parse_response_payload(assigned_body(',"payload":' + text))
    assert isinstance(body, OperationStatus)
    assert body.registration_state is not None
    assert body.registration_state.payload == expected
    assert body.registration_state.assigned_hub == HUB


def test_esdk_unknown_fields_are_skipped() -> None:
    extra = (
        ',"trustBundle":{"certificates":[{"certificate":"x","metadata":{"version":3}}]},'
        '"issuedClientCertificate":"--BEGIN_CERT 12345\\r\\n END_CERT--","whatever":[1,{}]'
    )
    body = parse_response_payload(assigned_body(extra))
    assert isinstance(body, OperationStatus)
    assert body.registration_state is not None
    assert body.registration_state.device_id == DEVICE


def test_optional_registration_state_parts() -> None:
    body = parse_response_payload(
        json.dumps(
            {
                "status": "assigned",
                "operationId": "op",
                "registrationState": {
                    "assignedHub": "h",
                    "deviceId": "d",
                    "tpm": {"authenticationKey": "QUJD"},
                    "symmetricKey": {"enrollmentGroupId": "g1"},
                    "issuedCertificateChain": ["leaf", "ca"],
                    "payload": [1, "two"],
                },
            }
        ).encode()
    )
    assert isinstance(body, OperationStatus)
    state = body.registration_state
    assert state is not None
    assert state.tpm_authentication_key == "QUJD"
    assert state.symmetric_key_group == "g1"
    assert state.issued_certificate_chain == ("leaf", "ca")
    assert state.payload == [1, "two"]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b" ",
        b"null",
        b"[]",
        b'"text"',
        b"\xff\xfe{}",
        b'{"status":"assigned",}',
        b'{"status":5}',
        b'{"status":null,"operationId":5}',
        b'{"status":"assigned","operationId":5}',
        b'{"status":"assigned","operationId":["x"]}',
        b'{"status":"ASSIGNED"}',
        b'{"status":"assigned","registrationState":[]}',
        b'{"status":"assigned","registrationState":"x"}',
        b'{"status":"assigned","registrationState":{"status":"weird"}}',
        b'{"status":"assigned","registrationState":{"status":1}}',
        b'{"status":"assigned","registrationState":{"assignedHub":1,"deviceId":"d"}}',
        b'{"status":"assigned","registrationState":{"assignedHub":"h","deviceId":null}}',
        b'{"status":"assigned","registrationState":{"errorCode":"400207"}}',
        b'{"status":"assigned","registrationState":{"errorCode":400207.0}}',
        b'{"status":"assigned","registrationState":{"errorCode":true}}',
        b'{"status":"assigned","registrationState":{"errorCode":NaN}}',
        b'{"status":"assigned","registrationState":{"errorMessage":{}}}',
        b'{"status":"assigned","registrationState":{"tpm":"x"}}',
        b'{"status":"assigned","registrationState":{"tpm":{"authenticationKey":1}}}',
        b'{"status":"assigned","registrationState":{"symmetricKey":[]}}',
        b'{"status":"assigned","registrationState":{"symmetricKey":{"enrollmentGroupId":2}}}',
        b'{"status":"assigned","registrationState":{"issuedCertificateChain":"x"}}',
        b'{"status":"assigned","registrationState":{"issuedCertificateChain":[1]}}',
        b'{"errorCode":"401002"}',
        b'{"errorCode":true}',
        b'{"errorCode":401002,"message":7}',
        b'{"errorCode":401002,"trackingId":[]}',
        b'{"status":"assigned","x":' + b"1" * 5000 + b"}",  # int beyond Python's digit limit
        b"[" * 40_000 + b"]" * 40_000,  # deeper than the recursion limit
        b'{"a":' * 15_000 + b"1" + b"}" * 15_000,
    ],
)
def test_response_payload_rejects(body: bytes) -> None:
    with pytest.raises(DpsParseError):
        parse_response_payload(body)


@pytest.mark.parametrize("bad", ['{"status":"assigned"}', None, 123, memoryview(b"{}")])
def test_response_payload_rejects_non_bytes(bad: object) -> None:
    with pytest.raises(DpsParseError):
        parse_response_payload(bad)  # type: ignore[arg-type]


def test_bytearray_is_accepted() -> None:
    assert parse_response_payload(bytearray(b'{"status":"assigning","operationId":"o"}')) == (
        OperationStatus("o", "assigning")
    )


def test_error_body_info_must_be_an_object_or_is_dropped() -> None:
    assert parse_response_payload(b'{"errorCode":1,"info":{"a":"b"}}') == ErrorBody(
        1, None, info={"a": "b"}
    )
    assert parse_response_payload(b'{"errorCode":1,"info":"text"}') == ErrorBody(1, None)


def test_oversized_payloads_are_rejected() -> None:
    status = b'{"status":"assigning","operationId":"o"}'
    at_limit = status + b" " * (MAX_PAYLOAD_BYTES - len(status))
    assert len(at_limit) == MAX_PAYLOAD_BYTES == 96 * 1024
    assert parse_response_payload(at_limit) == OperationStatus("o", "assigning")
    with pytest.raises(DpsParseError, match="larger"):
        parse_response_payload(at_limit + b" ")
    big = json.dumps(
        {"status": "assigned", "registrationState": {"payload": "x" * MAX_PAYLOAD_BYTES}}
    ).encode()
    with pytest.raises(DpsParseError, match="larger"):
        parse_response_payload(big)
    request = b'{"registrationId":"d"}'
    assert parse_register_payload(request + b" " * (MAX_PAYLOAD_BYTES - len(request))) == (
        RegisterRequest("d")
    )
    with pytest.raises(DpsParseError, match="larger"):
        parse_register_payload(request + b" " * (MAX_PAYLOAD_BYTES - len(request) + 1))


# -- to_json shapes ----------------------------------------------------------------------------


def test_to_json_shapes() -> None:
    state = RegistrationState(
        registration_id="r",
        status="assigned",
        assigned_hub="h",
        device_id="d",
        tpm_authentication_key="k",
        symmetric_key_group="g",
        issued_certificate_chain=("a", "b"),
    )
    assert state.to_json() == {
        "registrationId": "r",
        "assignedHub": "h",
        "deviceId": "d",
        "status": "assigned",
        "tpm": {"authenticationKey": "k"},
        "symmetricKey": {"enrollmentGroupId": "g"},
        "issuedCertificateChain": ["a", "b"],
    }
    assert RegistrationState().to_json() == {}
    assert OperationStatus(None, "disabled").to_json() == {"operationId": "", "status": "disabled"}
    assert encode_json(OperationStatus("o", "assigning")) == (
        b'{"operationId":"o","status":"assigning"}'
    )
    assert encode_json(ErrorBody(404001, "not found", "t")) == (
        b'{"errorCode":404001,"trackingId":"t","message":"not found"}'
    )


# -- round trips -------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=4)
opt_text = st.one_of(st.none(), st.text(max_size=30))
error_codes = st.one_of(st.none(), st.integers(-(2**40), 2**40))


@st.composite
def registration_states(draw: st.DrawFn) -> RegistrationState:
    assigned = draw(st.booleans())
    return RegistrationState(
        registration_id=draw(opt_text),
        status=draw(st.one_of(st.none(), st.sampled_from(STATUSES))),
        assigned_hub=draw(st.text(max_size=30)) if assigned else None,
        device_id=draw(st.text(max_size=30)) if assigned else None,
        substatus=draw(opt_text),
        error_code=draw(error_codes),
        error_message=draw(opt_text),
        created=draw(opt_text),
        last_updated=draw(opt_text),
        etag=draw(opt_text),
        payload=draw(json_values),
        tpm_authentication_key=draw(opt_text),
        symmetric_key_group=draw(opt_text),
        issued_certificate_chain=draw(
            st.one_of(st.none(), st.lists(st.text(max_size=20), max_size=3).map(tuple))
        ),
    )


operation_statuses = st.builds(
    OperationStatus,
    operation_id=st.one_of(st.none(), st.text(min_size=1, max_size=60)),
    status=st.sampled_from(STATUSES),
    registration_state=st.one_of(st.none(), registration_states()),
)
error_bodies = st.builds(
    ErrorBody,
    error_code=error_codes,
    message=opt_text,
    tracking_id=opt_text,
    timestamp=opt_text,
    info=st.one_of(st.none(), json_objects),
)


@SETTINGS
@given(status=operation_statuses)
def test_operation_status_round_trip(status: OperationStatus) -> None:
    assert parse_response_payload(encode_json(status)) == status


def test_empty_operation_id_round_trips_as_none() -> None:
    assert parse_response_payload(encode_json(OperationStatus("", "assigning"))) == (
        OperationStatus(None, "assigning")
    )


@SETTINGS
@given(body=error_bodies)
def test_error_body_round_trip(body: ErrorBody) -> None:
    assert parse_response_payload(encode_json(body)) == body


@SETTINGS
@given(status=operation_statuses, data=st.data())
def test_response_field_order_does_not_matter(status: OperationStatus, data: st.DataObject) -> None:
    obj = status.to_json()
    if "registrationState" in obj:
        state = obj["registrationState"]
        obj["registrationState"] = dict(data.draw(st.permutations(list(state.items()))))
    shuffled = dict(data.draw(st.permutations(list(obj.items()))))
    assert parse_response_payload(json.dumps(shuffled).encode()) == status


# -- register requests -------------------------------------------------------------------------


def test_build_register_payload_literals() -> None:
    assert build_register_payload(RegisterRequest(REG_ID)) == (
        b'{"registrationId":"myRegistrationId"}'
    )
    assert (
        build_register_payload(
            RegisterRequest(REG_ID, payload={"modelId": "dtmi:com:example:Thermostat;1"})
        )
        == b'{"registrationId":"myRegistrationId",'
        b'"payload":{"modelId":"dtmi:com:example:Thermostat;1"}}'
    )
    assert json.loads(
        build_register_payload(RegisterRequest("d", tpm=TpmAttestation("EK"), csr="MIIB"))
    ) == {"registrationId": "d", "tpm": {"endorsementKey": "EK"}, "csr": "MIIB"}
    assert json.loads(
        build_register_payload(RegisterRequest("d", tpm=TpmAttestation("EK", "SRK")))
    ) == {"registrationId": "d", "tpm": {"endorsementKey": "EK", "storageRootKey": "SRK"}}


@pytest.mark.parametrize("payload", [object(), {"a": {1, 2}}, b"bytes", {(1, 2): "tuple key"}])
def test_build_register_payload_rejects_non_json(payload: object) -> None:
    with pytest.raises(DpsParseError, match="JSON"):
        build_register_payload(RegisterRequest("d", payload=payload))


def test_build_register_payload_rejects_circular_payload() -> None:
    circular: list[object] = []
    circular.append(circular)
    with pytest.raises(DpsParseError):
        build_register_payload(RegisterRequest("d", payload=circular))


register_requests = st.builds(
    RegisterRequest,
    registration_id=st.text(min_size=1, max_size=128),
    payload=json_values,
    tpm=st.one_of(
        st.none(),
        st.builds(
            TpmAttestation,
            endorsement_key=st.text(min_size=1, max_size=40),
            storage_root_key=opt_text,
        ),
    ),
    csr=opt_text,
)


@SETTINGS
@given(request=register_requests)
def test_register_payload_round_trip(request: RegisterRequest) -> None:
    data = build_register_payload(request)
    assert parse_register_payload(data) == request
    assert json.loads(data)["registrationId"] == request.registration_id


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"[]",
        b"{}",
        b'{"registrationId":""}',
        b'{"registrationId":null}',
        b'{"registrationId":5}',
        b'{"registrationId":"d","tpm":"x"}',
        b'{"registrationId":"d","tpm":{}}',
        b'{"registrationId":"d","tpm":{"endorsementKey":""}}',
        b'{"registrationId":"d","tpm":{"endorsementKey":1}}',
        b'{"registrationId":"d","tpm":{"endorsementKey":"e","storageRootKey":2}}',
        b'{"registrationId":"d","csr":1}',
        b'{"registrationId":"d"',
        b"\xc3\x28",
    ],
)
def test_parse_register_payload_rejects(body: bytes) -> None:
    with pytest.raises(DpsParseError):
        parse_register_payload(body)


# -- arbitrary input -> only DpsParseError -----------------------------------------------------

RESPONSE_KEYS = [
    "operationId",
    "status",
    "registrationState",
    "errorCode",
    "message",
    "trackingId",
    "timestampUtc",
    "info",
]
STATE_KEYS = [
    "registrationId",
    "status",
    "assignedHub",
    "deviceId",
    "substatus",
    "errorCode",
    "errorMessage",
    "createdDateTimeUtc",
    "lastUpdatedDateTimeUtc",
    "etag",
    "payload",
    "tpm",
    "symmetricKey",
    "issuedCertificateChain",
]
REQUEST_KEYS = ["registrationId", "tpm", "payload", "csr"]


def _near_miss(keys: list[str], inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.dictionaries(st.sampled_from(keys), inner, max_size=len(keys))


near_miss_values = st.one_of(
    json_values,
    st.sampled_from([*list(STATUSES), "", "Assigned"]),
    _near_miss(
        ["authenticationKey", "enrollmentGroupId", "endorsementKey", "storageRootKey"], json_scalars
    ),
)
near_miss_bodies = st.one_of(
    json_values,
    _near_miss(RESPONSE_KEYS + REQUEST_KEYS, near_miss_values),
    st.builds(
        lambda top, state: {**top, "registrationState": state},
        _near_miss(["operationId", "status"], st.one_of(st.sampled_from(STATUSES), json_scalars)),
        _near_miss(STATE_KEYS, near_miss_values),
    ),
)


@settings(max_examples=400, deadline=None)
@given(body=near_miss_bodies)
def test_arbitrary_json_raises_only_parse_error(body: Any) -> None:
    data = json.dumps(body).encode()
    for parser in (parse_response_payload, parse_register_payload):
        with contextlib.suppress(DpsParseError):
            parser(data)


@settings(max_examples=300, deadline=None)
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_arbitrary_bytes_raise_only_parse_error(data: bytes) -> None:
    for parser in (parse_response_payload, parse_register_payload):
        with contextlib.suppress(DpsParseError):
            parser(data)
