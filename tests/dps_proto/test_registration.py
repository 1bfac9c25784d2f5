"""Tests of dps_proto.registration: the sans-IO registration state machine, driven with simulated
time (no sleeps, no sockets)."""

from __future__ import annotations

import heapq
import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from dps_proto import (
    Assignment,
    DpsParseError,
    DpsServiceError,
    DpsStateError,
    OperationStatus,
    OutgoingPublish,
    Phase,
    RegisterRequest,
    Registration,
    RegistrationDisabled,
    RegistrationFailed,
    RegistrationState,
    RetryPolicy,
    encode_json,
    parse_register_payload,
    parse_request_topic,
    response_topic,
)
from dps_proto.errors import DpsError, ProvisioningTimeout

REG_ID = "my-device"
CUSTOM = {"modelId": "dtmi:com:example:Thermostat;1"}
REQUEST = RegisterRequest(REG_ID, payload=CUSTOM)
REGISTER_BODY = (
    b'{"registrationId":"my-device","payload":{"modelId":"dtmi:com:example:Thermostat;1"}}'
)
OP_ID = "4.d0a671905ea5b2c8.42d78160-4c78-479e-8be7-61d5e55dac0d"
OP_ID2 = "5.316aac5bdc130deb.b1e02da8-1111-4222-8333-444455556666"
HUB = "contoso.azure-devices.net"
DEVICE = "my-device-id1"
TRACKING_ID = "8ad0463c-6427-4479-9dfa-3e8bb7003e9b"
ALLOCATION_ERROR = "Custom allocation failed with status code: 400"

REGISTER_TOPIC = "$dps/registrations/PUT/iotdps-register/?$rid="
POLL_TOPIC = "$dps/registrations/GET/iotdps-get-operationstatus/?$rid="


def js(value: Any) -> bytes:
    return json.dumps(value).encode()


ASSIGNED = js(
    {
        "operationId": OP_ID,
        "status": "assigned",
        "registrationState": {
            "x509": {},
            "registrationId": REG_ID,
            "createdDateTimeUtc": "2020-04-10T03:11:13.0276997Z",
            "assignedHub": HUB,
            "deviceId": DEVICE,
            "status": "assigned",
            "substatus": "initialAssignment",
            "lastUpdatedDateTimeUtc": "2020-04-10T03:11:13.2096201Z",
            "etag": "IjYxMDA4ZDQ2LTAwMDAtMDEwMC0wMDAwLTVlOGZlM2QxMDAwMCI=",
            "payload": {"echo": CUSTOM},
        },
    }
)
FAILED = js(
    {
        "operationId": OP_ID,
        "status": "failed",
        "registrationState": {
            "registrationId": REG_ID,
            "status": "failed",
            "errorCode": 400207,
            "errorMessage": ALLOCATION_ERROR,
        },
    }
)
DISABLED = js(
    {
        "operationId": "",
        "status": "disabled",
        "registrationState": {"registrationId": REG_ID, "status": "disabled"},
    }
)
ASSIGNING = js({"operationId": OP_ID, "status": "assigning"})
ASSIGNING_NO_OP = js({"status": "assigning"})
UNASSIGNED = js({"operationId": OP_ID, "status": "unassigned"})
ASSIGNED_NO_HUB = js({"operationId": OP_ID, "status": "assigned", "registrationState": {}})
ERROR_400 = js({"errorCode": 400004, "trackingId": "t-400", "message": "Invalid request body."})
ERROR_401 = js(
    {
        "errorCode": 401002,
        "trackingId": TRACKING_ID,
        "message": "Invalid certificate.",
        "timestampUtc": "2020-04-10T05:24:22.4718526Z",
    }
)
ERROR_404 = js({"errorCode": 404201, "trackingId": "t-404", "message": "Registration not found."})
ERROR_429 = js({"errorCode": 429001, "trackingId": "t-429", "message": "Throttled."})
ERROR_500 = js({"errorCode": 500000, "trackingId": "t-500", "message": "Internal error."})


def res(status: int, rid: str, retry_after: int | None = None) -> str:
    """A response topic, written out literally (not with the code under test)."""
    topic = f"$dps/registrations/res/{status}/?$rid={rid}"
    return topic + (f"&retry-after={retry_after}" if retry_after is not None else "")


class EdgeRng:
    """A stand-in for random.Random whose uniform() returns one end of the range."""

    def __init__(self, end: str = "max") -> None:
        self.end = end
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return b if self.end == "max" else a


def new(policy: RetryPolicy | None = None, rng: Any = None) -> Registration:
    return Registration(REQUEST, policy=policy, rng=cast(random.Random, rng or EdgeRng()))


Sent = tuple[str, Any]


def sent(reg: Registration) -> list[Sent]:
    """Drain the outgoing publishes as (topic, decoded JSON body or b"")."""
    out: list[Sent] = []
    for pub in reg.outgoing():
        assert isinstance(pub, OutgoingPublish)
        out.append((pub.topic, json.loads(pub.payload) if pub.payload else pub.payload))
    return out


def register_msg(rid: str) -> Sent:
    return (REGISTER_TOPIC + rid, {"registrationId": REG_ID, "payload": CUSTOM})


def poll_msg(rid: str, op: str = OP_ID) -> Sent:
    return (f"{POLL_TOPIC}{rid}&operationId={op}", b"")


def snapshot(reg: Registration) -> tuple[Any, ...]:
    return (
        reg.phase,
        reg.next_deadline(),
        reg.operation_id,
        reg.in_flight_rid,
        reg.done,
        reg.assignment,
        id(reg.error),
    )


# -- phases ------------------------------------------------------------------------------------


@dataclass
class Scenario:
    reg: Registration
    now: float  # a time before the current deadline, for inputs


def phase_idle() -> Scenario:
    return Scenario(new(), 0.0)


def phase_register_in_flight() -> Scenario:
    reg = new()
    reg.start(0.0)
    assert sent(reg) == [register_msg("1")]
    assert (reg.phase, reg.in_flight_rid, reg.next_deadline()) == (Phase.REQUESTING, "1", 30.0)
    return Scenario(reg, 1.0)


def phase_poll_in_flight() -> Scenario:
    reg = new()
    reg.start(0.0)
    assert reg.receive(res(202, "1", 1), ASSIGNING, 0.5)
    reg.on_timer(1.5)
    assert sent(reg) == [register_msg("1"), poll_msg("2")]
    assert (reg.phase, reg.in_flight_rid, reg.next_deadline()) == (Phase.REQUESTING, "2", 31.5)
    return Scenario(reg, 2.0)


def phase_waiting() -> Scenario:
    reg = new()
    reg.start(0.0)
    assert reg.receive(res(202, "1", 3), ASSIGNING, 0.5)
    sent(reg)
    assert (reg.phase, reg.in_flight_rid, reg.next_deadline()) == (Phase.WAITING, None, 3.5)
    return Scenario(reg, 1.0)


def phase_assigned() -> Scenario:
    reg = new()
    reg.start(0.0)
    assert reg.receive(res(200, "1"), ASSIGNED, 0.5)
    sent(reg)
    assert reg.phase is Phase.ASSIGNED
    return Scenario(reg, 1.0)


def phase_failed() -> Scenario:
    reg = new()
    reg.start(0.0)
    assert reg.receive(res(401, "1"), ERROR_401, 0.5)
    sent(reg)
    assert reg.phase is Phase.FAILED
    return Scenario(reg, 1.0)


PHASES: dict[str, Callable[[], Scenario]] = {
    "idle": phase_idle,
    "register_in_flight": phase_register_in_flight,
    "poll_in_flight": phase_poll_in_flight,
    "waiting": phase_waiting,
    "assigned": phase_assigned,
    "failed": phase_failed,
}
REQUESTING_PHASES = ["register_in_flight", "poll_in_flight"]
QUIET_PHASES = ["idle", "waiting", "assigned", "failed"]

# -- receive inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Incoming:
    """A message to feed; ``{rid}`` in the topic is the rid the machine last sent ("1" if none)."""

    topic: str
    payload: bytes


def rid_of(reg: Registration) -> str:
    return reg.in_flight_rid or "1"


RECEIVE_INPUTS: dict[str, Incoming] = {
    "200_assigned": Incoming(res(200, "{rid}"), ASSIGNED),
    "200_failed": Incoming(res(200, "{rid}"), FAILED),
    "200_disabled": Incoming(res(200, "{rid}"), DISABLED),
    "202_assigning_with_op": Incoming(res(202, "{rid}", 3), ASSIGNING),
    "202_assigning_without_op": Incoming(res(202, "{rid}"), ASSIGNING_NO_OP),
    "200_assigning_with_op": Incoming(res(200, "{rid}"), ASSIGNING),
    "202_unassigned_with_op": Incoming(res(202, "{rid}", 1), UNASSIGNED),
    "429_retry_after": Incoming(res(429, "{rid}", 5), ERROR_429),
    "429_no_retry_after": Incoming(res(429, "{rid}"), ERROR_429),
    "500": Incoming(res(500, "{rid}"), ERROR_500),
    "503_retry_after_no_body": Incoming(res(503, "{rid}", 7), b""),
    "400": Incoming(res(400, "{rid}"), ERROR_400),
    "401_error_body": Incoming(res(401, "{rid}"), ERROR_401),
    "404": Incoming(res(404, "{rid}"), ERROR_404),
    "404_no_body": Incoming(res(404, "{rid}"), b""),
    "302": Incoming(res(302, "{rid}"), b"{}"),
    "200_error_body": Incoming(res(200, "{rid}"), ERROR_401),
    "200_assigned_without_hub": Incoming(res(200, "{rid}"), ASSIGNED_NO_HUB),
    "200_garbage_body": Incoming(res(200, "{rid}"), b"\xff<html>not json"),
    "unparsable_topic": Incoming("$dps/registrations/res/abc/?$rid={rid}", ASSIGNED),
    "duplicated_key_topic": Incoming("$dps/registrations/res/200/?$rid={rid}&$rid=x", ASSIGNED),
    "wrong_rid": Incoming(res(200, "stale-{rid}"), ASSIGNED),
    "no_rid": Incoming("$dps/registrations/res/200/", ASSIGNED),
    "non_dps_topic": Incoming("devices/my-device/messages/devicebound/", ASSIGNED),
    "own_request_echoed": Incoming(REGISTER_TOPIC + "{rid}", REGISTER_BODY),
}


def feed(reg: Registration, name: str, now: float) -> bool:
    incoming = RECEIVE_INPUTS[name]
    return reg.receive(incoming.topic.replace("{rid}", rid_of(reg)), incoming.payload, now)


@dataclass(frozen=True)
class Expect:
    """What a response does to a machine with a request in flight."""

    handled: bool
    phase: Phase
    #: seconds from now to the next deadline ("keep" = unchanged; None = no deadline)
    delay: float | str | None = None
    #: what the timer then sends: "register", "poll", or "same" (the in-flight kind)
    then_sends: str | None = None
    error: type[DpsError] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


IGNORED = Expect(False, Phase.REQUESTING, "keep")


def service_error(status: int, code: int | None, message: str, tracking: str | None) -> Expect:
    return Expect(
        True,
        Phase.FAILED,
        error=DpsServiceError,
        fields={
            "status": status,
            "error_code": code,
            "service_message": message,
            "tracking_id": tracking,
        },
    )


EXPECT_WHILE_REQUESTING: dict[str, Expect] = {
    "200_assigned": Expect(True, Phase.ASSIGNED),
    "200_failed": Expect(
        True,
        Phase.FAILED,
        error=RegistrationFailed,
        fields={
            "registration_id": REG_ID,
            "error_code": 400207,
            "error_message": ALLOCATION_ERROR,
        },
    ),
    "200_disabled": Expect(
        True, Phase.FAILED, error=RegistrationDisabled, fields={"registration_id": REG_ID}
    ),
    "202_assigning_with_op": Expect(True, Phase.WAITING, 3.0, "poll"),
    # no operation id: register again if none is known yet, else keep polling the known one
    "202_assigning_without_op": Expect(True, Phase.WAITING, 2.0, "same"),
    "200_assigning_with_op": Expect(True, Phase.WAITING, 2.0, "poll"),
    "202_unassigned_with_op": Expect(True, Phase.WAITING, 1.0, "poll"),
    "429_retry_after": Expect(True, Phase.WAITING, 5.0, "same"),
    "429_no_retry_after": Expect(True, Phase.WAITING, 1.0, "same"),  # first back-off step
    "500": Expect(True, Phase.WAITING, 1.0, "same"),
    "503_retry_after_no_body": Expect(True, Phase.WAITING, 7.0, "same"),
    "400": service_error(400, 400004, "Invalid request body.", "t-400"),
    "401_error_body": service_error(401, 401002, "Invalid certificate.", TRACKING_ID),
    "404": service_error(404, 404201, "Registration not found.", "t-404"),
    "404_no_body": service_error(404, None, "no readable error body", None),
    "302": service_error(302, None, "no message", None),
    "200_error_body": service_error(200, 401002, "Invalid certificate.", TRACKING_ID),
    "200_assigned_without_hub": Expect(True, Phase.FAILED, error=DpsParseError),
    "200_garbage_body": Expect(True, Phase.FAILED, error=DpsParseError),
    "unparsable_topic": Expect(True, Phase.FAILED, error=DpsParseError),
    "duplicated_key_topic": Expect(True, Phase.FAILED, error=DpsParseError),
    "wrong_rid": IGNORED,
    "no_rid": IGNORED,
    "non_dps_topic": IGNORED,
    "own_request_echoed": IGNORED,
}


def test_expectation_table_is_complete() -> None:
    assert set(EXPECT_WHILE_REQUESTING) == set(RECEIVE_INPUTS)


def check_assignment(assignment: Assignment | None) -> None:
    assert assignment is not None
    assert assignment.registration_id == REG_ID
    assert assignment.assigned_hub == HUB
    assert assignment.device_id == DEVICE
    assert assignment.substatus == "initialAssignment"
    assert assignment.payload == {"echo": CUSTOM}
    assert assignment.tpm_authentication_key is None
    assert assignment.issued_certificate_chain is None
    assert assignment.state.etag == "IjYxMDA4ZDQ2LTAwMDAtMDEwMC0wMDAwLTVlOGZlM2QxMDAwMCI="


@pytest.mark.parametrize("name", sorted(RECEIVE_INPUTS))
@pytest.mark.parametrize("phase", REQUESTING_PHASES)
def test_receive_while_requesting(phase: str, name: str) -> None:
    scenario = PHASES[phase]()
    reg, now = scenario.reg, scenario.now
    kind = "register" if phase == "register_in_flight" else "poll"
    rid = reg.in_flight_rid
    assert rid is not None
    before = snapshot(reg)
    expect = EXPECT_WHILE_REQUESTING[name]

    assert feed(reg, name, now) is expect.handled
    assert reg.phase is expect.phase
    assert sent(reg) == []  # a response never triggers an immediate publish

    if expect.delay == "keep":
        assert snapshot(reg) == before
        return
    if expect.phase is Phase.ASSIGNED:
        check_assignment(reg.assignment)
        assert reg.result() is reg.assignment
        assert reg.error is None and reg.done and reg.next_deadline() is None
        return
    if expect.phase is Phase.FAILED:
        assert expect.error is not None
        assert type(reg.error) is expect.error
        for attr, value in expect.fields.items():
            assert getattr(reg.error, attr) == value, attr
        with pytest.raises(expect.error) as info:
            reg.result()
        assert info.value is reg.error
        assert reg.done and reg.assignment is None and reg.next_deadline() is None
        assert reg.in_flight_rid is None
        return
    # WAITING: nothing goes out until the deadline, then exactly one request with a new rid
    assert isinstance(expect.delay, float)
    deadline = now + expect.delay
    assert reg.next_deadline() == pytest.approx(deadline)
    assert reg.in_flight_rid is None
    reg.on_timer(deadline - 0.001)
    assert sent(reg) == [] and reg.phase is Phase.WAITING
    reg.on_timer(deadline)
    next_rid = str(int(rid) + 1)
    then = kind if expect.then_sends == "same" else expect.then_sends
    assert sent(reg) == [register_msg(next_rid) if then == "register" else poll_msg(next_rid)]
    assert reg.phase is Phase.REQUESTING
    assert reg.in_flight_rid == next_rid
    assert reg.next_deadline() == pytest.approx(deadline + 30.0)
    assert reg.operation_id == (OP_ID if then == "poll" else None)


@pytest.mark.parametrize("name", sorted(RECEIVE_INPUTS))
@pytest.mark.parametrize("phase", QUIET_PHASES)
def test_receive_ignored_without_a_request_in_flight(phase: str, name: str) -> None:
    scenario = PHASES[phase]()
    reg = scenario.reg
    before = snapshot(reg)
    assert feed(reg, name, scenario.now) is False
    assert snapshot(reg) == before
    assert sent(reg) == []


# -- start / on_timer / retry_now in every phase -----------------------------------------------


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_start_in_every_phase(phase: str) -> None:
    scenario = PHASES[phase]()
    reg = scenario.reg
    if phase == "idle":
        reg.start(5.0)
        assert sent(reg) == [register_msg("1")]
        assert reg.outgoing() == []  # drained
        assert (reg.phase, reg.in_flight_rid, reg.next_deadline()) == (
            Phase.REQUESTING,
            "1",
            35.0,
        )
        return
    before = snapshot(reg)
    with pytest.raises(DpsStateError):
        reg.start(scenario.now)
    assert snapshot(reg) == before
    assert sent(reg) == []


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_on_timer_before_deadline_does_nothing(phase: str) -> None:
    scenario = PHASES[phase]()
    reg = scenario.reg
    before = snapshot(reg)
    reg.on_timer(scenario.now)
    assert snapshot(reg) == before
    assert sent(reg) == []


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_on_timer_after_deadline(phase: str) -> None:
    scenario = PHASES[phase]()
    reg = scenario.reg
    deadline = reg.next_deadline()
    if phase in ("idle", "assigned", "failed"):
        assert deadline is None
        before = snapshot(reg)
        reg.on_timer(1e9)
        assert snapshot(reg) == before
        assert sent(reg) == []
        return
    assert deadline is not None
    if phase == "waiting":
        reg.on_timer(deadline + 0.25)  # late timers are fine
        assert sent(reg) == [poll_msg("2")]
        assert (reg.phase, reg.next_deadline()) == (Phase.REQUESTING, deadline + 0.25 + 30.0)
        return
    # a request went unanswered: back off (1 s at the first retry), then resend with a new rid
    rid = reg.in_flight_rid
    assert rid is not None
    reg.on_timer(deadline)
    assert sent(reg) == []
    assert (reg.phase, reg.next_deadline()) == (Phase.WAITING, deadline + 1.0)
    reg.on_timer(deadline + 1.0)
    next_rid = str(int(rid) + 1)
    expected = register_msg(next_rid) if phase == "register_in_flight" else poll_msg(next_rid)
    assert sent(reg) == [expected]
    assert reg.in_flight_rid == next_rid


@pytest.mark.parametrize("phase", sorted(PHASES))
def test_retry_now_in_every_phase(phase: str) -> None:
    scenario = PHASES[phase]()
    reg, now = scenario.reg, scenario.now
    if phase in ("idle", "assigned", "failed"):
        before = snapshot(reg)
        with pytest.raises(DpsStateError):
            reg.retry_now(now)
        assert snapshot(reg) == before
        return
    expected = {
        "register_in_flight": register_msg("2"),
        "poll_in_flight": poll_msg("3"),
        "waiting": poll_msg("2"),
    }[phase]
    reg.retry_now(now)
    assert sent(reg) == [expected]
    assert reg.phase is Phase.REQUESTING
    assert reg.next_deadline() == now + 30.0


def test_result_before_the_end() -> None:
    for phase in ("idle", "register_in_flight", "poll_in_flight", "waiting"):
        reg = PHASES[phase]().reg
        assert not reg.done
        assert reg.assignment is None and reg.error is None
        with pytest.raises(DpsStateError):
            reg.result()


# -- specific behaviours -----------------------------------------------------------------------


def test_custom_payload_goes_out_and_comes_back() -> None:
    reg = new()
    reg.start(0.0)
    [pub] = reg.outgoing()
    assert pub.topic == "$dps/registrations/PUT/iotdps-register/?$rid=1"
    assert pub.payload == REGISTER_BODY
    assert reg.receive(res(200, "1"), ASSIGNED, 1.0)
    assignment = reg.result()
    assert assignment.payload == {"echo": CUSTOM}
    assert assignment.to_json() == {
        "registrationId": REG_ID,
        "assignedHub": HUB,
        "deviceId": DEVICE,
        "substatus": "initialAssignment",
        "payload": {"echo": CUSTOM},
    }


def test_request_without_payload_and_assignment_fallbacks() -> None:
    reg = Registration(RegisterRequest("dev"), rng=cast(random.Random, EdgeRng()))
    reg.start(0.0)
    assert reg.outgoing()[0].payload == b'{"registrationId":"dev"}'
    body = js(
        {
            "operationId": OP_ID,
            "status": "assigned",
            "registrationState": {
                "assignedHub": "h",
                "deviceId": "d",
                "tpm": {"authenticationKey": "QUJD"},
                "issuedCertificateChain": ["leaf", "ca"],
            },
        }
    )
    assert reg.receive(res(202, "1"), body, 1.0)  # a 202 can carry the final answer too
    assignment = reg.result()
    assert assignment.registration_id == "dev"  # from the request when the state lacks it
    assert assignment.payload is None
    assert assignment.tpm_authentication_key == "QUJD"
    assert assignment.issued_certificate_chain == ("leaf", "ca")
    assert assignment.to_json()["issuedCertificateChain"] == ["leaf", "ca"]


def test_unserialisable_custom_payload_fails_at_start() -> None:
    reg = Registration(RegisterRequest("dev", payload=object()))
    with pytest.raises(DpsParseError):
        reg.start(0.0)
    assert reg.phase is Phase.IDLE and reg.outgoing() == []


@pytest.mark.parametrize(
    ("policy", "status", "retry_after", "body", "delay"),
    [
        (RetryPolicy(), 202, 3, ASSIGNING, 3.0),
        (RetryPolicy(), 202, 0, ASSIGNING, 0.0),
        (RetryPolicy(), 202, 300, ASSIGNING, 300.0),
        (RetryPolicy(), 202, 301, ASSIGNING, 300.0),
        (RetryPolicy(), 202, 999_999_999, ASSIGNING, 300.0),
        (RetryPolicy(max_retry_after=60.0), 202, 120, ASSIGNING, 60.0),
        (RetryPolicy(), 202, None, ASSIGNING, 2.0),
        (RetryPolicy(default_poll_interval=5.0), 202, None, ASSIGNING, 5.0),
        (RetryPolicy(), 429, 10_000, ERROR_429, 300.0),
        (RetryPolicy(max_retry_after=30.0), 503, 45, b"", 30.0),
        (RetryPolicy(), 500, 0, ERROR_500, 0.0),
    ],
)
def test_retry_after_honoured_and_capped(
    policy: RetryPolicy, status: int, retry_after: int | None, body: bytes, delay: float
) -> None:
    reg = new(policy)
    reg.start(100.0)
    sent(reg)
    assert reg.receive(res(status, "1", retry_after), body, 100.5)
    assert reg.phase is Phase.WAITING
    assert reg.next_deadline() == 100.5 + delay


@pytest.mark.parametrize(
    ("raw", "delay"),
    [("", 2.0), ("-3", 2.0), ("soon", 2.0), ("1.5", 2.0), ("%34", 4.0)],
)
def test_unusable_retry_after_falls_back_to_default_poll_interval(raw: str, delay: float) -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive(f"$dps/registrations/res/202/?retry-after={raw}&$rid=1", ASSIGNING, 1.0)
    assert reg.next_deadline() == 1.0 + delay


def fail_repeatedly(reg: Registration, answers: list[tuple[int, int | None, bytes]]) -> list[float]:
    """Answer each request with the next error; return the delays the machine chose."""
    delays: list[float] = []
    now = 0.0
    reg.start(now)
    for status, retry_after, body in answers:
        rid = reg.in_flight_rid
        assert rid is not None
        sent(reg)
        assert reg.receive(res(status, rid, retry_after), body, now)
        if reg.done:
            break
        deadline = reg.next_deadline()
        assert deadline is not None
        delays.append(deadline - now)
        now = deadline
        reg.on_timer(now)
    return delays


def test_backoff_doubles_up_to_the_cap_then_gives_up() -> None:
    reg = new()
    delays = fail_repeatedly(reg, [(500, None, ERROR_500)] * 11)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0, 60.0]
    assert reg.phase is Phase.FAILED
    error = reg.error
    assert isinstance(error, DpsServiceError)
    assert (error.status, error.error_code, error.service_message) == (
        500,
        500000,
        "Internal error.",
    )


def test_backoff_jitter_lower_end_and_policy() -> None:
    rng = EdgeRng("min")
    policy = RetryPolicy(backoff_base=0.5, backoff_cap=3.0, max_retries=6)
    reg = new(policy, rng)
    delays = fail_repeatedly(reg, [(429, None, ERROR_429)] * 6)
    assert delays == [0.25, 0.5, 1.0, 1.5, 1.5, 1.5]
    assert len(rng.calls) == 6  # one draw per back-off


@pytest.mark.parametrize("seed", [0, 1, 42, 2024])
def test_backoff_with_seeded_rng_is_deterministic_and_bounded(seed: int) -> None:
    policy = RetryPolicy(max_retries=12)
    answers = [(503, None, b"")] * 12
    first = fail_repeatedly(new(policy, random.Random(seed)), answers)
    second = fail_repeatedly(new(policy, random.Random(seed)), answers)
    assert first == second
    assert len(first) == 12
    for attempt, delay in enumerate(first, start=1):
        full = min(60.0, 2.0 ** (attempt - 1))
        assert full / 2 <= delay <= full
    assert first[6:] != [60.0] * 6  # jittered, not constant


def test_max_retries_exhausted_reports_the_last_status() -> None:
    reg = new(RetryPolicy(max_retries=3))
    throttled = js({"errorCode": 429001, "trackingId": "last", "message": "Slow down."})
    delays = fail_repeatedly(
        reg, [(429, None, ERROR_429), (500, None, ERROR_500), (503, 1, b""), (429, 9, throttled)]
    )
    assert delays == [1.0, 2.0, 1.0]
    error = reg.error
    assert isinstance(error, DpsServiceError)
    assert (error.status, error.error_code, error.service_message, error.tracking_id) == (
        429,
        429001,
        "Slow down.",
        "last",
    )
    with pytest.raises(DpsServiceError):
        reg.result()


def test_max_retries_zero_fails_at_the_first_throttle() -> None:
    reg = new(RetryPolicy(max_retries=0))
    fail_repeatedly(reg, [(503, 5, b"")])
    assert isinstance(reg.error, DpsServiceError) and reg.error.status == 503


def test_progress_resets_the_retry_count() -> None:
    reg = new()
    reg.start(0.0)
    sent(reg)
    assert reg.receive(res(500, "1"), ERROR_500, 0.0)
    reg.on_timer(1.0)
    assert reg.receive(res(500, "2"), ERROR_500, 1.0)
    assert reg.next_deadline() == 3.0  # second back-off step
    reg.on_timer(3.0)
    assert reg.receive(res(202, "3", 1), ASSIGNING, 3.0)
    reg.on_timer(4.0)
    assert sent(reg)[-1] == poll_msg("4")
    assert reg.receive(res(500, "4"), ERROR_500, 4.0)
    assert reg.next_deadline() == 5.0  # back to the first step
    reg.on_timer(5.0)
    assert sent(reg) == [poll_msg("5")]


def test_time_outs_exhausted() -> None:
    reg = new(RetryPolicy(max_retries=2, response_timeout=10.0))
    reg.start(0.0)
    reg.on_timer(10.0)  # time-out 1 -> wait 1
    reg.on_timer(11.0)  # resend rid 2
    reg.on_timer(21.0)  # time-out 2 -> wait 2
    reg.on_timer(23.0)  # resend rid 3
    assert [t for t, _ in sent(reg)] == [REGISTER_TOPIC + r for r in ("1", "2", "3")]
    reg.on_timer(33.0)  # time-out 3: give up
    error = reg.error
    assert isinstance(error, ProvisioningTimeout)
    assert "did not answer 3 requests" in str(error)


def test_a_huge_max_retries_keeps_backing_off_at_the_cap() -> None:
    """Effectively unlimited retries must not overflow the exponential back-off."""
    reg = new(RetryPolicy(max_retries=1100, response_timeout=1.0, backoff_cap=0.5))
    now = 0.0
    reg.start(now)
    for _ in range(1101):
        deadline = reg.next_deadline()
        assert deadline is not None
        now = deadline
        reg.on_timer(now)  # time-out
        if reg.done:
            break
        assert reg.next_deadline() == now + 0.5
        now += 0.5
        reg.on_timer(now)  # resend
    assert reg.phase is Phase.FAILED
    assert isinstance(reg.error, ProvisioningTimeout)
    assert len(sent(reg)) == 1101


def fire(reg: Registration) -> float:
    """Call on_timer exactly at the current deadline; return that time."""
    deadline = reg.next_deadline()
    assert deadline is not None
    reg.on_timer(deadline)
    return deadline


def test_202_without_operation_id_registers_again_then_polls() -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive(res(202, "1"), ASSIGNING_NO_OP, 0.1)
    assert reg.operation_id is None
    assert reg.next_deadline() == 0.1 + 2.0  # default poll interval
    now = fire(reg)
    assert reg.receive(res(202, "2", 1), js({"operationId": "", "status": "assigning"}), now)
    assert reg.operation_id is None  # an empty id is no id
    now = fire(reg)
    assert reg.receive(res(202, "3", 1), ASSIGNING, now)
    assert reg.operation_id == OP_ID
    now = fire(reg)
    # a poll answer without an id keeps the known one
    assert reg.receive(res(202, "4", 1), ASSIGNING_NO_OP, now)
    now = fire(reg)
    # a new id replaces the old one
    assert reg.receive(res(202, "5", 1), js({"operationId": OP_ID2, "status": "assigning"}), now)
    fire(reg)
    assert sent(reg) == [
        register_msg("1"),
        register_msg("2"),
        register_msg("3"),
        poll_msg("4"),
        poll_msg("5"),
        poll_msg("6", OP_ID2),
    ]
    assert reg.operation_id == OP_ID2


def test_time_out_resends_with_a_new_rid_and_ignores_the_late_answer() -> None:
    reg = new()
    reg.start(0.0)
    reg.on_timer(29.999)
    assert sent(reg) == [register_msg("1")]
    reg.on_timer(30.0)
    assert sent(reg) == [] and reg.phase is Phase.WAITING and reg.next_deadline() == 31.0
    # the late answer to rid 1 arrives while waiting: ignored
    assert reg.receive(res(200, "1"), ASSIGNED, 30.5) is False
    reg.on_timer(31.0)
    assert sent(reg) == [register_msg("2")]
    # ... or while rid 2 is in flight: still ignored
    assert reg.receive(res(202, "1", 1), ASSIGNING, 31.5) is False
    assert reg.receive(res(401, "1"), ERROR_401, 31.6) is False
    assert reg.phase is Phase.REQUESTING and reg.in_flight_rid == "2"
    assert reg.receive(res(200, "2"), ASSIGNED, 32.0) is True
    check_assignment(reg.assignment)


def test_poll_time_out_resends_the_poll() -> None:
    reg = PHASES["poll_in_flight"]().reg
    reg.on_timer(31.5)
    reg.on_timer(32.5)
    assert sent(reg) == [poll_msg("3")]
    assert reg.receive(res(200, "2"), ASSIGNED, 33.0) is False  # stale
    assert reg.receive(res(200, "3"), ASSIGNED, 33.0) is True
    assert reg.phase is Phase.ASSIGNED


def test_stale_rid_after_retry_now_is_ignored() -> None:
    reg = new()
    reg.start(0.0)
    reg.retry_now(1.0)  # e.g. the transport reconnected
    assert sent(reg) == [register_msg("1"), register_msg("2")]
    assert reg.receive(res(401, "1"), ERROR_401, 1.5) is False
    assert reg.receive(res(200, "1"), ASSIGNED, 1.5) is False
    assert reg.phase is Phase.REQUESTING
    assert reg.receive(res(202, "2", 2), ASSIGNING, 2.0) is True


@pytest.mark.parametrize("status", [429, 500, 501, 502, 503, 504, 599])
def test_transient_statuses_are_retried(status: int) -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive(res(status, "1", 4), b"", 1.0)
    assert reg.phase is Phase.WAITING and reg.next_deadline() == 5.0


@pytest.mark.parametrize("status", [100, 201, 204, 301, 403, 409, 412, 415, 428])
def test_other_statuses_fail(status: int) -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive(res(status, "1"), ERROR_400, 1.0)
    assert isinstance(reg.error, DpsServiceError)
    assert reg.error.status == status and reg.error.error_code == 400004


def test_operation_status_with_an_error_status_is_reported() -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive(res(400, "1"), ASSIGNING, 1.0)
    error = reg.error
    assert isinstance(error, DpsServiceError)
    assert error.status == 400 and "assigning" in error.service_message


# -- the poll rate limit -----------------------------------------------------------------------


def test_at_most_five_polls_in_ten_seconds_with_retry_after_zero() -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive(res(202, "1", 0), ASSIGNING, 0.0)
    times: list[float] = []
    now = 0.0
    for _ in range(12):
        deadline = reg.next_deadline()
        assert deadline is not None
        now = max(now, deadline)
        reg.on_timer(now)
        if reg.phase is Phase.WAITING:  # held back by the rate limit
            continue
        assert sent(reg)[-1][0].startswith(POLL_TOPIC)
        times.append(now)
        assert reg.receive(res(202, cast(str, reg.in_flight_rid), 0), ASSIGNING, now)
    assert times[:5] == [0.0] * 5
    assert all(t >= 10.0 for t in times[5:])
    assert_poll_rate(times)


def test_rate_limit_also_holds_back_retry_now() -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive(res(202, "1", 0), ASSIGNING, 0.0)
    for _ in range(5):
        reg.on_timer(0.0)
        rid = reg.in_flight_rid
        assert rid is not None
        assert reg.receive(res(202, rid, 0), ASSIGNING, 0.0)
    sent(reg)
    reg.on_timer(0.0)  # a sixth poll at t=0 is held back until t=10
    assert sent(reg) == [] and reg.phase is Phase.WAITING and reg.next_deadline() == 10.01
    reg.retry_now(3.0)
    assert sent(reg) == [] and reg.next_deadline() == 10.01
    reg.on_timer(10.01)
    assert sent(reg) == [poll_msg("7")]


def assert_poll_rate(times: list[float], per_window: int = 5, window: float = 10.0) -> None:
    """No half-open window [t, t + window) holds more than ``per_window`` polls."""
    assert times == sorted(times)
    for i in range(len(times) - per_window):
        assert times[i + per_window] >= times[i] + window, (i, times[i : i + per_window + 1])


# -- an in-memory fake DPS and a simulated-time driver -----------------------------------------


class FakeDps:
    """Pure-function DPS: register -> 202 assigning (retry-after=1), poll -> 200 assigned."""

    def __init__(self, latency: float = 0.25, polls_before_assigned: int = 0) -> None:
        self.latency = latency
        self.polls_before_assigned = polls_before_assigned
        self.requests: list[tuple[float, str, str]] = []  # (time, kind, rid)
        self._operations: dict[str, tuple[RegisterRequest, int]] = {}

    def handle(self, topic: str, payload: bytes, now: float) -> list[tuple[float, str, bytes]]:
        request = parse_request_topic(topic)
        self.requests.append((now, request.kind, request.rid))
        at = now + self.latency
        if request.kind == "register":
            body = parse_register_payload(payload)
            op = f"{len(self._operations)}.d0a671905ea5b2c8.42d78160-4c78-479e-8be7-61d5e55dac0d"
            self._operations[op] = (body, 0)
            pending = OperationStatus(
                op, "assigning", RegistrationState(body.registration_id, "assigning")
            )
            return [(at, response_topic(202, request.rid, 1), encode_json(pending))]
        assert payload == b""
        op = cast(str, request.operation_id)
        body, polls = self._operations[op]
        self._operations[op] = (body, polls + 1)
        if polls < self.polls_before_assigned:
            status = OperationStatus(op, "assigning")
            return [(at, response_topic(202, request.rid, 1), encode_json(status))]
        state = RegistrationState(
            registration_id=body.registration_id,
            status="assigned",
            assigned_hub=HUB,
            device_id=body.registration_id,
            substatus="initialAssignment",
            payload={"echo": body.payload},
        )
        return [
            (
                at,
                response_topic(200, request.rid),
                encode_json(OperationStatus(op, "assigned", state)),
            )
        ]


Service = Callable[[str, bytes, float], list[tuple[float, str, bytes]]]


@dataclass
class Run:
    end: float
    publishes: list[tuple[float, OutgoingPublish]]
    handled: list[bool]

    def poll_times(self) -> list[float]:
        return [t for t, pub in self.publishes if pub.topic.startswith(POLL_TOPIC)]


def drive(
    reg: Registration,
    service: Service,
    *,
    max_steps: int = 5000,
    reconnect_after: Callable[[int], bool] = lambda _: False,
) -> Run:
    """Run a registration against ``service`` in simulated time until it is done."""
    now = 0.0
    queue: list[tuple[float, int, str, bytes]] = []
    seq = 0
    publishes: list[tuple[float, OutgoingPublish]] = []
    handled: list[bool] = []
    reg.start(now)
    for _ in range(max_steps):
        for pub in reg.outgoing():
            publishes.append((now, pub))
            for at, topic, payload in service(pub.topic, pub.payload, now):
                heapq.heappush(queue, (at, seq, topic, payload))
                seq += 1
        if reg.done:
            return Run(now, publishes, handled)
        deadline = reg.next_deadline()
        assert deadline is not None, "a live registration always has a deadline"
        if queue and queue[0][0] <= deadline:
            at, _, topic, payload = heapq.heappop(queue)
            now = max(now, at)
            handled.append(reg.receive(topic, payload, now))
            if not reg.done and reconnect_after(len(handled)):
                reg.retry_now(now)
        else:
            now = max(now, deadline)
            reg.on_timer(now)
    raise AssertionError(f"not done after {max_steps} steps")


@pytest.mark.parametrize("latency", [0.0, 0.25, 2.5])
def test_fake_service_round_trip(latency: float) -> None:
    service = FakeDps(latency)
    reg = new()
    run = drive(reg, service.handle)
    assert [(t, pub.topic) for t, pub in run.publishes] == [
        (0.0, REGISTER_TOPIC + "1"),
        (latency + 1.0, POLL_TOPIC + "2&operationId=0." + OP_ID.split(".", 1)[1]),
    ]
    assert run.end == pytest.approx(2 * latency + 1.0)
    assert [(k, r) for _, k, r in service.requests] == [("register", "1"), ("poll", "2")]
    assert run.handled == [True, True]
    assignment = reg.result()
    assert assignment == Assignment(
        registration_id=REG_ID,
        assigned_hub=HUB,
        device_id=REG_ID,
        substatus="initialAssignment",
        payload={"echo": CUSTOM},
        state=assignment.state,
    )
    assert assignment.state.status == "assigned"


def test_fake_service_with_several_polls() -> None:
    service = FakeDps(latency=0.1, polls_before_assigned=3)
    reg = new()
    run = drive(reg, service.handle)
    kinds = [k for _, k, _ in service.requests]
    assert kinds == ["register", "poll", "poll", "poll", "poll"]
    rids = [r for _, _, r in service.requests]
    assert len(set(rids)) == len(rids)
    # every poll waits retry-after=1 after the previous answer
    times = run.poll_times()
    assert all(b - a == pytest.approx(1.1) for a, b in zip(times, times[1:]))
    assert reg.result().device_id == REG_ID


# -- property: chaotic services never break the machine or the poll rate ----------------------

ACTIONS = st.one_of(
    st.just(("ok",)),
    st.tuples(st.just("ok-ra"), st.sampled_from([0, 1, 3])),
    st.tuples(st.just("throttle"), st.sampled_from([None, 0, 1, 5, 400])),
    st.tuples(st.just("error"), st.sampled_from([500, 503])),
    st.just(("drop",)),
    st.just(("duplicate",)),
    st.just(("late",)),
    st.just(("stale",)),
    st.just(("no-op-id",)),
)


class ChaosDps:
    """A fake DPS that misbehaves as scripted, then behaves."""

    def __init__(self, actions: list[tuple[Any, ...]], latency: float, polls: int) -> None:
        self.actions = list(actions)
        self.latency = latency
        self.polls_left = polls
        self.rids: list[str] = []

    def handle(self, topic: str, payload: bytes, now: float) -> list[tuple[float, str, bytes]]:
        request = parse_request_topic(topic)
        self.rids.append(request.rid)
        if request.kind == "register":
            assert parse_register_payload(payload) == REQUEST
        else:
            assert request.operation_id == OP_ID
        action = self.actions.pop(0) if self.actions else ("ok",)
        at, rid = now + self.latency, request.rid
        kind = action[0]
        if kind == "drop":
            return []
        if kind == "throttle":
            return [(at, response_topic(429, rid, action[1]), ERROR_429)]
        if kind == "error":
            return [(at, response_topic(action[1], rid), b"")]
        if kind == "stale":
            return [(at, response_topic(200, rid + "-old"), ASSIGNED), *self.progress(at, rid)]
        if kind == "no-op-id":
            return [(at, response_topic(202, rid, 0), ASSIGNING_NO_OP)]
        answers = self.progress(at, rid, action[1] if kind == "ok-ra" else 1)
        if kind == "duplicate":
            return answers + answers
        if kind == "late":
            return [(at + 45.0, topic, body) for _, topic, body in answers]
        return answers

    def progress(self, at: float, rid: str, retry_after: int = 1) -> list[tuple[float, str, bytes]]:
        if self.polls_left > 0:
            self.polls_left -= 1
            return [(at, response_topic(202, rid, retry_after), ASSIGNING)]
        return [(at, response_topic(200, rid), ASSIGNED)]


@settings(max_examples=150, deadline=None)
@given(
    actions=st.lists(ACTIONS, max_size=30),
    latency=st.sampled_from([0.0, 0.001, 0.3, 1.7]),
    polls=st.integers(1, 25),
    reconnects=st.frozensets(st.integers(1, 40), max_size=4),
    seed=st.integers(0, 2**32),
    max_retries=st.sampled_from([2, 10]),
)
def test_chaotic_service(
    actions: list[tuple[Any, ...]],
    latency: float,
    polls: int,
    reconnects: frozenset[int],
    seed: int,
    max_retries: int,
) -> None:
    service = ChaosDps(actions, latency, polls)
    policy = RetryPolicy(max_retries=max_retries)
    reg = Registration(REQUEST, policy=policy, rng=random.Random(seed))
    run = drive(reg, service.handle, reconnect_after=lambda n: n in reconnects)
    assert reg.done
    event("assigned" if reg.assignment is not None else f"failed {type(reg.error).__name__}")
    event(f"polls >= 6: {len(run.poll_times()) >= 6}")
    if reg.assignment is not None:
        check_assignment(reg.assignment)
    else:
        # only a long run of consecutive failures (or answers without operationId) ends it
        assert isinstance(reg.error, (DpsServiceError, ProvisioningTimeout))
        if isinstance(reg.error, DpsServiceError):
            assert reg.error.status in (202, 429, 500, 503)
    assert len(set(service.rids)) == len(service.rids), "every request gets a fresh rid"
    assert_poll_rate(run.poll_times())
    assert reg.outgoing() == [] and reg.next_deadline() is None


@settings(max_examples=200, deadline=None)
@given(
    retry_afters=st.lists(st.sampled_from([0, 0, 0, 0, None, 1, 2, 3]), min_size=1, max_size=40),
    statuses=st.lists(st.sampled_from([202, 202, 202, 200, 429, 503]), max_size=40),
    latency=st.sampled_from([0.0, 0.01, 0.5, 1.0]),
)
def test_poll_rate_never_exceeded(
    retry_afters: list[int | None], statuses: list[int], latency: float
) -> None:
    answers = list(zip(retry_afters, statuses + [202] * len(retry_afters)))
    polls = 0

    def service(topic: str, payload: bytes, now: float) -> list[tuple[float, str, bytes]]:
        nonlocal polls
        request = parse_request_topic(topic)
        if request.kind == "register":
            return [(now + latency, response_topic(202, request.rid, 0), ASSIGNING)]
        polls += 1
        if not answers:
            return [(now + latency, response_topic(200, request.rid), ASSIGNED)]
        retry_after, status = answers.pop(0)
        body = ASSIGNING if status in (200, 202) else ERROR_429
        return [(now + latency, response_topic(status, request.rid, retry_after), body)]

    reg = new(RetryPolicy(max_retries=100))
    run = drive(reg, service)
    check_assignment(reg.result())
    times = run.poll_times()
    assert len(times) == polls == len(retry_afters) + 1
    event(f"rate limit engaged: {any(b - a == 10.0 for a, b in zip(times, times[5:]))}")
    assert_poll_rate(times)


def test_huge_retry_after_is_capped_not_ignored() -> None:
    reg = new()
    reg.start(0.0)
    assert reg.receive("$dps/registrations/res/202/?retry-after=4294967297&$rid=1", ASSIGNING, 1.0)
    assert reg.next_deadline() == 1.0 + reg.policy.max_retry_after
