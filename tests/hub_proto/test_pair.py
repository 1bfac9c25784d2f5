"""A device session against a tiny in-memory hub built from the server-side builders/parsers:
both halves of hub_proto must agree on every topic and payload."""

from __future__ import annotations

import json
from typing import Any

from hub_proto import (
    C2DMessage,
    DesiredPatch,
    Message,
    MethodRequest,
    MethodResponseTopic,
    OutgoingPublish,
    TelemetryTopic,
    TwinRequestTopic,
    TwinResponse,
    TwinSynced,
    apply_patch,
    c2d_topic,
    decode_json_object,
    desired_patch_topic,
    encode_json,
    method_request_topic,
    parse_published_topic,
    parse_username,
    twin_response_topic,
    validate_section,
)

from .harness import HOST, Link, make_session


class MiniHub:
    """Just enough of a hub: twin store with versions, telemetry log, method answers."""

    def __init__(self) -> None:
        self.desired: dict[str, Any] = {"$version": 1}
        self.reported: dict[str, Any] = {"$version": 1}
        self.telemetry: list[Message] = []
        self.method_answers: list[tuple[int, str, bytes]] = []

    def handle(self, publish: OutgoingPublish) -> list[tuple[str, bytes]]:
        parsed = parse_published_topic(publish.topic)
        if isinstance(parsed, TelemetryTopic):
            self.telemetry.append(parsed.message.with_payload(publish.payload))
            return []
        if isinstance(parsed, MethodResponseTopic):
            self.method_answers.append((parsed.status, parsed.rid, publish.payload))
            return []
        assert isinstance(parsed, TwinRequestTopic)
        if parsed.kind == "get":
            doc = {"desired": self.desired, "reported": self.reported}
            return [(twin_response_topic(200, parsed.rid), encode_json(doc))]
        patch = decode_json_object(publish.payload)
        merged = apply_patch(json.loads(json.dumps(self.reported)), patch)
        validate_section(merged)
        self.reported = merged
        self.reported["$version"] += 1
        return [(twin_response_topic(204, parsed.rid, self.reported["$version"]), b"")]

    def set_desired(self, patch: dict[str, Any]) -> tuple[str, bytes]:
        apply_patch(self.desired, patch)
        self.desired["$version"] += 1
        version = self.desired["$version"]
        return desired_patch_topic(version), encode_json({**patch, "$version": version})


def exchange(link: Link, hub: MiniHub, now: float) -> list[Any]:
    events: list[Any] = []
    for publish in link.pump(now):
        for topic, payload in hub.handle(publish):
            events += link.session.receive(topic, payload, now)
    events += link.ack_all()
    return events


def test_device_and_hub_agree() -> None:
    session = make_session(client_type="dps-mqtt/test")
    assert parse_username(session.username).host == HOST
    hub = MiniHub()
    link = Link(session)
    link.connect(0.0)
    hub.set_desired({"interval": 5})  # before the connect's GET: part of the sync
    events = exchange(link, hub, 0.0)
    assert events[0] == TwinSynced({"interval": 5, "$version": 2}, {"$version": 1}, 2, 1)

    request = session.patch_reported({"fw": "1.2", "state": {"ok": True}}, 1.0)
    session.send_message(Message(b"{}", {"alert": "a&b=c"}, message_id="m1"), 1, 1.0)
    events = exchange(link, hub, 1.0)
    assert TwinResponse(request, 204, 2, None) in events
    assert hub.reported == {"fw": "1.2", "state": {"ok": True}, "$version": 2}
    assert session.twin.reported == hub.reported
    assert hub.telemetry == [Message(b"{}", {"alert": "a&b=c"}, message_id="m1")]

    topic, payload = hub.set_desired({"interval": None, "mode": "eco"})
    assert session.receive(topic, payload, 2.0) == [
        DesiredPatch(3, {"interval": None, "mode": "eco"})
    ]
    assert session.twin.desired == hub.desired

    (call,) = session.receive(method_request_topic("reboot", "r&1"), b"{}", 3.0)
    assert isinstance(call, MethodRequest)
    answer = session.method_response(call.rid, 200, b'{"done":true}')
    hub.handle(answer)
    assert hub.method_answers == [(200, "r&1", b'{"done":true}')]

    c2d = Message(b"cmd", {"k": "v"}, message_id="c1")
    assert session.receive(c2d_topic("dev1", c2d), b"cmd", 4.0) == [C2DMessage(c2d)]
