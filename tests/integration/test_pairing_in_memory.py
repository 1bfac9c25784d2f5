"""The device's registration state machine against the emulator's DPS service, in memory.

No sockets and no clock: a loop carries ``Registration.outgoing()`` into
``DpsService.handle_publish`` and the replies back into ``Registration.receive``, and advances a
simulated time to ``Registration.next_deadline()``. Both sides use that same time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import random
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dps_proto import (
    Assignment,
    RegisterRequest,
    Registration,
    RegistrationDisabled,
    RegistrationFailed,
    parse_response_topic,
)
from emulator.dps_service import DpsConfig, DpsIdentity, DpsService
from emulator.models import EnrollmentGroup, IndividualEnrollment, SymmetricKeyAttestation
from emulator.store import Store

SCOPE = "0ne0000PAIR"
HUBS = ("hub-1.azure-devices.net", "hub-2.azure-devices.net")
KEY_1 = base64.b64encode(bytes(range(32))).decode()
KEY_2 = base64.b64encode(bytes(range(64, 96))).decode()
GROUP_KEY_1 = base64.b64encode(bytes(range(128, 192))).decode()
GROUP_KEY_2 = base64.b64encode(bytes(range(1, 17))).decode()
START = 1_800_000_000.0
MAX_STEPS = 200


def _derived(group_key: str, registration_id: str) -> str:
    mac = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def _token(key: str, registration_id: str, expiry: int) -> bytes:
    sr = quote(f"{SCOPE}/registrations/{registration_id}", safe="")
    mac = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = quote(base64.b64encode(mac).decode(), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn=registration".encode()


def _service(hubs: tuple[str, ...] = HUBS, **config: int) -> DpsService:
    store = Store(":memory:")
    for hub in hubs:
        store.add_hub(hub)
    return DpsService(store, DpsConfig(id_scope=SCOPE, **config))  # type: ignore[arg-type]


def _connect(
    service: DpsService,
    registration_id: str,
    *,
    group: bool,
    disabled: bool = False,
    device_id: str | None = None,
    now: float = START,
) -> DpsIdentity:
    """Enroll the device (individually or through a group) and authenticate its CONNECT."""
    status = "disabled" if disabled else "enabled"
    if group:
        service.store.put_group(
            EnrollmentGroup(
                enrollment_group_id="group-1",
                attestation=SymmetricKeyAttestation(GROUP_KEY_1, GROUP_KEY_2),
                provisioning_status=status,
            )
        )
        key = _derived(GROUP_KEY_2, registration_id)
    else:
        service.store.put_enrollment(
            IndividualEnrollment(
                registration_id=registration_id,
                attestation=SymmetricKeyAttestation(KEY_1, KEY_2),
                device_id=device_id,
                provisioning_status=status,
            )
        )
        key = KEY_1
    username = f"{SCOPE}/registrations/{registration_id}/api-version=2019-03-31"
    token = _token(key, registration_id, int(now) + 3600)
    return service.authenticate(registration_id, username, token, now)


def _pair(
    service: DpsService, identity: DpsIdentity, registration_id: str, start: float = START
) -> tuple[Registration, list[int]]:
    """Run the device against the service until it is done; returns it and the statuses seen."""
    registration = Registration(RegisterRequest(registration_id), rng=random.Random(7))
    now = start
    statuses: list[int] = []
    registration.start(now)
    for _ in range(MAX_STEPS):
        for message in registration.outgoing():
            for reply in service.handle_publish(identity, message.topic, message.payload, now):
                statuses.append(parse_response_topic(reply.topic).status)
                assert registration.receive(reply.topic, reply.payload, now)
        if registration.done:
            return registration, statuses
        deadline = registration.next_deadline()
        assert deadline is not None
        assert deadline >= now
        now = deadline
        registration.on_timer(now)
    raise AssertionError(f"not done after {MAX_STEPS} steps; statuses {statuses}")


def _assert_matches_record(assignment: Assignment, service: DpsService, group: bool) -> None:
    record = service.store.get_registration(assignment.registration_id)
    assert record is not None
    assert record.status == "assigned"
    assert assignment.registration_id.lower() == record.registration_id
    assert assignment.assigned_hub == record.assigned_hub
    assert assignment.device_id == record.device_id
    assert assignment.substatus == record.substatus == "initialAssignment"
    assert assignment.state.etag == record.etag
    assert assignment.state.created == record.created
    assert assignment.state.last_updated == record.last_updated
    assert assignment.state.symmetric_key_group == record.enrollment_group_id
    assert record.enrollment_group_id == ("group-1" if group else None)


@settings(max_examples=60, deadline=None)
@given(
    group=st.booleans(),
    assigning_polls=st.integers(0, 7),
    retry_after=st.integers(0, 3),
    registration_id=st.from_regex(r"[a-z0-9][a-z0-9.:_-]{0,20}[a-z0-9-]", fullmatch=True),
    start=st.integers(1_600_000_000, 2_000_000_000),
)
def test_device_and_emulator_agree(
    group: bool, assigning_polls: int, retry_after: int, registration_id: str, start: int
) -> None:
    service = _service(assigning_polls=assigning_polls, retry_after=retry_after)
    identity = _connect(service, registration_id, group=group, now=start)
    registration, statuses = _pair(service, identity, registration_id, float(start))
    assert 429 not in statuses
    assert statuses == [202] * (assigning_polls + 1) + [200]
    assignment = registration.result()
    assert assignment.assigned_hub in HUBS
    _assert_matches_record(assignment, service, group)


@pytest.mark.parametrize("group", [False, True], ids=["individual", "group"])
@pytest.mark.parametrize("assigning_polls", [0, 5])
@pytest.mark.parametrize("retry_after", [0, 3])
def test_grid(group: bool, assigning_polls: int, retry_after: int) -> None:
    service = _service(assigning_polls=assigning_polls, retry_after=retry_after)
    identity = _connect(service, "dev-1", group=group, device_id="Device-One")
    registration, statuses = _pair(service, identity, "dev-1")
    assert 429 not in statuses
    assignment = registration.result()
    assert assignment.device_id == ("dev-1" if group else "Device-One")
    _assert_matches_record(assignment, service, group)


@pytest.mark.parametrize("group", [False, True], ids=["individual", "group"])
def test_disabled(group: bool) -> None:
    service = _service()
    identity = _connect(service, "dev-1", group=group, disabled=True)
    registration, statuses = _pair(service, identity, "dev-1")
    assert statuses == [200]
    with pytest.raises(RegistrationDisabled):
        registration.result()
    record = service.store.get_registration("dev-1")
    assert record is not None and record.status == "disabled"


@pytest.mark.parametrize("group", [False, True], ids=["individual", "group"])
@pytest.mark.parametrize("assigning_polls", [0, 2])
def test_no_linked_hub(group: bool, assigning_polls: int) -> None:
    service = _service(hubs=(), assigning_polls=assigning_polls, retry_after=1)
    identity = _connect(service, "dev-1", group=group)
    registration, statuses = _pair(service, identity, "dev-1")
    assert statuses == [202] * (assigning_polls + 1) + [200]
    with pytest.raises(RegistrationFailed) as info:
        registration.result()
    assert info.value.error_code == 400208
    assert info.value.error_message
    record = service.store.get_registration("dev-1")
    assert record is not None and (record.status, record.error_code) == ("failed", 400208)


def test_many_devices_interleaved() -> None:
    """Several devices polling at once, with each device's throttle counted separately."""
    service = _service(assigning_polls=6, retry_after=0)
    devices: dict[str, tuple[Registration, DpsIdentity]] = {}
    for index in range(8):
        rid = f"dev-{index}"
        devices[rid] = (
            Registration(RegisterRequest(rid), rng=random.Random(index)),
            _connect(service, rid, group=index % 2 == 0),
        )
    now = START
    statuses: list[int] = []
    for registration, _ in devices.values():
        registration.start(now)
    for _ in range(MAX_STEPS):
        for registration, identity in devices.values():
            for message in registration.outgoing():
                for reply in service.handle_publish(identity, message.topic, message.payload, now):
                    statuses.append(parse_response_topic(reply.topic).status)
                    registration.receive(reply.topic, reply.payload, now)
        pending = [r for r, _ in devices.values() if not r.done]
        if not pending:
            break
        deadlines = [r.next_deadline() for r in pending]
        now = max(now, min(d for d in deadlines if d is not None))
        for registration in pending:
            registration.on_timer(now)
    assert 429 not in statuses
    for rid, (registration, _) in devices.items():
        assert registration.result().registration_id == rid
        _assert_matches_record(registration.result(), service, group=rid[-1] in "0246")
