"""Tests of HubSession twin requests, desired-property re-sync, direct methods and C2D."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub_proto import (
    BackoffPolicy,
    C2DMessage,
    DesiredPatch,
    HubParseError,
    HubRequestError,
    HubStateError,
    HubTimeout,
    Message,
    MethodRequest,
    ReceiveError,
    RequestFailed,
    RetryPolicy,
    TwinResponse,
    TwinSynced,
    c2d_topic,
    desired_patch_topic,
    method_request_topic,
    twin_response_topic,
)

from .harness import Link, make_session

TWIN: dict[str, Any] = {
    "desired": {"mode": "eco", "$version": 5},
    "reported": {"fw": "1.0", "$version": 2},
}


def body(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def rid_of(topic: str) -> str:
    return topic.rsplit("$rid=", 1)[1]


def connected(**kwargs: Any) -> tuple[Any, Link]:
    session = make_session(**kwargs)
    link = Link(session)
    link.connect(0.0)
    return session, link


def synced(**kwargs: Any) -> tuple[Any, Link]:
    session, link = connected(**kwargs)
    (get,) = link.pump(0.0)
    session.receive(twin_response_topic(200, rid_of(get.topic)), body(TWIN), 0.1)
    return session, link


# -- re-sync after connect -------------------------------------------------------------------------


def test_connect_starts_with_a_twin_get() -> None:
    session, link = connected()
    out = link.pump(0.0)
    assert [p.topic for p in out] == ["$iothub/twin/GET/?$rid=1"]
    assert out[0].payload == b"" and out[0].qos == 1
    events = session.receive("$iothub/twin/res/200/?$rid=1", body(TWIN), 0.5)
    assert events == [TwinSynced(TWIN["desired"], TWIN["reported"], 5, 2)]
    assert session.twin.desired == TWIN["desired"] and session.twin.desired_version == 5
    assert not session.twin.syncing


def test_resync_drops_stale_desired_patches_and_applies_newer_ones() -> None:
    session, link = synced()
    # connection lost; desired changes 6 and 7 happen while offline (never delivered)
    session.connection_lost(1.0, "network")
    link.connect(session.next_connect_at() or 2.0)
    (get,) = link.pump(3.0)
    assert get.topic.startswith("$iothub/twin/GET/")
    # notifications racing the GET: 7 (already in the GET answer), 8 and 9 (newer), 6 twice
    for version, value in [(7, "b"), (9, "d"), (6, "a"), (8, "c"), (6, "a")]:
        assert (
            session.receive(
                desired_patch_topic(version), body({"v": value, "$version": version}), 3.1
            )
            == []
        )
    doc = {"desired": {"mode": "eco", "v": "b", "$version": 7}, "reported": {"$version": 2}}
    events = session.receive(twin_response_topic(200, rid_of(get.topic)), body(doc), 3.2)
    assert events == [
        TwinSynced(doc["desired"], doc["reported"], 7, 2),
        DesiredPatch(8, {"v": "c"}),
        DesiredPatch(9, {"v": "d"}),
    ]
    assert session.twin.desired == {"mode": "eco", "v": "d", "$version": 9}
    assert session.twin.stale_dropped == 3
    # after the re-sync, an old or repeated version is dropped too
    assert session.receive(desired_patch_topic(9), body({"v": "x", "$version": 9}), 4.0) == []
    assert session.receive(desired_patch_topic(10), body({"v": None}), 4.0) == [
        DesiredPatch(10, {"v": None})
    ]
    assert "v" not in session.twin.desired


def test_resync_get_failure_releases_held_patches() -> None:
    session, link = connected(retry=RetryPolicy(max_retries=0))
    (get,) = link.pump(0.0)
    session.receive(desired_patch_topic(3), body({"a": 1}), 0.1)
    events = session.receive(twin_response_topic(500, rid_of(get.topic)), b"", 0.2)
    assert isinstance(events[0], DesiredPatch) and events[0].version == 3
    failed = events[1]
    assert isinstance(failed, RequestFailed) and failed.request.internal
    assert isinstance(failed.error, HubRequestError) and failed.error.status == 500
    assert not session.twin.syncing


def test_twin_disabled() -> None:
    session, link = connected(twin=False)
    assert link.pump(0.0) == []
    with pytest.raises(HubStateError):
        session.get_twin(0.0)
    with pytest.raises(HubStateError):
        session.patch_reported({"a": 1}, 0.0)


# -- requests --------------------------------------------------------------------------------------


def test_user_get_twin() -> None:
    session, link = synced()
    request = session.get_twin(1.0)
    (out,) = link.pump(1.0)
    assert out.topic == f"$iothub/twin/GET/?$rid={request.rid}"
    events = session.receive(twin_response_topic(200, request.rid), body(TWIN), 1.5)
    assert events[0] == TwinSynced(TWIN["desired"], TWIN["reported"], 5, 2)
    assert events[1] == TwinResponse(request, 200, None, TWIN)
    assert request.done


def test_patch_reported() -> None:
    session, link = synced()
    request = session.patch_reported({"fw": "2.0", "nested": {"x": None}}, 1.0)
    (out,) = link.pump(1.0)
    assert out.topic == f"$iothub/twin/PATCH/properties/reported/?$rid={request.rid}"
    assert json.loads(out.payload) == {"fw": "2.0", "nested": {"x": None}}
    events = session.receive(twin_response_topic(204, request.rid, 3), b"", 1.2)
    assert events == [TwinResponse(request, 204, 3, None)]
    assert session.twin.reported == {"fw": "2.0", "nested": {}, "$version": 3}


@pytest.mark.parametrize(
    "patch", [{"a.b": 1}, {"$version": 1}, {"x": "y" * 5000}, {"x": float("nan")}, [1]]
)
def test_patch_reported_checks_limits(patch: Any) -> None:
    session, _ = synced()
    with pytest.raises(HubParseError):
        session.patch_reported(patch, 1.0)


def test_unknown_rid_is_ignored() -> None:
    session, _ = synced()
    assert session.receive(twin_response_topic(200, "999"), body(TWIN), 1.0) == []


def test_request_times_out() -> None:
    session, link = synced(request_timeout=10.0)
    request = session.get_twin(1.0)
    link.pump(2.0)
    assert session.next_deadline() == 12.0
    assert session.on_timer(11.9) == []
    (event,) = session.on_timer(12.0)
    assert isinstance(event, RequestFailed) and event.request is request
    assert isinstance(event.error, HubTimeout) and event.error.status == 0
    # a late answer is ignored
    assert session.receive(twin_response_topic(200, request.rid), body(TWIN), 13.0) == []


def test_offline_request_times_out_waiting_for_a_connection() -> None:
    session = make_session(request_timeout=5.0)
    request = session.get_twin(0.0)
    assert session.next_deadline() == 5.0
    (event,) = session.on_timer(5.0)
    assert isinstance(event, RequestFailed) and event.request is request
    assert isinstance(event.error, HubTimeout)


def test_throttled_request_is_retried_with_backoff_then_succeeds() -> None:
    policy = RetryPolicy(max_retries=3, backoff=BackoffPolicy(1.0, 30.0, 0.0))
    session, link = synced(retry=policy)
    request = session.patch_reported({"a": 1}, 1.0)
    link.pump(1.0)
    assert session.receive(twin_response_topic(429, request.rid), b"", 1.1) == []
    assert link.pump(1.5) == []  # waiting out the back-off
    assert session.next_deadline() == pytest.approx(2.1)
    (again,) = link.pump(2.1)
    assert again.topic.endswith(f"$rid={request.rid}")  # the same $rid
    assert session.receive(twin_response_topic(503, request.rid), b"busy", 2.2) == []
    assert link.pump(3.0) == []
    assert len(link.pump(4.2)) == 1  # 2 s back-off
    events = session.receive(twin_response_topic(204, request.rid, 7), b"", 4.3)
    assert events == [TwinResponse(request, 204, 7, None)]
    assert request.attempts == 3 and request.retries == 2


def test_retries_run_out() -> None:
    policy = RetryPolicy(max_retries=2, backoff=BackoffPolicy(0.0, 0.0, 0.0))
    session, link = synced(retry=policy)
    request = session.get_twin(1.0)
    events: list[Any] = []
    for _ in range(3):
        link.pump(1.0)
        events = session.receive(twin_response_topic(429, request.rid), b"throttled", 1.0)
    (event,) = events
    assert isinstance(event, RequestFailed) and isinstance(event.error, HubRequestError)
    assert event.error.status == 429 and "throttled" in str(event.error)


@pytest.mark.parametrize("status", [400, 401, 404, 412])
def test_client_errors_fail_at_once(status: int) -> None:
    session, link = synced()
    request = session.patch_reported({"a": 1}, 1.0)
    link.pump(1.0)
    (event,) = session.receive(twin_response_topic(status, request.rid), b"bad", 1.1)
    assert isinstance(event, RequestFailed) and isinstance(event.error, HubRequestError)
    assert event.error.status == status


def test_unreadable_get_answer_fails_the_request() -> None:
    session, link = synced()
    request = session.get_twin(1.0)
    link.pump(1.0)
    (event,) = session.receive(twin_response_topic(200, request.rid), b"not json", 1.1)
    assert isinstance(event, RequestFailed) and isinstance(event.error, HubParseError)


def test_request_survives_one_disconnect_and_fails_on_the_second() -> None:
    session, link = synced()
    request = session.patch_reported({"a": 1}, 1.0)
    link.pump(1.0)
    assert session.connection_lost(2.0, "network") == []
    link.connect(session.next_connect_at() or 3.0)
    out = link.pump(4.0)
    # the patch again, with its $rid, then the re-sync GET (requests go out oldest first)
    assert [p.topic for p in out] == [
        f"$iothub/twin/PATCH/properties/reported/?$rid={request.rid}",
        "$iothub/twin/GET/?$rid=3",
    ]
    assert request.attempts == 2 and request.carried_over
    events = session.connection_lost(5.0, "network")
    failed = [e for e in events if isinstance(e, RequestFailed) and e.request is request]
    assert len(failed) == 1 and isinstance(failed[0].error, HubRequestError)


def test_close_fails_outstanding_requests() -> None:
    session, _ = synced()
    request = session.get_twin(1.0)
    (event,) = session.close(2.0)
    assert isinstance(event, RequestFailed) and event.request is request
    assert isinstance(event.error, HubStateError)
    with pytest.raises(HubStateError):
        session.get_twin(3.0)


# -- direct methods --------------------------------------------------------------------------------


def test_method_request_and_response() -> None:
    session, _ = synced()
    events = session.receive(method_request_topic("thermo*reboot", "42"), b'{"delay":1}', 1.0)
    assert events == [MethodRequest("thermo*reboot", "42", b'{"delay":1}')]
    call = events[0]
    assert isinstance(call, MethodRequest)
    assert (call.component, call.command) == ("thermo", "reboot")
    publish = session.method_response("42", 200, b'{"ok":true}')
    assert publish.topic == "$iothub/methods/res/200/?$rid=42"
    assert publish.payload == b'{"ok":true}'
    with pytest.raises(HubStateError):  # answered already
        session.method_response("42", 200)
    assert MethodRequest("reboot", "1", b"").component is None


def test_method_response_after_reconnect_is_refused() -> None:
    session, link = synced()
    session.receive(method_request_topic("m", "7"), b"", 1.0)
    session.connection_lost(2.0, "network")
    with pytest.raises(HubStateError):
        session.method_response("7", 200)
    link.connect(session.next_connect_at() or 3.0)
    with pytest.raises(HubStateError):
        session.method_response("7", 200)
    with pytest.raises(HubStateError):
        session.method_response("never-asked", 200)


def test_method_response_control_ack_is_known() -> None:
    session, _ = synced()
    session.receive(method_request_topic("m", "7"), b"", 1.0)
    publish = session.method_response("7", 500, b"")
    session.publish_sent(publish.token, 77)
    assert session.puback(77) == []
    assert session.stats.unknown_acks == 0


# -- cloud-to-device and bad input -----------------------------------------------------------------


def test_c2d_message() -> None:
    session, _ = synced()
    message = Message(b"hello", {"k": "v"}, message_id="m1", correlation_id="c1")
    (event,) = session.receive(c2d_topic("dev1", message), b"hello", 1.0)
    assert event == C2DMessage(message)


@pytest.mark.parametrize(
    ("topic", "payload"),
    [
        ("$iothub/twin/res/200", b""),
        ("unknown/topic", b""),
        ("$iothub/twin/PATCH/properties/desired/?$version=3", b"[1]"),
        ("$iothub/twin/PATCH/properties/desired/?$version=3", b"{"),
        ("$iothub/twin/res/200/?$rid=1", "text"),
    ],
)
def test_bad_input_gives_receive_error(topic: str, payload: Any) -> None:
    session, _ = synced()
    (event,) = session.receive(topic, payload, 1.0)
    assert isinstance(event, ReceiveError) and event.topic == topic
    assert isinstance(event.error, HubParseError)


@settings(max_examples=300, deadline=None)
@given(
    topic=st.one_of(
        st.text(),
        st.builds(
            lambda p, t: p + t,
            st.sampled_from(
                [
                    "$iothub/twin/res/",
                    "$iothub/twin/res/200/?$rid=",
                    "$iothub/twin/PATCH/properties/desired/?$version=",
                    "$iothub/methods/POST/",
                    "devices/dev1/messages/devicebound/",
                ]
            ),
            st.text("0123456789$rid=&%/?ab", max_size=20),
        ),
    ),
    payload=st.one_of(st.binary(max_size=40), st.just(b'{"a":1}'), st.just(b"{}")),
)
def test_receive_never_raises(topic: str, payload: bytes) -> None:
    session, _ = synced()
    for event in session.receive(topic, payload, 1.0):
        assert isinstance(event, (ReceiveError, DesiredPatch, MethodRequest, C2DMessage))
