"""Tests of the TPM challenge in dps_proto.registration: the CHALLENGED phase and its inputs,
driven with simulated time (no sleeps, no sockets)."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dps_proto import (
    DpsServiceError,
    DpsStateError,
    OutgoingPublish,
    Phase,
    RegisterRequest,
    Registration,
    RetryPolicy,
    TpmAttestation,
    TpmChallenge,
    build_register_payload,
)

REG_ID = "tpm-device"
EK = "AToAAQALAAMAsgAg"
SRK = "ARgAAQALAAMAcgAA"
CUSTOM = {"modelId": "dtmi:com:example:Thermostat;1"}
TPM_REQUEST = RegisterRequest(REG_ID, payload=CUSTOM, tpm=TpmAttestation(EK, SRK))
OP_ID = "4.d0a671905ea5b2c8.42d78160-4c78-479e-8be7-61d5e55dac0d"
BLOB = "AbCd" * 20
HUB_BLOB = "EfGh" * 20
HUB = "contoso.azure-devices.net"


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


CHALLENGE = js({"authenticationKey": BLOB, "keyName": "registration"})
ASSIGNING = js({"operationId": OP_ID, "status": "assigning"})
ASSIGNED = js(
    {
        "operationId": OP_ID,
        "status": "assigned",
        "registrationState": {
            "registrationId": REG_ID,
            "assignedHub": HUB,
            "deviceId": REG_ID,
            "status": "assigned",
            "tpm": {"authenticationKey": HUB_BLOB},
        },
    }
)
ERROR_401 = js({"errorCode": 401002, "trackingId": "t-401", "message": "Unauthorized."})
ERROR_429 = js({"errorCode": 429001, "trackingId": "t-429", "message": "Throttled."})


def new(request: RegisterRequest = TPM_REQUEST) -> Registration:
    return Registration(request, policy=RetryPolicy(), rng=random.Random(7))


def one(reg: Registration) -> OutgoingPublish:
    out = reg.outgoing()
    assert len(out) == 1
    return out[0]


def challenged(now: float = 1.0) -> tuple[Registration, OutgoingPublish]:
    """A TPM registration whose first register was answered with the challenge."""
    reg = new()
    reg.start(0.0)
    first = one(reg)
    assert first.kind == "register"
    assert reg.receive_response(first.rid, 401, None, CHALLENGE, now)
    return reg, first


def snapshot(reg: Registration) -> tuple[Any, ...]:
    return (
        reg.phase,
        reg.next_deadline(),
        reg.operation_id,
        reg.in_flight_rid,
        reg.done,
        reg.assignment,
        reg.error,
        reg.challenge,
    )


# -- the challenge and the answer ---------------------------------------------------------------


def test_challenge_then_signed_register_then_poll_then_assigned() -> None:
    reg = new()
    assert reg.challenge is None
    reg.start(0.0)
    first = one(reg)
    assert json.loads(first.payload) == {
        "registrationId": REG_ID,
        "tpm": {"endorsementKey": EK, "storageRootKey": SRK},
        "payload": CUSTOM,
    }
    assert reg.receive_response(first.rid, 401, None, CHALLENGE, 1.0)
    assert reg.phase is Phase.CHALLENGED
    assert reg.challenge == TpmChallenge(BLOB, "registration")
    assert reg.next_deadline() is None  # nothing to wait for: the caller imports the blob
    assert reg.in_flight_rid is None
    assert not reg.done
    assert reg.outgoing() == []

    reg.challenge_answered(5.0)
    second = one(reg)
    assert reg.challenge is None
    assert (second.kind, second.operation_id) == ("register", None)
    assert second.rid != first.rid
    assert second.payload == first.payload  # the same body, now to be sent signed
    assert second.payload == build_register_payload(TPM_REQUEST)
    assert snapshot(reg)[:4] == (Phase.REQUESTING, 35.0, None, second.rid)

    assert reg.receive_response(second.rid, 202, 2, ASSIGNING, 6.0)
    assert (reg.phase, reg.next_deadline()) == (Phase.WAITING, 8.0)
    reg.on_timer(8.0)
    poll = one(reg)
    assert (poll.kind, poll.operation_id) == ("poll", OP_ID)
    assert reg.receive_response(poll.rid, 200, None, ASSIGNED, 9.0)
    assignment = reg.result()
    assert assignment.tpm_authentication_key == HUB_BLOB
    assert (assignment.assigned_hub, assignment.device_id) == (HUB, REG_ID)
    assert reg.challenge is None


def test_challenge_arrives_over_mqtt_topics_too() -> None:
    reg = new()
    reg.start(0.0)
    first = one(reg)
    assert reg.receive(f"$dps/registrations/res/401/?$rid={first.rid}", CHALLENGE, 1.0)
    assert reg.phase is Phase.CHALLENGED


@pytest.mark.parametrize(
    ("body", "key_name"),
    [
        ({"authenticationKey": BLOB, "keyName": "registration"}, "registration"),
        ({"authenticationKey": BLOB, "keyName": "other-name"}, "other-name"),
        ({"authenticationKey": BLOB}, None),
        ({"authenticationKey": BLOB, "keyName": 5}, None),
        ({"authenticationKey": BLOB, "keyName": None, "errorCode": 401002}, None),
    ],
)
def test_key_name_is_taken_when_it_is_a_string(body: dict[str, Any], key_name: str | None) -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive_response(one(reg).rid, 401, None, js(body), 1.0)
    assert reg.challenge == TpmChallenge(BLOB, key_name)


def test_throttled_unsigned_register_is_retried_then_challenged() -> None:
    reg = new()
    reg.start(0.0)
    first = one(reg)
    assert reg.receive_response(first.rid, 429, 3, ERROR_429, 1.0)
    assert (reg.phase, reg.next_deadline()) == (Phase.WAITING, 4.0)
    reg.on_timer(4.0)
    again = one(reg)
    assert again.payload == first.payload
    assert reg.receive_response(again.rid, 401, None, CHALLENGE, 5.0)
    assert reg.phase is Phase.CHALLENGED


def test_signed_register_throttled_is_retried_with_the_same_body() -> None:
    reg, first = challenged()
    reg.challenge_answered(2.0)
    second = one(reg)
    assert reg.receive_response(second.rid, 503, 1, b"", 3.0)
    reg.on_timer(4.0)
    third = one(reg)
    assert (third.kind, third.payload) == ("register", first.payload)
    assert reg.receive_response(third.rid, 200, None, ASSIGNED, 5.0)
    assert reg.result().tpm_authentication_key == HUB_BLOB


def test_signed_register_time_out_resends_the_register() -> None:
    reg, first = challenged()
    reg.challenge_answered(2.0)
    second = one(reg)
    reg.on_timer(32.0)  # no answer within response_timeout: back off, then resend
    deadline = reg.next_deadline()
    assert reg.phase is Phase.WAITING and deadline is not None
    reg.on_timer(deadline)
    third = one(reg)
    assert third.kind == "register" and third.payload == first.payload
    assert third.rid != second.rid


# -- the challenge is taken once, and only where it belongs -------------------------------------


def test_a_second_challenge_is_a_service_error() -> None:
    reg, _ = challenged()
    reg.challenge_answered(2.0)
    second = one(reg)
    assert reg.receive_response(second.rid, 401, None, CHALLENGE, 3.0)
    assert reg.phase is Phase.FAILED
    assert reg.challenge is None
    with pytest.raises(DpsServiceError) as info:
        reg.result()
    assert info.value.status == 401


def test_a_second_challenge_after_a_throttle_is_still_refused() -> None:
    reg, _ = challenged()
    reg.challenge_answered(2.0)
    assert reg.receive_response(one(reg).rid, 429, 1, ERROR_429, 3.0)
    reg.on_timer(4.0)
    assert reg.receive_response(one(reg).rid, 401, None, CHALLENGE, 5.0)
    assert isinstance(reg.error, DpsServiceError)


def test_challenge_to_a_poll_is_a_service_error() -> None:
    reg, _ = challenged()
    reg.challenge_answered(2.0)
    assert reg.receive_response(one(reg).rid, 202, 0, ASSIGNING, 3.0)
    reg.on_timer(3.0)
    poll = one(reg)
    assert poll.kind == "poll"
    assert reg.receive_response(poll.rid, 401, None, CHALLENGE, 4.0)
    assert isinstance(reg.error, DpsServiceError)
    assert reg.error.status == 401


def test_challenge_body_for_a_request_without_tpm_is_a_service_error() -> None:
    reg = new(RegisterRequest(REG_ID))
    reg.start(0.0)
    assert reg.receive_response(one(reg).rid, 401, None, CHALLENGE, 1.0)
    assert reg.phase is Phase.FAILED
    assert isinstance(reg.error, DpsServiceError)
    assert reg.error.status == 401


@pytest.mark.parametrize(
    "body",
    [
        ERROR_401,
        b"",
        b"\xff not json",
        b"[]",
        b'"authenticationKey"',
        js({"authenticationKey": ""}),
        js({"authenticationKey": None, "keyName": "registration"}),
        js({"authenticationKey": 12}),
        js({"authenticationKey": ["x"]}),
        js({"keyName": "registration"}),
    ],
)
def test_401_without_authentication_key_is_a_service_error(body: bytes) -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive_response(one(reg).rid, 401, None, body, 1.0)
    assert reg.phase is Phase.FAILED
    assert reg.challenge is None
    error = reg.error
    assert isinstance(error, DpsServiceError)
    assert error.status == 401
    if body == ERROR_401:
        assert (error.error_code, error.tracking_id) == (401002, "t-401")


@pytest.mark.parametrize("status", [400, 403, 404])
def test_authentication_key_with_another_status_is_not_a_challenge(status: int) -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive_response(one(reg).rid, status, None, CHALLENGE, 1.0)
    assert isinstance(reg.error, DpsServiceError)
    assert reg.error.status == status


@given(
    body=st.one_of(
        st.binary(max_size=64),
        st.dictionaries(
            st.text(max_size=20), st.none() | st.integers() | st.text(max_size=20), max_size=4
        ).map(js),
    )
)
def test_arbitrary_401_bodies_challenge_or_fail_cleanly(body: bytes) -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive_response(one(reg).rid, 401, None, body, 1.0)
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    key = parsed.get("authenticationKey") if isinstance(parsed, dict) else None
    if isinstance(key, str) and key:
        assert reg.phase is Phase.CHALLENGED
        assert reg.challenge is not None and reg.challenge.authentication_key == key
    else:
        assert reg.phase is Phase.FAILED
        assert isinstance(reg.error, DpsServiceError)


# -- every input while CHALLENGED -----------------------------------------------------------------


RESPONSES: dict[str, tuple[int, bytes]] = {
    "200_assigned": (200, ASSIGNED),
    "202_assigning": (202, ASSIGNING),
    "401_challenge": (401, CHALLENGE),
    "401_error": (401, ERROR_401),
    "429": (429, ERROR_429),
    "500": (500, b""),
}


@pytest.mark.parametrize("name", sorted(RESPONSES))
@pytest.mark.parametrize("rid", ["old", "next", "other"])
def test_responses_while_challenged_are_ignored(name: str, rid: str) -> None:
    reg, first = challenged()
    the_rid = {"old": first.rid, "next": str(int(first.rid) + 1), "other": "x"}[rid]
    status, body = RESPONSES[name]
    before = snapshot(reg)
    assert reg.receive_response(the_rid, status, 1, body, 2.0) is False
    topic = f"$dps/registrations/res/{status}/?$rid={the_rid}"
    assert reg.receive(topic, body, 2.0) is False
    assert snapshot(reg) == before
    assert reg.outgoing() == []


@pytest.mark.parametrize("now", [1.0, 31.0, 1e9])
def test_timer_while_challenged_does_nothing(now: float) -> None:
    reg, _ = challenged()
    before = snapshot(reg)
    reg.on_timer(now)
    assert snapshot(reg) == before
    assert reg.outgoing() == []


def test_start_while_challenged_is_a_state_error() -> None:
    reg, _ = challenged()
    before = snapshot(reg)
    with pytest.raises(DpsStateError):
        reg.start(2.0)
    assert snapshot(reg) == before
    assert reg.outgoing() == []


def test_result_while_challenged_is_a_state_error() -> None:
    reg, _ = challenged()
    with pytest.raises(DpsStateError):
        reg.result()
    assert (reg.assignment, reg.error, reg.done) == (None, None, False)


def test_retry_now_while_challenged_is_a_state_error() -> None:
    reg, _ = challenged()
    before = snapshot(reg)
    with pytest.raises(DpsStateError):
        reg.retry_now(2.0)
    assert snapshot(reg) == before
    assert reg.outgoing() == []


def test_challenge_answered_twice_is_a_state_error() -> None:
    reg, _ = challenged()
    reg.challenge_answered(2.0)
    one(reg)
    before = snapshot(reg)
    with pytest.raises(DpsStateError):
        reg.challenge_answered(3.0)
    assert snapshot(reg) == before
    assert reg.outgoing() == []


# -- challenge_answered in every other phase ------------------------------------------------------


def _idle() -> Registration:
    return new()


def _register_in_flight() -> Registration:
    reg = new()
    reg.start(0.0)
    one(reg)
    return reg


def _waiting() -> Registration:
    reg = new()
    reg.start(0.0)
    assert reg.receive_response(one(reg).rid, 429, 5, ERROR_429, 1.0)
    return reg


def _poll_in_flight() -> Registration:
    reg, _ = challenged()
    reg.challenge_answered(2.0)
    assert reg.receive_response(one(reg).rid, 202, 1, ASSIGNING, 3.0)
    reg.on_timer(4.0)
    one(reg)
    return reg


def _assigned() -> Registration:
    reg = _poll_in_flight()
    assert reg.receive_response(reg.in_flight_rid or "", 200, None, ASSIGNED, 5.0)
    return reg


def _failed() -> Registration:
    reg = new()
    reg.start(0.0)
    assert reg.receive_response(one(reg).rid, 401, None, ERROR_401, 1.0)
    return reg


OTHER_PHASES: dict[str, tuple[Callable[[], Registration], Phase]] = {
    "idle": (_idle, Phase.IDLE),
    "register_in_flight": (_register_in_flight, Phase.REQUESTING),
    "waiting": (_waiting, Phase.WAITING),
    "poll_in_flight": (_poll_in_flight, Phase.REQUESTING),
    "assigned": (_assigned, Phase.ASSIGNED),
    "failed": (_failed, Phase.FAILED),
}


@pytest.mark.parametrize("phase", sorted(OTHER_PHASES))
def test_challenge_answered_in_other_phases_is_a_state_error(phase: str) -> None:
    make, expected_phase = OTHER_PHASES[phase]
    reg = make()
    assert reg.phase is expected_phase
    assert reg.challenge is None
    before = snapshot(reg)
    with pytest.raises(DpsStateError, match="challenge_answered"):
        reg.challenge_answered(10.0)
    assert snapshot(reg) == before
    assert reg.outgoing() == []
