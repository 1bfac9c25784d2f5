"""The emulated hub's sans-IO logic: CONNECT checks, subscriptions, publishes, service calls."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dps_proto import derive_device_key
from emulator.dps_service import ConnectRefused, ProtocolViolation
from emulator.hub_service import (
    HubConfig,
    HubIdentity,
    HubService,
    HubServiceError,
    PublishOutcome,
    register_assignment,
)
from emulator.hub_store import HubStore
from emulator.models import (
    EnrollmentGroup,
    IndividualEnrollment,
    SymmetricKeyAttestation,
    TpmAttestation,
)
from emulator.store import Store
from hub_proto.topics import parse_c2d_topic, parse_twin_response_topic

KEY_1 = base64.b64encode(bytes(range(32))).decode()
KEY_2 = base64.b64encode(bytes(range(32, 64))).decode()
OTHER_KEY = base64.b64encode(bytes(range(64, 96))).decode()
HUB = "hub.example"
HUB_2 = "hub2.example"
NOW = 1_800_000_000.0
USERNAME = f"{HUB}/dev-1/?api-version=2021-04-12"


def below(levels: int) -> dict[str, Any]:
    """A twin section with ``levels`` objects nested below it."""
    value: Any = 1
    for _ in range(levels):
        value = {"a": value}
    return {"a": value}


def sas(resource_text: str, key: str, expiry: int) -> bytes:
    """A hub SAS token whose ``sr`` is ``resource_text`` exactly as given (and signed)."""
    mac = hmac.new(base64.b64decode(key), f"{resource_text}\n{expiry}".encode(), hashlib.sha256)
    sig = quote(base64.b64encode(mac.digest()).decode(), safe="")
    return f"SharedAccessSignature sr={resource_text}&sig={sig}&se={expiry}".encode()


def encoded(resource: str) -> str:
    return quote(resource, safe="")


def lower_hex(text: str) -> str:
    return re.sub(r"%[0-9A-F]{2}", lambda m: m.group().lower(), text)


@pytest.fixture
def store() -> Store:
    store = Store()
    store.add_hub(HUB)
    store.add_hub(HUB_2)
    return store


@pytest.fixture
def service(store: Store) -> HubService:
    enrollment = IndividualEnrollment(
        "reg-1",
        SymmetricKeyAttestation(KEY_1, KEY_2),
        initial_twin={"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}},
    )
    register_assignment(
        store,
        hub=HUB,
        device_id="dev-1",
        registration_id="reg-1",
        enrollment=enrollment,
        device_key=KEY_1,
        tpm_hub_key=None,
        now=NOW,
    )
    return HubService(store, HubConfig(telemetry_keep=5))


IDENTITY = HubIdentity(HUB, "dev-1", "2021-04-12")


# -- CONNECT ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sr",
    [
        encoded(f"{HUB}/devices/dev-1"),
        lower_hex(encoded(f"{HUB}/devices/dev-1")),
        f"{HUB}/devices/dev-1",
    ],
    ids=["upper-hex", "lower-hex", "unencoded"],
)
@pytest.mark.parametrize("key", [KEY_1, KEY_2], ids=["primary", "secondary"])
def test_sas_with_any_sr_spelling_and_either_key(service: HubService, sr: str, key: str) -> None:
    identity = service.authenticate("dev-1", USERNAME, sas(sr, key, int(NOW) + 60), NOW)
    assert identity == HubIdentity(HUB, "dev-1", "2021-04-12")


def test_expiry_allows_five_minutes_of_skew(service: HubService) -> None:
    sr = encoded(f"{HUB}/devices/dev-1")
    service.authenticate("dev-1", USERNAME, sas(sr, KEY_1, int(NOW) - 299), NOW)
    with pytest.raises(ConnectRefused) as info:
        service.authenticate("dev-1", USERNAME, sas(sr, KEY_1, int(NOW) - 301), NOW)
    assert info.value.return_code == 5


def _refusal(service: HubService, **overrides: Any) -> int:
    args: dict[str, Any] = {
        "client_id": "dev-1",
        "username": USERNAME,
        "password": sas(encoded(f"{HUB}/devices/dev-1"), KEY_1, int(NOW) + 60),
        "now": NOW,
    }
    args.update(overrides)
    with pytest.raises(ConnectRefused) as info:
        service.authenticate(**args)
    assert "AAEC" not in info.value.reason, "a refusal never names a key"
    return info.value.return_code


def test_connect_refusals(service: HubService, store: Store) -> None:
    good_sr = encoded(f"{HUB}/devices/dev-1")
    assert _refusal(service, password=sas(good_sr, OTHER_KEY, int(NOW) + 60)) == 5
    assert _refusal(service, password=sas(encoded(f"{HUB}/devices/dev-2"), KEY_1, 2**31)) == 5
    assert _refusal(service, password=None) == 5
    assert _refusal(service, password=b"\xff\xfe") == 4
    assert _refusal(service, password=b"SharedAccessSignature nonsense") == 4
    assert _refusal(service, username=None) == 4
    assert _refusal(service, username="not a username") == 4
    assert _refusal(service, username=f"{HUB}/dev-1/mod/?api-version=1") == 5
    assert _refusal(service, username="other.example/dev-1/?api-version=1") == 5
    assert _refusal(service, client_id="dev-2") == 2
    assert _refusal(service, client_id="dev-2", username=f"{HUB}/dev-2/?api-version=1") == 5
    # registered on HUB, not on HUB_2 (both linked)
    assert _refusal(service, username=f"{HUB_2}/dev-1/?api-version=1") == 5
    HubStore.attached(store).set_device_status("dev-1", "disabled")
    assert _refusal(service) == 3


def test_group_and_tpm_identities(store: Store) -> None:
    group = EnrollmentGroup("grp", SymmetricKeyAttestation(KEY_1, KEY_2))
    register_assignment(
        store,
        hub=HUB,
        device_id="member-1",
        registration_id="member-1",
        enrollment=group,
        device_key=derive_device_key(KEY_1, "member-1"),
        tpm_hub_key=None,
        now=NOW,
    )
    tpm = IndividualEnrollment("tpm-1", TpmAttestation(KEY_1))
    register_assignment(
        store,
        hub=HUB,
        device_id="tpm-1",
        registration_id="tpm-1",
        enrollment=tpm,
        device_key=KEY_2,
        tpm_hub_key=OTHER_KEY,
        now=NOW,
    )
    service = HubService(store)
    hub = HubStore.attached(store)
    member = hub.get_device("member-1")
    assert member is not None
    assert member.keys == [
        derive_device_key(KEY_1, "member-1"),
        derive_device_key(KEY_2, "member-1"),
    ]
    device = hub.get_device("tpm-1")
    assert device is not None and device.auth == {"type": "tpm", "keys": [OTHER_KEY]}
    sr = encoded(f"{HUB}/devices/tpm-1")
    username = f"{HUB}/tpm-1/?api-version=2021-04-12"
    service.authenticate("tpm-1", username, sas(sr, OTHER_KEY, int(NOW) + 60), NOW)
    with pytest.raises(ConnectRefused):
        service.authenticate("tpm-1", username, sas(sr, KEY_2, int(NOW) + 60), NOW)
    assert service.device_view(device, False)["authentication"] == {"type": "tpm"}


# -- SUBSCRIBE ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "granted"),
    [
        ("$iothub/twin/res/#", 1),
        ("$iothub/twin/PATCH/properties/desired/#", 1),
        ("$iothub/methods/POST/#", 0),
        ("$iothub/methods/POST/reboot/#", 1),
        ("devices/dev-1/messages/devicebound/#", 1),
        ("devices/+/messages/devicebound/#", 1),
        ("devices/dev-2/messages/devicebound/#", None),
        ("#", None),
        ("$iothub/#", None),
        ("devices/dev-1/messages/events/#", None),
        ("$dps/registrations/res/#", None),
    ],
)
def test_grant(topic_filter: str, granted: int | None) -> None:
    requested = 0 if granted == 0 else 2
    assert HubService.grant(IDENTITY, topic_filter, requested) == granted


# -- device PUBLISH -----------------------------------------------------------------------------


def _twin_answer(outcome: PublishOutcome) -> tuple[int, int | None, bytes]:
    (reply,) = outcome.replies
    topic = parse_twin_response_topic(reply.topic)
    return topic.status, topic.version, reply.payload


def test_twin_get_and_reported_patches(service: HubService) -> None:
    get = service.handle_publish(IDENTITY, "$iothub/twin/GET/?$rid=1", b"", False, NOW)
    status, _, body = _twin_answer(get)
    assert status == 200
    assert json.loads(body) == {"desired": {"rate": 5, "$version": 1}, "reported": {"$version": 1}}

    patch = b'{"fw": "1.0", "nested": {"a": 1, "b": 2}}'
    topic = "$iothub/twin/PATCH/properties/reported/?$rid=2"
    assert _twin_answer(service.handle_publish(IDENTITY, topic, patch, False, NOW))[:2] == (204, 2)
    patch = b'{"nested": {"a": null}, "fw": null}'
    assert _twin_answer(service.handle_publish(IDENTITY, topic, patch, False, NOW))[:2] == (204, 3)

    twin = service.twin_view("dev-1", connected=True)
    assert twin["properties"]["reported"] == {"nested": {"b": 2}, "$version": 3}
    assert twin["tags"] == {"site": "a"} and twin["connectionState"] == "Connected"


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"[1, 2]",
        json.dumps(below(11)).encode(),
        b'{"$version": 4}',
        b'{"bad.key": 1}',
        b'{"bad key": 1}',
        json.dumps({"s": "x" * 4097}).encode(),
        json.dumps({f"k{i}": "x" * 1000 for i in range(40)}).encode(),
        b'{"n": 4503599627370496}',
    ],
    ids=["not-json", "array", "depth-11", "version", "dot", "space", "long-string", "33k", "int"],
)
def test_reported_patch_limits_answer_400(service: HubService, payload: bytes) -> None:
    topic = "$iothub/twin/PATCH/properties/reported/?$rid=9"
    status, version, body = _twin_answer(
        service.handle_publish(IDENTITY, topic, payload, False, NOW)
    )
    assert (status, version) == (400, None)
    assert "message" in json.loads(body)
    twin = service.twin_view("dev-1", connected=True)
    assert twin["properties"]["reported"] == {"$version": 1}


def test_reported_size_counts_the_merged_document(service: HubService) -> None:
    topic = "$iothub/twin/PATCH/properties/reported/?$rid=1"
    half = {f"a{i}": "x" * 1000 for i in range(20)}
    assert (
        _twin_answer(
            service.handle_publish(IDENTITY, topic, json.dumps(half).encode(), False, NOW)
        )[0]
        == 204
    )
    other = {f"b{i}": "x" * 1000 for i in range(20)}
    assert (
        _twin_answer(
            service.handle_publish(IDENTITY, topic, json.dumps(other).encode(), False, NOW)
        )[0]
        == 400
    )
    ok = json.dumps(below(10)).encode()
    assert _twin_answer(service.handle_publish(IDENTITY, topic, ok, False, NOW))[0] == 204


def test_telemetry_is_stored_with_its_properties(service: HubService) -> None:
    topic = "devices/dev-1/messages/events/%24.mid=m-1&%24.ct=application%2Fjson&k%20x=v%26w&flag"
    outcome = service.handle_publish(IDENTITY, topic, b'{"t": 21}', True, NOW)

    assert outcome.telemetry is not None and not outcome.replies
    (stored,) = service.telemetry_since("dev-1", 0, 10)
    assert stored["seq"] == outcome.telemetry.seq
    assert stored["properties"] == {"k x": "v&w", "flag": "", "mqtt-retain": "true"}
    system = stored["systemProperties"]
    assert system["message-id"] == "m-1" and system["content-type"] == "application/json"
    assert system["iothub-connection-device-id"] == "dev-1"
    assert (stored["body"], stored["bodyEncoding"]) == ('{"t": 21}', "utf-8")

    service.handle_publish(IDENTITY, "devices/dev-1/messages/events/", b"\xff\x00", False, NOW)
    last = service.telemetry_since("dev-1", stored["seq"], 10)[0]
    assert (last["body"], last["bodyEncoding"]) == ("/wA=", "base64")


def test_telemetry_keeps_the_configured_number(service: HubService) -> None:
    for i in range(8):
        service.handle_publish(
            IDENTITY, "devices/dev-1/messages/events/", str(i).encode(), False, NOW
        )
    assert [m["body"] for m in service.telemetry_since("dev-1", 0, 100)] == [
        "3",
        "4",
        "5",
        "6",
        "7",
    ]


@pytest.mark.parametrize(
    "topic",
    [
        "devices/dev-2/messages/events/",
        "devices/dev-1/modules/m/messages/events/",
        "devices/dev-1/messages/devicebound/",
        "$iothub/twin/GET/",
        "$iothub/twin/GET/?$rid=",
        "$iothub/methods/res/abc/?$rid=1",
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
        "anything",
    ],
)
def test_bad_publishes_close_the_connection(service: HubService, topic: str) -> None:
    with pytest.raises(ProtocolViolation):
        service.handle_publish(IDENTITY, topic, b"{}", False, NOW)


def test_oversized_telemetry_closes_the_connection(service: HubService, store: Store) -> None:
    service = HubService(store, HubConfig(max_telemetry_bytes=100))
    service.handle_publish(IDENTITY, "devices/dev-1/messages/events/", b"x" * 100, False, NOW)
    with pytest.raises(ProtocolViolation):
        service.handle_publish(IDENTITY, "devices/dev-1/messages/events/a=b", b"x" * 99, False, NOW)


@pytest.mark.parametrize(
    ("payload", "value", "error"),
    [
        (b'{"ok": true}', {"ok": True}, False),
        (b"", None, False),
        (b"42", 42, False),
        (b"{", None, True),
        (b"NaN", None, True),
    ],
)
def test_method_responses(service: HubService, payload: bytes, value: Any, error: bool) -> None:
    outcome = service.handle_publish(
        IDENTITY, "$iothub/methods/res/201/?$rid=7", payload, False, NOW
    )
    response = outcome.method_response
    assert response is not None and (response.rid, response.status) == ("7", 201)
    assert response.payload == value and (response.error is not None) == error


# -- service calls ------------------------------------------------------------------------------


def test_desired_update_bumps_the_version_and_makes_a_notification(service: HubService) -> None:
    body = {"properties": {"desired": {"rate": 10, "$version": 77, "mode": {"x": 1}}}}
    twin, push = service.update_twin("dev-1", body, connected=False)

    assert twin["properties"]["desired"] == {"rate": 10, "mode": {"x": 1}, "$version": 2}
    assert push is not None
    assert push.topic == "$iothub/twin/PATCH/properties/desired/?$version=2"
    assert json.loads(push.payload) == {"rate": 10, "mode": {"x": 1}, "$version": 2}

    twin, push = service.update_twin("dev-1", {"tags": {"site": None, "room": "b"}}, False)
    assert push is None and twin["tags"] == {"room": "b"}
    assert twin["properties"]["desired"]["$version"] == 2

    twin, push = service.update_twin("dev-1", {"properties": {"desired": {"rate": None}}}, False)
    assert push is not None and json.loads(push.payload) == {"rate": None, "$version": 3}
    assert twin["properties"]["desired"] == {"mode": {"x": 1}, "$version": 3}


@pytest.mark.parametrize(
    "body",
    [
        [],
        {"tags": 1},
        {"properties": []},
        {"properties": {"desired": 5}},
        {"properties": {"reported": {"a": 1}}},
        {"properties": {"desired": below(11)}},
        {"tags": below(11)},
        {"tags": {f"k{i}": "x" * 1000 for i in range(9)}},
        {"properties": {"desired": {"a b": 1}}},
    ],
)
def test_bad_twin_updates_are_400(service: HubService, body: Any) -> None:
    with pytest.raises(HubServiceError) as info:
        service.update_twin("dev-1", body, False)
    assert info.value.status == 400
    assert service.twin_view("dev-1", False)["properties"]["desired"]["$version"] == 1


def test_unknown_devices_are_404(service: HubService) -> None:
    for call in (
        lambda: service.twin_view("nobody", False),
        lambda: service.update_twin("nobody", {}, False),
        lambda: service.enqueue_c2d("nobody", {}, NOW),
        lambda: service.telemetry_since("nobody", 0, 10),
    ):
        with pytest.raises(HubServiceError) as info:
            call()
        assert (info.value.status, info.value.error_code) == (404, 404001)


def test_method_invocations(service: HubService) -> None:
    call = service.parse_invocation({"methodName": "reboot"})
    assert (call.name, call.payload, call.timeout) == ("reboot", None, 30.0)
    call = service.parse_invocation(
        {"methodName": "set", "payload": {"a": [1]}, "responseTimeoutInSeconds": 0.1}
    )
    assert call.timeout == 0.1
    request = service.method_request(call, "ab")
    assert request.topic == "$iothub/methods/POST/set/?$rid=ab"
    assert json.loads(request.payload) == {"a": [1]}

    for body in (
        {},
        {"methodName": ""},
        {"methodName": "a/b"},
        {"methodName": "m", "responseTimeoutInSeconds": 0.01},
        {"methodName": "m", "responseTimeoutInSeconds": 301},
        {"methodName": "m", "responseTimeoutInSeconds": True},
        {"methodName": "m", "connectTimeoutInSeconds": "5"},
        "reboot",
    ):
        with pytest.raises(HubServiceError) as info:
            service.parse_invocation(body)
        assert info.value.status == 400
    with pytest.raises(HubServiceError) as info:
        service.parse_invocation({"methodName": "m", "payload": "x" * (128 * 1024)})
    assert info.value.status == 413


def test_c2d_bodies(service: HubService) -> None:
    record = service.enqueue_c2d(
        "dev-1",
        {
            "payload": "héllo",
            "properties": {"k": "v w"},
            "messageId": "m-1",
            "contentType": "text/plain",
        },
        NOW,
    )
    assert record.payload == "héllo".encode()
    reply = service.c2d_reply(record)
    delivered = parse_c2d_topic(reply.topic)
    assert delivered.message.message_id == "m-1" and delivered.message.content_type == "text/plain"
    assert delivered.message.properties == {"k": "v w"}
    assert "%24.to=%2Fdevices%2Fdev-1%2Fmessages%2FdeviceBound" in reply.topic

    assert service.enqueue_c2d("dev-1", {"payload": {"a": 1}}, NOW).payload == b'{"a":1}'
    assert service.enqueue_c2d("dev-1", {"payloadBase64": "/wA="}, NOW).payload == b"\xff\x00"
    generated = service.enqueue_c2d("dev-1", {}, NOW)
    assert generated.payload == b"" and generated.properties["$.mid"]

    for body in (
        [],
        {"payload": "a", "payloadBase64": "AA=="},
        {"payloadBase64": "not base64!"},
        {"properties": {"$.mid": "x"}},
        {"properties": {"k": 1}},
        {"messageId": 5},
    ):
        with pytest.raises(HubServiceError) as info:
            service.enqueue_c2d("dev-1", body, NOW)
        assert info.value.status == 400
    with pytest.raises(HubServiceError) as info:
        service.enqueue_c2d("dev-1", {"payload": "x" * (64 * 1024)}, NOW)
    assert info.value.status == 413


def test_c2d_queue_limit(service: HubService, store: Store) -> None:
    service = HubService(store, HubConfig(max_c2d_pending=3))
    for _ in range(3):
        service.enqueue_c2d("dev-1", {"payload": "m"}, NOW)
    with pytest.raises(HubServiceError) as info:
        service.enqueue_c2d("dev-1", {"payload": "m"}, NOW)
    assert (info.value.status, info.value.error_code) == (403, 403004)


# -- arbitrary input ----------------------------------------------------------------------------

_PREFIXES = st.sampled_from(
    [
        "",
        "devices/dev-1/messages/events/",
        "devices/dev-1/messages/events",
        "devices/dev-1/modules/",
        "devices/",
        "$iothub/twin/GET/",
        "$iothub/twin/GET/?$rid=",
        "$iothub/twin/PATCH/properties/reported/?$rid=",
        "$iothub/twin/",
        "$iothub/methods/res/",
        "$iothub/methods/res/200/?$rid=",
    ]
)
_TOPICS = st.builds(lambda p, s: p + s, _PREFIXES, st.text(max_size=60))
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_PAYLOADS = st.binary(max_size=200) | _JSON.map(lambda v: json.dumps(v).encode())


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(topic=_TOPICS, payload=_PAYLOADS, retain=st.booleans())
def test_arbitrary_publishes_raise_only_protocol_violation(
    service: HubService, topic: str, payload: bytes, retain: bool
) -> None:
    try:
        outcome = service.handle_publish(IDENTITY, topic, payload, retain, NOW)
    except ProtocolViolation:
        return
    assert isinstance(outcome, PublishOutcome)
    get = service.handle_publish(IDENTITY, "$iothub/twin/GET/?$rid=x", b"", False, NOW)
    assert _twin_answer(get)[0] == 200
