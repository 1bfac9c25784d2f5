"""Hub allocation without sockets: the policy functions, the webhook's request and answer, the
custom allocation flow of :class:`DpsService` (the webhook result fed back in), reprovisioning in
the hub store, linked-hub settings in the store; and the linked-hub service API under
hypothesis (bad names and settings are clear 400s that change nothing)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dps_proto import parse_response_topic, poll_topic, register_topic
from emulator.allocation import (
    ERROR_CUSTOM_ALLOCATION_FAILED,
    AllocationCall,
    LinkedHub,
    LinkedHubRegistry,
    WebhookOutcome,
    build_allocation_request,
    call_webhook,
    candidate_hubs,
    choose_geo_latency,
    choose_hashed,
    effective_policy,
    interpret_webhook,
    name_covered,
    parse_hub_settings,
)
from emulator.dps_service import DpsConfig, DpsIdentity, DpsService
from emulator.errors import ValidationError
from emulator.hub_store import HubStore
from emulator.models import EnrollmentGroup, IndividualEnrollment, SymmetricKeyAttestation
from emulator.service_api import ServiceApi
from emulator.service_client import ServiceApiError, ServiceClient
from emulator.store import Store

HUB_A, HUB_B, HUB_C = HUBS = (
    "hub-a.azure-devices.net",
    "hub-b.azure-devices.net",
    "hub-c.azure-devices.net",
)
KEY_1 = base64.b64encode(bytes(range(32))).decode()
KEY_2 = base64.b64encode(bytes(range(100, 132))).decode()
NOW = 1_800_000_000.0
SCOPE = "0ne00000A0A"
WEBHOOK = "https://example.net/api/allocate?code=secret"


def hubs(*specs: tuple[str, int, float | None]) -> list[LinkedHub]:
    return [LinkedHub(name, weight, latency) for name, weight, latency in specs]


def ids(count: int) -> list[str]:
    return [f"device-{n}" for n in range(count)]


# ---------------------------------------------------------------------------- policies


def test_hashed_follows_the_weights() -> None:
    linked = hubs((HUB_A, 1, None), (HUB_B, 2, None), (HUB_C, 5, None))
    counts = Counter(choose_hashed(rid, linked) for rid in ids(8000))
    for hub, share in ((HUB_A, 1 / 8), (HUB_B, 2 / 8), (HUB_C, 5 / 8)):
        assert abs(counts[hub] / 8000 - share) < 0.03, counts


def test_hashed_is_deterministic_and_ignores_order_and_case() -> None:
    linked = hubs((HUB_A, 1, None), (HUB_B, 3, None), (HUB_C, 1, None))
    for rid in ids(50):
        first = choose_hashed(rid, linked)
        assert choose_hashed(rid.upper(), list(reversed(linked))) == first


def test_hashed_with_equal_weights_is_the_plain_modulo() -> None:
    """Assignments made before weights existed do not move."""
    linked = hubs((HUB_C, 1, None), (HUB_A, 1, None), (HUB_B, 1, None))
    for rid in ids(50):
        digest = hashlib.sha256(rid.encode()).digest()
        assert choose_hashed(rid, linked) == sorted(HUBS)[int.from_bytes(digest[:8], "big") % 3]


def test_weight_zero_takes_no_devices() -> None:
    linked = hubs((HUB_A, 0, None), (HUB_B, 1, None))
    assert {choose_hashed(rid, linked) for rid in ids(100)} == {HUB_B}
    assert choose_hashed("x", hubs((HUB_A, 0, None))) is None
    assert choose_hashed("x", []) is None


def test_geo_latency() -> None:
    linked = hubs((HUB_A, 1, 50.0), (HUB_B, 1, 10.0), (HUB_C, 1, None))
    assert {choose_geo_latency(rid, linked) for rid in ids(50)} == {HUB_B}
    tied = hubs((HUB_A, 1, 10.0), (HUB_B, 1, 10.0), (HUB_C, 1, 90.0))
    assert {choose_geo_latency(rid, tied) for rid in ids(100)} == {HUB_A, HUB_B}
    unknown = hubs((HUB_A, 1, None), (HUB_B, 1, None))
    assert {choose_geo_latency(rid, unknown) for rid in ids(100)} == {HUB_A, HUB_B}
    # the lowest latency of a hub that takes no devices does not count
    skipped = hubs((HUB_A, 0, 1.0), (HUB_B, 1, 30.0))
    assert choose_geo_latency("x", skipped) == HUB_B


def enrollment(**changes: Any) -> IndividualEnrollment:
    record = IndividualEnrollment("dev-1", SymmetricKeyAttestation(KEY_1, KEY_2))
    return dataclasses.replace(record, **changes)


def test_effective_policy_and_candidates() -> None:
    assert effective_policy(enrollment()) == "hashed"
    assert effective_policy(enrollment(), "geoLatency") == "geoLatency"
    assert effective_policy(enrollment(iot_hub_host_name=HUB_A)) == "static"
    assert effective_policy(enrollment(iot_hub_host_name=HUB_A, allocation_policy="hashed")) == (
        "hashed"
    )
    linked = hubs((HUB_C, 1, None), (HUB_A, 1, None), (HUB_B, 1, None))
    assert [h.name for h in candidate_hubs(enrollment(), linked)] == list(HUBS)
    subset = enrollment(iot_hubs=[HUB_C, "unlinked.example.net", HUB_A])
    assert [h.name for h in candidate_hubs(subset, linked)] == [HUB_A, HUB_C]


@pytest.mark.parametrize(
    ("name", "covered"),
    [
        ("hub-a.azure-devices.net", True),
        ("HUB-A.azure-devices.net", True),
        ("hub-a.azure-devices.net:8883", True),
        ("x.wild.example", True),
        ("wild.example", False),
        ("a.b.wild.example", False),
        ("hub-b.azure-devices.net", False),
    ],
)
def test_name_covered(name: str, covered: bool) -> None:
    assert name_covered(name, ["localhost", "hub-a.azure-devices.net", "*.wild.example"]) is covered


# ---------------------------------------------------------------------------- webhook


def test_allocation_request_shape() -> None:
    group = EnrollmentGroup(
        "floor-3",
        SymmetricKeyAttestation(KEY_1, KEY_2),
        allocation_policy="custom",
        custom_allocation_definition={"webhookUrl": WEBHOOK, "apiVersion": "2021-10-01"},
    )
    body = build_allocation_request(
        group,
        registration_id="sensor-1",
        linked_hubs=[HUB_A, HUB_B],
        current_hub=HUB_A,
        current_device_id="sensor-1",
        payload={"model": "x"},
    )
    assert body["linkedHubs"] == [HUB_A, HUB_B]
    assert body["deviceRuntimeContext"] == {
        "registrationId": "sensor-1",
        "currentIotHubHostName": HUB_A,
        "currentDeviceId": "sensor-1",
        "symmetricKey": {},
        "payload": {"model": "x"},
    }
    assert body["enrollmentGroup"]["attestation"] == {"type": "symmetricKey"}
    assert KEY_1 not in json.dumps(body) and KEY_2 not in json.dumps(body)
    assert body["enrollmentGroup"]["customAllocationDefinition"]["webhookUrl"] == WEBHOOK
    first = build_allocation_request(
        enrollment(),
        registration_id="dev-1",
        linked_hubs=[],
        current_hub=None,
        current_device_id=None,
        payload=None,
    )
    assert set(first) == {"individualEnrollment", "deviceRuntimeContext", "linkedHubs"}
    assert first["deviceRuntimeContext"] == {"registrationId": "dev-1", "symmetricKey": {}}


def answer(body: Any, status: int = 200) -> WebhookOutcome:
    return WebhookOutcome(status, body if isinstance(body, bytes) else json.dumps(body).encode())


def test_interpret_a_good_answer() -> None:
    twin = {"tags": {"a": 1}, "properties": {"desired": {"b": 2}}}
    decision = interpret_webhook(
        answer({"iotHubHostName": "HUB-B.azure-devices.net", "initialTwin": twin, "payload": [1]}),
        [HUB_A, HUB_B],
    )
    assert (decision.hub, decision.initial_twin, decision.payload) == (HUB_B, twin, [1])
    assert decision.error_code is None


@pytest.mark.parametrize(
    ("outcome", "message"),
    [
        (answer({}, 400), "Custom allocation failed with status code: 400"),
        (answer({"iotHubHostName": HUB_A}, 302), "Custom allocation failed with status code: 302"),
        (
            WebhookOutcome.timed_out(2.5),
            "Custom allocation failed: the webhook did not answer within 2.5 s",
        ),
        (WebhookOutcome(None, b"", "the webhook refused the connection"), "refused"),
        (answer(b"\xff\xfe"), "not JSON"),
        (answer(b'{"iotHubHostName": NaN}'), "not JSON"),
        (answer([HUB_A]), "not a JSON object"),
        (answer({"iotHubHostName": 7}), "no iotHubHostName"),
        (answer({"iotHubHostName": "not a host"}), "not a host name"),
        (answer({"iotHubHostName": HUB_C}), "which is not linked to this enrollment"),
        (answer({"iotHubHostName": HUB_A, "initialTwin": []}), "initialTwin must be"),
        (answer({"iotHubHostName": HUB_A, "payload": json.loads("[" * 70 + "]" * 70)}), "deeper"),
    ],
)
def test_interpret_failures(outcome: WebhookOutcome, message: str) -> None:
    decision = interpret_webhook(outcome, [HUB_A, HUB_B])
    assert decision.hub is None
    assert decision.error_code == ERROR_CUSTOM_ALLOCATION_FAILED == 400207
    assert decision.error_message is not None and message in decision.error_message


@settings(max_examples=200)
@given(st.integers(min_value=100, max_value=599), st.binary(max_size=200))
def test_interpret_never_raises(status: int, body: bytes) -> None:
    decision = interpret_webhook(WebhookOutcome(status, body), [HUB_A])
    assert (decision.hub is None) != (decision.error_code is None)


def test_call_webhook_to_a_closed_port() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    outcome = call_webhook(f"http://127.0.0.1:{port}/x", b"{}", 2.0)
    assert outcome.status is None and outcome.error == "the webhook refused the connection"


# ---------------------------------------------------------------------------- DPS, sans-IO


def custom_service(store: Store | None = None) -> DpsService:
    service = DpsService(store or Store(":memory:"), DpsConfig(id_scope=SCOPE, retry_after=0))
    for hub in HUBS:
        service.store.add_hub(hub)
    return service


def identity(rid: str = "dev-1") -> DpsIdentity:
    return DpsIdentity(rid, SCOPE, "2019-03-31", None, KEY_1)


def register(service: DpsService, who: DpsIdentity, payload: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {"registrationId": who.registration_id}
    if payload is not None:
        body["payload"] = payload
    [reply] = service.handle_publish(who, register_topic("1"), json.dumps(body).encode(), NOW)
    assert parse_response_topic(reply.topic).status == 202
    result: dict[str, Any] = json.loads(reply.payload)
    return result


def poll(service: DpsService, who: DpsIdentity, operation_id: str, now: float) -> tuple[Any, ...]:
    [reply] = service.handle_publish(who, poll_topic("2", operation_id), b"", now)
    topic = parse_response_topic(reply.topic)
    return topic.status, topic.retry_after, json.loads(reply.payload)


def test_custom_allocation_is_fed_back(tmp_path: Path) -> None:
    service = custom_service()
    heard: list[int] = []
    service.allocation_listener = lambda: heard.append(1)
    service.store.put_enrollment(
        enrollment(
            allocation_policy="custom",
            iot_hubs=[HUB_A, HUB_B],
            custom_allocation_definition={"webhookUrl": WEBHOOK},
            initial_twin={"tags": {"from": "enrollment"}},
        )
    )
    who = identity()
    operation_id = register(service, who, payload={"kind": "toaster"})["operationId"]
    assert heard == [1]
    # the webhook has not answered: polls say "assigning", and not more often than every second
    status, retry_after, body = poll(service, who, operation_id, NOW + 1)
    assert (status, body["status"]) == (202, "assigning")
    assert retry_after is not None and retry_after >= 1
    [call] = service.take_allocation_calls()
    assert service.take_allocation_calls() == []
    assert isinstance(call, AllocationCall) and call.operation_id == operation_id
    assert call.url == WEBHOOK and call.linked_hubs == (HUB_A, HUB_B)
    assert call.body["deviceRuntimeContext"]["payload"] == {"kind": "toaster"}

    twin = {"properties": {"desired": {"rate": 3}}}
    reply = answer({"iotHubHostName": HUB_B, "initialTwin": twin, "payload": {"ok": True}})
    assert service.complete_allocation(operation_id, reply, NOW + 2)
    assert not service.complete_allocation(operation_id, reply, NOW + 2), "only once"
    assert not service.complete_allocation("unknown", reply, NOW + 2)
    status, _, body = poll(service, who, operation_id, NOW + 3)
    assert (status, body["status"]) == (200, "assigned")
    state = body["registrationState"]
    assert (state["assignedHub"], state["payload"]) == (HUB_B, {"ok": True})
    stored = HubStore.attached(service.store).get_twin("dev-1")
    assert stored is not None and stored.desired == {"rate": 3} and stored.tags == {}


def test_custom_allocation_failure_is_recorded() -> None:
    service = custom_service()
    service.store.put_enrollment(
        enrollment(allocation_policy="custom", custom_allocation_definition={"webhookUrl": WEBHOOK})
    )
    who = identity()
    operation_id = register(service, who)["operationId"]
    assert service.complete_allocation(operation_id, answer({}, 401), NOW + 1)
    status, _, body = poll(service, who, operation_id, NOW + 2)
    assert (status, body["status"]) == (200, "failed")
    state = body["registrationState"]
    assert state["errorCode"] == 400207
    assert state["errorMessage"] == "Custom allocation failed with status code: 401"
    record = service.store.get_registration("dev-1")
    assert record is not None and (record.status, record.error_code) == ("failed", 400207)


def test_custom_without_definition_fails_at_once() -> None:
    service = custom_service()
    service.store.put_enrollment(enrollment(allocation_policy="custom"))
    who = identity()
    operation_id = register(service, who)["operationId"]
    assert service.take_allocation_calls() == []
    _, _, body = poll(service, who, operation_id, NOW + 1)
    assert body["registrationState"]["errorCode"] == 400207


def provision_to(service: DpsService, hub: str, **changes: Any) -> dict[str, Any]:
    service.store.put_enrollment(enrollment(iot_hub_host_name=hub, **changes))
    who = identity()
    operation_id = register(service, who)["operationId"]
    _, _, body = poll(service, who, operation_id, NOW + 1)
    state: dict[str, Any] = body["registrationState"]
    return state


@pytest.mark.parametrize(
    ("policy", "substatus", "hub", "kept"),
    [
        (None, "deviceDataMigrated", HUB_B, True),
        (
            {"updateHubAssignment": True, "migrateDeviceData": True},
            "deviceDataMigrated",
            HUB_B,
            True,
        ),
        (
            {"updateHubAssignment": True, "migrateDeviceData": False},
            "deviceDataReset",
            HUB_B,
            False,
        ),
        (
            {"updateHubAssignment": False, "migrateDeviceData": True},
            "initialAssignment",
            HUB_A,
            True,
        ),
    ],
)
def test_reprovision_policies(
    policy: dict[str, bool] | None, substatus: str, hub: str, kept: bool
) -> None:
    service = DpsService(Store(":memory:"), DpsConfig(id_scope=SCOPE, polls_per_window=100))
    for linked in HUBS:
        service.store.add_hub(linked)
    moved: list[str] = []
    service.device_moved = moved.append
    twin = {"properties": {"desired": {"v": "initial"}}}
    changes = {"reprovision_policy": policy, "initial_twin": twin}
    assert provision_to(service, HUB_A, **changes)["substatus"] == "initialAssignment"
    devices = HubStore.attached(service.store)
    devices.update_twin(
        "dev-1", lambda t: dataclasses.replace(t, desired={"v": "changed"}, desired_version=2)
    )
    state = provision_to(service, HUB_B, **changes)
    assert (state["assignedHub"], state["substatus"]) == (hub, substatus)
    assert moved == ([] if hub == HUB_A else ["dev-1"])
    device = devices.get_device("dev-1")
    assert device is not None and device.hub == hub
    stored = devices.get_twin("dev-1")
    assert stored is not None
    assert stored.desired == ({"v": "changed"} if kept else {"v": "initial"})
    if hub == HUB_B:
        back = provision_to(service, HUB_A, **changes)
        assert (back["assignedHub"], back["substatus"]) == (
            HUB_A,
            "reprovisionedToInitialAssignment",
        )


# ---------------------------------------------------------------------------- store


def test_linked_hub_settings_persist(tmp_path: Path) -> None:
    path = tmp_path / "emulator.db"
    with Store(path) as store:
        store.add_hub(HUB_A)
        assert store.list_linked_hubs() == [LinkedHub(HUB_A, 1, None)]
        store.put_hub(LinkedHub("HUB-B.azure-devices.net", 7, 12.5))
        store.add_hub(HUB_B)  # linking again keeps the settings
        store.add_registration_hub("Dev-1", HUB_B)
        store.add_registration_hub("dev-1", HUB_B)
    with Store(path) as store:
        assert store.list_linked_hubs() == [LinkedHub(HUB_A, 1, None), LinkedHub(HUB_B, 7, 12.5)]
        assert store.get_hub("Hub-B.azure-devices.net") == LinkedHub(HUB_B, 7, 12.5)
        assert store.registration_hubs("DEV-1") == [HUB_B]
        with pytest.raises(ValidationError):
            store.put_hub(LinkedHub(HUB_A, 1001, None))
        assert store.get_hub(HUB_A) == LinkedHub(HUB_A, 1, None)


def test_old_database_gains_hub_columns(tmp_path: Path) -> None:
    path = tmp_path / "emulator.db"
    with Store(path) as store:
        store.add_hub(HUB_A)
    conn = sqlite3.connect(path)
    conn.executescript(
        "DROP TABLE hubs; CREATE TABLE hubs (name TEXT PRIMARY KEY);"
        f" INSERT INTO hubs (name) VALUES ('{HUB_A}');"
    )
    conn.close()
    with Store(path) as store:
        assert store.list_linked_hubs() == [LinkedHub(HUB_A, 1, None)]
        store.put_hub(LinkedHub(HUB_A, 2, 3.0))
        assert store.get_hub(HUB_A) == LinkedHub(HUB_A, 2, 3.0)


def test_parse_hub_settings() -> None:
    assert parse_hub_settings("Hub-A.azure-devices.net", None) == LinkedHub(HUB_A, 1, None)
    assert parse_hub_settings(HUB_A, {"allocationWeight": 0, "latencyMs": 7}) == LinkedHub(
        HUB_A, 0, 7.0
    )
    for name, body, field in [
        ("-bad-", {}, "hub name"),
        (HUB_A, [], "JSON object"),
        (HUB_A, {"allocationWeight": True}, "allocationWeight"),
        (HUB_A, {"allocationWeight": 1.5}, "allocationWeight"),
        (HUB_A, {"allocationWeight": -1}, "allocationWeight"),
        (HUB_A, {"latencyMs": "5"}, "latencyMs"),
        (HUB_A, {"latencyMs": 1e9}, "latencyMs"),
        (HUB_A, {"weight": 1}, "unknown field 'weight'"),
        (HUB_A, {"name": HUB_B}, "does not match"),
    ]:
        with pytest.raises(ValidationError, match=field):
            parse_hub_settings(name, body)


# ---------------------------------------------------------------------------- hub API


COVERED = ("localhost", *HUBS, "*.wild.example")


@pytest.fixture(scope="module")
def hub_api() -> Iterator[tuple[ServiceClient, Store]]:
    store = Store(":memory:")
    for hub in HUBS:
        store.add_hub(hub)
    api = ServiceApi(store, dict)
    api.add_linked_hub_routes(LinkedHubRegistry(store, COVERED))
    api.start()
    try:
        yield ServiceClient(api.url), store
    finally:
        api.stop()
        store.close()


names = st.one_of(
    st.sampled_from([*HUBS, "HUB-A.azure-devices.net", "x.wild.example", "new.example.net"]),
    st.sampled_from(["-bad-", "a..b", "under_score.net", "x" * 300, "wild.example"]),
    st.text(min_size=1, max_size=40),
)
numbers = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-10, max_value=2000),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e7, max_value=1e7),
    st.text(max_size=5),
    st.lists(st.integers(), max_size=2),
)
bodies = st.one_of(
    st.fixed_dictionaries(
        {}, optional={"allocationWeight": numbers, "latencyMs": numbers, "extra": numbers}
    ),
    st.lists(st.integers(), max_size=2),
    st.integers(),
    st.text(max_size=5),
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(name=names, body=bodies)
def test_hub_api_inputs(hub_api: tuple[ServiceClient, Store], name: str, body: Any) -> None:
    client, store = hub_api
    before = store.list_linked_hubs()
    try:
        stored = client.request("PUT", f"/hubs/{_quote(name)}", body)
    except ServiceApiError as exc:
        event("refused")
        assert exc.status == 400, exc
        assert exc.error_code == 400004 and exc.message
        assert store.list_linked_hubs() == before, "a refused request changes nothing"
        return
    # accepted: everything about it was valid, and exactly that was stored
    event("accepted")
    assert isinstance(body, dict) and "extra" not in body
    weight, latency = body.get("allocationWeight"), body.get("latencyMs")
    assert weight is None or (type(weight) is int and 0 <= weight <= 1000)
    assert latency is None or (type(latency) in (int, float) and 0 <= latency <= 600_000)
    assert name_covered(name, COVERED)
    hub = LinkedHub(stored["name"], stored["allocationWeight"], stored["latencyMs"])
    assert hub.name == name.lower()
    assert hub.allocation_weight == (1 if weight is None else weight)
    assert store.get_hub(hub.name) == hub
    if hub.name not in HUBS:
        client.remove_hub(hub.name)
    else:
        store.put_hub(LinkedHub(hub.name))


def _quote(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


# ---------------------------------------------------------------------------- models


def test_custom_allocation_definition_round_trip() -> None:
    data = {
        "registrationId": "dev-1",
        "attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": KEY_1}},
        "allocationPolicy": "custom",
        "customAllocationDefinition": {"webhookUrl": WEBHOOK, "apiVersion": "2021-10-01"},
    }
    parsed = IndividualEnrollment.from_json(data, now="", generate_key=lambda: KEY_2)
    assert parsed.custom_allocation_definition == data["customAllocationDefinition"]
    assert parsed.to_json()["customAllocationDefinition"] == data["customAllocationDefinition"]
    again = IndividualEnrollment.from_json(parsed.to_json(), now="", generate_key=lambda: KEY_2)
    assert again == parsed


@pytest.mark.parametrize(
    ("definition", "message"),
    [
        ("https://x", "must be a JSON object"),
        ({}, "webhookUrl must be an http"),
        ({"webhookUrl": "ftp://example.net/x"}, "http:// or https://"),
        ({"webhookUrl": "https:///path"}, "with a host"),
        ({"webhookUrl": "https://example.net:99999/"}, "not a usable URL"),
        ({"webhookUrl": "https://exa mple.net/"}, "ASCII characters"),
        ({"webhookUrl": WEBHOOK, "apiVersion": 5}, "apiVersion must be a string"),
        ({"webhookUrl": WEBHOOK, "other": 1}, "unknown field 'other'"),
    ],
)
def test_custom_allocation_definition_is_validated(definition: Any, message: str) -> None:
    data = {
        "enrollmentGroupId": "g",
        "attestation": {"type": "symmetricKey"},
        "customAllocationDefinition": definition,
    }
    with pytest.raises(ValidationError, match=message):
        EnrollmentGroup.from_json(data, now="", generate_key=lambda: KEY_1)
