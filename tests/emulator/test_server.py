"""The running emulator over real loopback TLS sockets, driven by a raw MQTT client.

The raw client (tests/support/raw_mqtt.py) is an ``ssl`` socket plus the emulator's own codec,
so every byte on the wire is under the test's control. Every
socket has a timeout; "the server closed the connection" is observed as EOF (or a TLS/socket
error) within a bounded time, never as a duration.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable
from urllib.parse import quote

import pytest

from dps_proto import parse_response_topic, poll_topic, register_topic
from emulator.config import EmulatorConfig
from emulator.dps_service import DpsConfig
from emulator.models import EnrollmentGroup, IndividualEnrollment, SymmetricKeyAttestation
from emulator.mqtt_codec import (
    ConnAck,
    Connect,
    Disconnect,
    MqttProtocolError,
    Packet,
    PacketDecoder,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    encode,
)
from emulator.mqtt_server import ServerLimits
from emulator.server import Emulator, EmulatorThread
from tests.conftest import ID_SCOPE
from tests.support.raw_mqtt import (
    IO_TIMEOUT,
    RawClient,
    expect_closed,
    open_plain,
    open_tls,
    publish_header,
    qos2_publish,
    wait_for,
)

KEY_1 = base64.b64encode(bytes(range(32))).decode()
KEY_2 = base64.b64encode(bytes(range(32, 64))).decode()
GROUP_KEY_1 = base64.b64encode(bytes(range(64, 128))).decode()
GROUP_KEY_2 = base64.b64encode(bytes(range(128, 160))).decode()
SUBSCRIPTION = "$dps/registrations/res/#"


# -- raw client (tests/support/raw_mqtt.py) ------------------------------------------------


def sas_token(key: str, registration_id: str, expiry: int, scope: str = ID_SCOPE) -> bytes:
    sr = quote(f"{scope}/registrations/{registration_id}", safe="")
    mac = hmac.new(base64.b64decode(key), f"{sr}\n{expiry}".encode(), hashlib.sha256).digest()
    sig = quote(base64.b64encode(mac).decode(), safe="")
    return f"SharedAccessSignature sr={sr}&sig={sig}&se={expiry}&skn=registration".encode()


def derived(group_key: str, registration_id: str) -> str:
    mac = hmac.new(base64.b64decode(group_key), registration_id.encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def connect_packet(
    registration_id: str, key: str = KEY_1, *, expiry: int | None = None, level: int = 4
) -> Connect:
    expiry = int(time.time()) + 3600 if expiry is None else expiry
    return Connect(
        client_id=registration_id,
        username=f"{ID_SCOPE}/registrations/{registration_id}/api-version=2019-03-31",
        password=sas_token(key, registration_id, expiry),
        clean_session=True,
        keep_alive=60,
        protocol_level=level,
    )


def connect(emulator: Emulator, registration_id: str, key: str = KEY_1, **kw: Any) -> RawClient:
    """Open TLS, send CONNECT and require CONNACK 0."""
    client = open_tls(emulator, kw.pop("max_version", None))
    try:
        client.send(connect_packet(registration_id, key, **kw))
        connack, _ = client.read_until(lambda p: isinstance(p, ConnAck))
        assert connack == ConnAck(False, 0)
    except BaseException:
        client.close()
        raise
    return client


def subscribe(client: RawClient, *filters: tuple[str, int]) -> SubAck:
    packet_id = client.packet_id()
    client.send(Subscribe(packet_id, filters or ((SUBSCRIPTION, 1),)))
    suback, _ = client.read_until(lambda p: isinstance(p, SubAck) and p.packet_id == packet_id)
    assert isinstance(suback, SubAck)
    return suback


def publish(client: RawClient, topic: str, payload: bytes, qos: int = 1) -> None:
    packet_id = client.packet_id() if qos else None
    client.send(Publish(topic, payload, qos, packet_id))


def answer(client: RawClient, rid: str) -> tuple[int, dict[str, Any], int | None]:
    """Read until the response to ``$rid`` arrives: status, JSON body, retry-after."""

    def is_answer(packet: Packet) -> bool:
        return isinstance(packet, Publish) and parse_response_topic(packet.topic).rid == rid

    packet, skipped = client.read_until(is_answer)
    assert not [p for p in skipped if isinstance(p, Publish)], "answers to other requests"
    assert isinstance(packet, Publish)
    topic = parse_response_topic(packet.topic)
    return topic.status, json.loads(packet.payload), topic.retry_after


def quiet(client: RawClient) -> list[Packet]:
    """Round-trip a PINGREQ; returns whatever else arrived before the PINGRESP."""
    client.send(PingReq())
    _, skipped = client.read_until(lambda p: isinstance(p, PingResp))
    return skipped


def register(client: RawClient, registration_id: str, prefix: str = "r") -> dict[str, Any]:
    """A full register/poll exchange over MQTT; returns the final (200) body."""
    publish(
        client,
        register_topic(f"{prefix}0"),
        json.dumps({"registrationId": registration_id}).encode(),
    )
    status, body, retry_after = answer(client, f"{prefix}0")
    assert status == 202, body
    assert retry_after is not None
    operation_id = body["operationId"]
    for index in range(1, 5):
        rid = f"{prefix}{index}"
        publish(client, poll_topic(rid, operation_id), b"")
        status, body, _ = answer(client, rid)
        if status == 200:
            return body
        assert status == 202, body
    raise AssertionError("still assigning after 4 polls")


def enroll(emulator: Emulator, registration_id: str, **changes: Any) -> None:
    emulator.store.put_enrollment(
        IndividualEnrollment(
            registration_id=registration_id,
            attestation=SymmetricKeyAttestation(KEY_1, KEY_2),
            **changes,
        )
    )


def enroll_group(emulator: Emulator, group_id: str = "fleet") -> None:
    emulator.store.put_group(
        EnrollmentGroup(
            enrollment_group_id=group_id,
            attestation=SymmetricKeyAttestation(GROUP_KEY_1, GROUP_KEY_2),
        )
    )


@pytest.fixture
def limited() -> Iterator[Emulator]:
    """An emulator with short connect and packet time-outs, for silent and slow clients."""
    config = EmulatorConfig(
        host="127.0.0.1", mqtt_port=0, api_port=0, id_scope=ID_SCOPE, hubs=("localhost",)
    )
    thread = EmulatorThread(
        config,
        dps_config=DpsConfig(id_scope=ID_SCOPE, retry_after=0),
        limits=ServerLimits(connect_timeout=0.5, packet_timeout=0.5, write_timeout=2.0),
    )
    try:
        yield thread.start()
    finally:
        thread.stop()


# -- happy paths -------------------------------------------------------------------------------


def test_register_and_poll_over_mqtt(emulator: Emulator) -> None:
    enroll(emulator, "dev-1", device_id="Device-One")
    client = connect(emulator, "dev-1")
    try:
        assert subscribe(client, (SUBSCRIPTION, 1)).return_codes == (1,)
        body = register(client, "dev-1")
        state = body["registrationState"]
        assert body["status"] == "assigned"
        assert (state["assignedHub"], state["deviceId"]) == ("localhost", "Device-One")
        record = emulator.store.get_registration("dev-1")
        assert record is not None and record.etag == state["etag"]
        client.send(Disconnect())
        expect_closed(client)
    finally:
        client.close()


def test_qos0_subscription_gets_qos0_answers(emulator: Emulator) -> None:
    enroll(emulator, "dev-1")
    client = connect(emulator, "dev-1")
    try:
        assert subscribe(client, (SUBSCRIPTION, 0)).return_codes == (0,)
        publish(client, register_topic("x"), b'{"registrationId":"dev-1"}', qos=0)
        packet, _ = client.read_until(lambda p: isinstance(p, Publish))
        assert isinstance(packet, Publish) and packet.qos == 0
    finally:
        client.close()


def test_group_device_over_mqtt(emulator: Emulator) -> None:
    enroll_group(emulator)
    client = connect(emulator, "sensor-1", derived(GROUP_KEY_1, "sensor-1"))
    try:
        subscribe(client)
        state = register(client, "sensor-1")["registrationState"]
        assert state["symmetricKey"] == {"enrollmentGroupId": "fleet"}
    finally:
        client.close()


def test_replies_go_only_to_the_asking_connection(emulator: Emulator) -> None:
    enroll(emulator, "dev-a")
    enroll(emulator, "dev-b")
    a = connect(emulator, "dev-a")
    b = connect(emulator, "dev-b")
    try:
        subscribe(a)
        subscribe(b)
        # the same $rid on both connections, and distinct ones
        publish(a, register_topic("1"), b'{"registrationId":"dev-a"}')
        publish(b, register_topic("1"), b'{"registrationId":"dev-b"}')
        publish(a, register_topic("only-a"), b'{"registrationId":"dev-a"}')
        publish(b, register_topic("only-b"), b'{"registrationId":"dev-b"}')
        for client, name in ((a, "dev-a"), (b, "dev-b")):
            for rid in ("1", f"only-{name[-1]}"):
                status, body, _ = answer(client, rid)
                assert status == 202
                assert body["registrationState"]["registrationId"] == name
        assert not [p for p in quiet(a) if isinstance(p, Publish)]
        assert not [p for p in quiet(b) if isinstance(p, Publish)]
    finally:
        a.close()
        b.close()


def test_tls12_only_client(emulator: Emulator) -> None:
    enroll(emulator, "dev-1")
    client = connect(emulator, "dev-1", max_version=ssl.TLSVersion.TLSv1_2)
    try:
        assert client.sock.version() == "TLSv1.2"  # type: ignore[attr-defined]
        subscribe(client)
        assert register(client, "dev-1")["status"] == "assigned"
    finally:
        client.close()


def test_fifty_devices_concurrently(emulator: Emulator) -> None:
    enroll_group(emulator)

    def one(index: int) -> str:
        rid = f"sensor-{index}"
        client = connect(emulator, rid, derived(GROUP_KEY_2, rid))
        try:
            subscribe(client)
            body = register(client, rid)
            assert body["status"] == "assigned"
            return str(body["registrationState"]["deviceId"])
        finally:
            client.close()

    with ThreadPoolExecutor(max_workers=50) as pool:
        device_ids = list(pool.map(one, range(50), timeout=60))
    assert device_ids == [f"sensor-{i}" for i in range(50)]
    records = emulator.store.list_registrations()
    assert len(records) == 50
    assert {r.status for r in records} == {"assigned"}


# -- CONNECT refusals --------------------------------------------------------------------------


def refused_with(emulator: Emulator, packet: Connect | bytes) -> int:
    """Send a CONNECT; require a refusing CONNACK followed by the close; returns its code."""
    client = open_tls(emulator)
    try:
        client.send(packet)
        connack, _ = client.read_until(lambda p: isinstance(p, ConnAck))
        assert isinstance(connack, ConnAck)
        assert not connack.session_present
        expect_closed(client)
        return connack.return_code
    finally:
        client.close()


def test_connect_refusals(emulator: Emulator) -> None:
    enroll(emulator, "dev-1")
    assert refused_with(emulator, connect_packet("dev-1", level=5)) == 1
    assert refused_with(emulator, connect_packet("dev-1", level=3)) == 1
    assert refused_with(emulator, connect_packet("dev-1", GROUP_KEY_1)) == 5
    expired = int(time.time()) - 3600
    assert refused_with(emulator, connect_packet("dev-1", expiry=expired)) == 5
    assert refused_with(emulator, connect_packet("nobody")) == 5
    mismatch = Connect(
        "dev-2", connect_packet("dev-1").username, connect_packet("dev-1").password, True, 60
    )
    assert refused_with(emulator, mismatch) == 2
    garbled = Connect("dev-1", connect_packet("dev-1").username, b"garbage", True, 60)
    assert refused_with(emulator, garbled) == 4
    # a hub-style username is refused (the hub is not emulated)
    hub = Connect("dev-1", "localhost/dev-1/?api-version=2021-04-12", b"x", True, 60)
    assert refused_with(emulator, hub) == 5
    # the device itself still gets in
    connect(emulator, "dev-1").close()


def test_subscription_to_other_topics_refused(emulator: Emulator) -> None:
    enroll(emulator, "dev-1")
    client = connect(emulator, "dev-1")
    try:
        suback = subscribe(
            client,
            ("$dps/registrations/#", 1),
            (SUBSCRIPTION, 2),
            ("devices/dev-1/messages/devicebound/#", 1),
            ("#", 0),
            ("a/b#", 0),
        )
        assert suback.return_codes == (0x80, 1, 0x80, 0x80, 0x80)
        assert register(client, "dev-1")["status"] == "assigned"
    finally:
        client.close()


def test_without_subscription_no_answer(emulator: Emulator) -> None:
    enroll(emulator, "dev-1")
    client = connect(emulator, "dev-1")
    try:
        publish(client, register_topic("1"), b'{"registrationId":"dev-1"}')
        skipped = quiet(client)
        assert [p for p in skipped if isinstance(p, Publish)] == []
        assert PubAck(1) in skipped
    finally:
        client.close()


# -- bad inputs close only the offending connection --------------------------------------------


def bad_oversized_header(emulator: Emulator) -> RawClient:
    client = connect(emulator, "bad-1")
    client.send(publish_header(10 * 1024 * 1024))
    return client


def bad_large_dps_payload(emulator: Emulator) -> RawClient:
    client = connect(emulator, "bad-1")
    subscribe(client)
    body = json.dumps({"registrationId": "bad-1", "payload": {"p": "x" * (97 * 1024)}})
    publish(client, register_topic("1"), body.encode())
    return client


def bad_qos2_publish(emulator: Emulator) -> RawClient:
    client = connect(emulator, "bad-1")
    subscribe(client)
    client.send(qos2_publish(register_topic("1"), b'{"registrationId":"bad-1"}'))
    return client


def bad_packet_type_0(emulator: Emulator) -> RawClient:
    client = connect(emulator, "bad-1")
    client.send(b"\x00\x00")
    return client


def bad_packet_type_15(emulator: Emulator) -> RawClient:
    client = connect(emulator, "bad-1")
    client.send(b"\xf0\x00")
    return client


def bad_publish_before_connect(emulator: Emulator) -> RawClient:
    client = open_tls(emulator)
    client.send(Publish(register_topic("1"), b'{"registrationId":"bad-1"}', 1, 1))
    return client


def bad_garbage_after_tls(emulator: Emulator) -> RawClient:
    client = open_tls(emulator)
    # looks like a CONNECT, but the protocol name's length runs far past the packet
    client.send(b"\x10\x10" + b"\xde\xad\xbe\xef" * 4)
    return client


def bad_garbage_after_connect(emulator: Emulator) -> RawClient:
    client = connect(emulator, "bad-1")
    client.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
    return client


def bad_plaintext_on_tls_port(emulator: Emulator) -> RawClient:
    client = open_plain(emulator)
    client.send(connect_packet("bad-1"))
    return client


def bad_second_connect(emulator: Emulator) -> RawClient:
    client = connect(emulator, "bad-1")
    client.send(connect_packet("bad-1"))
    return client


def bad_unknown_dps_topic(emulator: Emulator) -> RawClient:
    client = connect(emulator, "bad-1")
    subscribe(client)
    publish(client, "devices/bad-1/messages/events/", b"{}")
    return client


def bad_wildcard_in_publish_topic(emulator: Emulator) -> RawClient:
    client = connect(emulator, "bad-1")
    topic = "$dps/registrations/#"
    body = len(topic).to_bytes(2, "big") + topic.encode() + b"{}"
    client.send(publish_header(len(body), flags=0) + body)
    return client


def bad_silent_after_tls(emulator: Emulator) -> RawClient:
    return open_tls(emulator)


def bad_silent_tcp(emulator: Emulator) -> RawClient:
    return open_plain(emulator)


def bad_half_connect(emulator: Emulator) -> RawClient:
    client = open_tls(emulator)
    data = encode(connect_packet("bad-1"))
    client.send(data[: len(data) // 2])
    return client


def bad_half_publish(emulator: Emulator) -> RawClient:
    client = connect(emulator, "bad-1")
    subscribe(client)
    data = encode(Publish(register_topic("1"), b'{"registrationId":"bad-1"}', 1, 9))
    client.send(data[: len(data) // 2])
    return client


FAST_CASES: list[Callable[[Emulator], RawClient]] = [
    bad_oversized_header,
    bad_large_dps_payload,
    bad_qos2_publish,
    bad_packet_type_0,
    bad_packet_type_15,
    bad_publish_before_connect,
    bad_garbage_after_tls,
    bad_garbage_after_connect,
    bad_plaintext_on_tls_port,
    bad_second_connect,
    bad_unknown_dps_topic,
    bad_wildcard_in_publish_topic,
]
SLOW_CASES: list[Callable[[Emulator], RawClient]] = [
    bad_silent_after_tls,
    bad_silent_tcp,
    bad_half_connect,
    bad_half_publish,
]


def _only_the_offender_is_closed(
    emulator: Emulator, offend: Callable[[Emulator], RawClient]
) -> None:
    enroll(emulator, "earlier")
    enroll(emulator, "bystander")
    enroll(emulator, "bad-1")
    first = connect(emulator, "earlier")
    try:
        subscribe(first)
        assert register(first, "earlier")["status"] == "assigned"
    finally:
        first.close()
    bystander = connect(emulator, "bystander")
    try:
        subscribe(bystander)
        offender = offend(emulator)
        try:
            received = expect_closed(offender)
            if isinstance(offender.sock, ssl.SSLSocket):
                assert received == b"", "the offender got an answer before being dropped"
        finally:
            offender.close()
        wait_for(lambda: emulator.connection_count == 1)
        body = register(bystander, "bystander")
        assert body["status"] == "assigned"
        assert not [p for p in quiet(bystander) if isinstance(p, Publish)]
    finally:
        bystander.close()
    records = {r.registration_id: r.status for r in emulator.store.list_registrations()}
    assert records == {"earlier": "assigned", "bystander": "assigned"}


@pytest.mark.parametrize("offend", FAST_CASES, ids=lambda f: f.__name__[4:])
def test_bad_input_closes_only_its_connection(
    emulator: Emulator, offend: Callable[[Emulator], RawClient]
) -> None:
    _only_the_offender_is_closed(emulator, offend)


@pytest.mark.parametrize("offend", SLOW_CASES, ids=lambda f: f.__name__[4:])
def test_silent_and_slow_clients_are_dropped(
    limited: Emulator, offend: Callable[[Emulator], RawClient]
) -> None:
    _only_the_offender_is_closed(limited, offend)


def test_trickling_client_is_dropped(limited: Emulator) -> None:
    """A packet that arrives a few bytes at a time must still complete within packet_timeout."""
    enroll(limited, "bad-1")
    client = connect(limited, "bad-1")
    try:
        data = encode(Publish(register_topic("1"), b"x" * 200, 1, 9))
        deadline = time.monotonic() + IO_TIMEOUT
        closed = False
        for index in range(len(data) - 1):
            if time.monotonic() > deadline:
                break
            try:
                client.send(data[index : index + 1])
            except (ssl.SSLError, ConnectionError, OSError):
                closed = True
                break
            client.sock.settimeout(0.2)
            try:
                if not client.sock.recv(65536):
                    closed = True
                    break
            except (TimeoutError, socket.timeout):
                continue
            except (ssl.SSLError, ConnectionError, OSError):
                closed = True
                break
        assert closed, "a client trickling one packet kept its connection"
    finally:
        client.close()


def test_decoder_sanity() -> None:
    """The raw client's own decoder refuses what a server must not send."""
    with pytest.raises(MqttProtocolError):
        PacketDecoder(role="client").feed(encode(PingReq()))
