"""Tests of the sans-IO MQTT 3.1.1 codec: round trips, malformed input, spec bytes, paho interop."""

from __future__ import annotations

import socket
from typing import Any, Callable, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emulator.errors import EmulatorError
from emulator.mqtt_codec import (
    CONNACK_ACCEPTED,
    SUBACK_FAILURE,
    SUPPORTED_PROTOCOLS,
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
    ServerConnection,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    Will,
    encode,
    is_valid_topic_filter,
    topic_matches,
)

# --- strategies ------------------------------------------------------------------------------

_CHARS = st.characters(codec="utf-8", exclude_characters="\x00")
texts = st.text(_CHARS, max_size=12)
topic_names = st.text(
    st.characters(codec="utf-8", exclude_characters="\x00+#"), min_size=1, max_size=16
)
topic_filters = st.text(_CHARS, min_size=1, max_size=16)
packet_ids = st.integers(1, 0xFFFF)
payloads = st.binary(max_size=64)
wills = st.builds(Will, topic_names, payloads, st.integers(0, 2), st.booleans())


@st.composite
def connects(draw: st.DrawFn) -> Connect:
    """CONNECT packets of the protocols decoded in full (MQTT 3.1.1 and 3.1)."""
    name, level = draw(st.sampled_from(sorted(SUPPORTED_PROTOCOLS)))
    username = draw(st.none() | texts)
    password = None if username is None else draw(st.none() | payloads)
    return Connect(
        client_id=draw(texts),
        username=username,
        password=password,
        clean_session=draw(st.booleans()),
        keep_alive=draw(st.integers(0, 0xFFFF)),
        will=draw(st.none() | wills),
        protocol_name=name,
        protocol_level=level,
    )


@st.composite
def publishes(draw: st.DrawFn) -> Publish:
    """PUBLISH at QoS 0 or 1 with consistent packet id and DUP."""
    qos = draw(st.integers(0, 1))
    return Publish(
        topic=draw(topic_names),
        payload=draw(payloads),
        qos=qos,
        packet_id=draw(packet_ids) if qos else None,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,
    )


subscribes = st.builds(
    Subscribe,
    packet_ids,
    st.lists(st.tuples(topic_filters, st.integers(0, 2)), min_size=1, max_size=4).map(tuple),
)
unsubscribes = st.builds(
    Unsubscribe, packet_ids, st.lists(topic_filters, min_size=1, max_size=4).map(tuple)
)
connacks = st.builds(ConnAck, st.booleans(), st.just(CONNACK_ACCEPTED)) | st.builds(
    ConnAck, st.just(False), st.integers(1, 5)
)
subacks = st.builds(
    SubAck,
    packet_ids,
    st.lists(st.sampled_from([0, 1, 2, SUBACK_FAILURE]), min_size=1, max_size=4).map(tuple),
)
# What a client sends after CONNECT (decoded with role="server"), and what a server sends.
after_connect = st.one_of(
    publishes(), st.builds(PubAck, packet_ids), subscribes, unsubscribes, st.just(PingReq())
)
client_packets = st.one_of(connects(), after_connect, st.just(Disconnect()))
server_packets = st.one_of(
    connacks,
    publishes(),
    st.builds(PubAck, packet_ids),
    subacks,
    st.builds(UnsubAck, packet_ids),
    st.just(PingResp()),
)
ROLE_PACKETS: dict[Literal["server", "client"], st.SearchStrategy[Packet]] = {
    "server": client_packets,
    "client": server_packets,
}


def _chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    """``data`` split at the given offsets."""
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in zip(points, points[1:])]


def _varint(n: int) -> bytes:
    """MQTT variable-length integer, written independently of the codec."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _feed_expecting_protocol_error(
    feed: Callable[[bytes], list[Packet]], chunks: list[bytes]
) -> None:
    """Feed every chunk; the only exception allowed is MqttProtocolError."""
    try:
        for chunk in chunks:
            feed(chunk)
    except MqttProtocolError as exc:
        assert exc.reason
        with pytest.raises(MqttProtocolError):
            feed(b"\xc0\x00")  # a failed decoder stays failed


# --- round trips -----------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["server", "client"])
@settings(max_examples=150)
@given(data=st.data())
def test_round_trip_each_packet(role: Literal["server", "client"], data: st.DataObject) -> None:
    packet = data.draw(ROLE_PACKETS[role])
    decoder = PacketDecoder(role)
    assert decoder.feed(encode(packet)) == [packet]
    assert decoder.buffered == 0


@pytest.mark.parametrize("role", ["server", "client"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_round_trip_streams_split_anywhere(
    role: Literal["server", "client"], data: st.DataObject
) -> None:
    packets = data.draw(st.lists(ROLE_PACKETS[role], min_size=1, max_size=6))
    wire = b"".join(encode(p) for p in packets)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    decoder = PacketDecoder(role)
    decoded = [p for chunk in _chunks(wire, cuts) for p in decoder.feed(chunk)]
    assert decoded == packets
    assert decoder.buffered == 0

    byte_by_byte = PacketDecoder(role)
    decoded = [p for i in range(len(wire)) for p in byte_by_byte.feed(wire[i : i + 1])]
    assert decoded == packets


@settings(max_examples=60, deadline=None)
@given(
    connect=connects(),
    rest=st.lists(after_connect, max_size=5),
    disconnect=st.booleans(),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
)
def test_server_connection_round_trip(
    connect: Connect, rest: list[Packet], disconnect: bool, cuts: list[int]
) -> None:
    packets: list[Packet] = [connect, *rest] + ([Disconnect()] if disconnect else [])
    wire = b"".join(encode(p) for p in packets)
    conn = ServerConnection()
    assert not conn.connected
    assert [p for chunk in _chunks(wire, cuts) for p in conn.receive_data(chunk)] == packets
    assert conn.connected


# --- arbitrary input raises only MqttProtocolError --------------------------------------------


@pytest.mark.parametrize("role", ["server", "client"])
@settings(max_examples=200)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=4))
def test_arbitrary_bytes_raise_only_protocol_error(
    role: Literal["server", "client"], data: bytes, cuts: list[int]
) -> None:
    _feed_expecting_protocol_error(PacketDecoder(role).feed, _chunks(data, cuts))


@settings(max_examples=200)
@given(data=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=4))
def test_arbitrary_bytes_to_server_connection_raise_only_protocol_error(
    data: bytes, cuts: list[int]
) -> None:
    _feed_expecting_protocol_error(ServerConnection().receive_data, _chunks(data, cuts))


@pytest.mark.parametrize("role", ["server", "client"])
@settings(max_examples=300)
@given(first=st.integers(0, 255), body=st.binary(max_size=60))
def test_well_framed_random_bodies_raise_only_protocol_error(
    role: Literal["server", "client"], first: int, body: bytes
) -> None:
    wire = bytes([first]) + _varint(len(body)) + body
    _feed_expecting_protocol_error(PacketDecoder(role).feed, [wire])


@pytest.mark.parametrize("role", ["server", "client"])
@settings(max_examples=300)
@given(data=st.data())
def test_mutated_packets_raise_only_protocol_error(
    role: Literal["server", "client"], data: st.DataObject
) -> None:
    wire = bytearray(encode(data.draw(ROLE_PACKETS[role])))
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(wire) - 1))
        action = data.draw(st.sampled_from(["replace", "delete", "insert"]))
        if action == "replace":
            wire[index] = data.draw(st.integers(0, 255))
        elif action == "delete" and len(wire) > 1:
            del wire[index]
        else:
            wire.insert(index, data.draw(st.integers(0, 255)))
    _feed_expecting_protocol_error(PacketDecoder(role).feed, [bytes(wire)])


# --- fixed header ------------------------------------------------------------------------------

# Spec table 2.4: boundary values of the remaining length and their encodings.
_LENGTHS = [
    (0, b"\x00"),
    (127, b"\x7f"),
    (128, b"\x80\x01"),
    (16383, b"\xff\x7f"),
    (16384, b"\x80\x80\x01"),
    (2097151, b"\xff\xff\x7f"),
    (2097152, b"\x80\x80\x80\x01"),
    (268435455, b"\xff\xff\xff\x7f"),
]


@pytest.mark.parametrize(("length", "encoded"), _LENGTHS)
def test_remaining_length_boundaries(length: int, encoded: bytes) -> None:
    assert _varint(length) == encoded
    header = b"\x30" + encoded
    if length > 2097152:  # too big to build: the decoder must simply wait for the body
        decoder = PacketDecoder("server", max_packet_size=length)
        assert decoder.feed(header) == []
        assert decoder.buffered == len(header)
        return
    if length == 0:
        with pytest.raises(MqttProtocolError, match="topic"):
            PacketDecoder().feed(header)
        return
    packet = Publish("t", b"x" * (length - 3))  # topic length (2) + "t" (1) + payload
    wire = encode(packet)
    assert wire.startswith(header)
    assert len(wire) == len(header) + length
    decoder = PacketDecoder("server", max_packet_size=length)
    assert decoder.feed(wire[:-1]) == []
    assert decoder.feed(wire[-1:]) == [packet]
    with pytest.raises(MqttProtocolError, match="exceeds"):
        PacketDecoder("server", max_packet_size=length - 1).feed(wire)


def test_oversized_packet_rejected_from_header_alone() -> None:
    header = b"\x30" + _varint(10 * 1024 * 1024)
    decoder = PacketDecoder("server")
    with pytest.raises(MqttProtocolError, match="exceeds"):
        decoder.feed(header)
    conn = ServerConnection(max_packet_size=1024)
    conn.receive_data(encode(Connect("dev", None, None, True, 60)))
    with pytest.raises(MqttProtocolError, match="exceeds"):
        conn.receive_data(header)


def test_five_byte_remaining_length() -> None:
    decoder = PacketDecoder("server", max_packet_size=1 << 30)
    with pytest.raises(MqttProtocolError, match="four bytes"):
        decoder.feed(b"\x30\xff\xff\xff\xff\x7f")
    with pytest.raises(MqttProtocolError):
        decoder.feed(b"\xc0\x00")


@pytest.mark.parametrize(
    ("role", "wire", "reason"),
    [
        ("server", b"\x00\x00", "reserved packet type 0"),
        ("client", b"\x00\x00", "reserved packet type 0"),
        ("server", b"\xf0\x00", "reserved packet type 15"),
        ("client", b"\xf0\x00", "reserved packet type 15"),
        ("server", b"\x34\x05\x00\x01t\x00\x01", "QoS 2"),
        ("client", b"\x34\x05\x00\x01t\x00\x01", "QoS 2"),
        ("server", b"\x36\x05\x00\x01t\x00\x01", "QoS 3"),
        ("server", b"\x38\x03\x00\x01t", "DUP"),
        ("server", b"\x50\x02\x00\x01", "PUBREC"),
        ("server", b"\x62\x02\x00\x01", "PUBREL"),
        ("client", b"\x62\x02\x00\x01", "PUBREL"),
        ("server", b"\x70\x02\x00\x01", "PUBCOMP"),
        ("server", b"\x20\x02\x00\x00", "may not send CONNACK"),
        ("server", b"\x90\x03\x00\x01\x00", "may not send SUBACK"),
        ("server", b"\xd0\x00", "may not send PINGRESP"),
        ("client", b"\xc0\x00", "may not send PINGREQ"),
        ("client", b"\xe0\x00", "may not send DISCONNECT"),
        ("client", b"\x10\x00", "may not send CONNECT"),
        ("server", b"\x80\x06\x00\x01\x00\x01a\x00", "SUBSCRIBE fixed-header flags"),
        ("server", b"\xa0\x05\x00\x01\x00\x01a", "UNSUBSCRIBE fixed-header flags"),
        ("server", b"\xc1\x00", "PINGREQ fixed-header flags"),
        ("server", b"\x42\x02\x00\x01", "PUBACK fixed-header flags"),
    ],
)
def test_bad_fixed_header(role: Literal["server", "client"], wire: bytes, reason: str) -> None:
    decoder = PacketDecoder(role)
    with pytest.raises(MqttProtocolError, match=reason):
        decoder.feed(wire[:1])  # the first byte alone is enough to refuse
    with pytest.raises(MqttProtocolError, match=reason):
        decoder.feed(b"")


# --- packet bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "wire", "reason"),
    [
        ("server", b"\x82\x02\x00\x01", "SUBSCRIBE without topic filters"),
        ("server", b"\x82\x06\x00\x00\x00\x01a\x00", "packet id is 0"),
        ("server", b"\x82\x06\x00\x01\x00\x01a\x03", "requested QoS"),
        ("server", b"\x82\x06\x00\x01\x00\x01a\x05", "requested QoS"),
        ("server", b"\x82\x05\x00\x01\x00\x00\x00", "empty topic filter"),
        ("server", b"\x82\x05\x00\x01\x00\x01a", "requested QoS runs past"),
        ("server", b"\x82\x06\x00\x01\x00\x05a\x00", "length|runs past"),
        ("server", b"\x82\x06\x00\x01\x00\x01\xff\x00", "UTF-8"),
        ("server", b"\xa2\x02\x00\x01", "UNSUBSCRIBE without topic filters"),
        ("server", b"\xa2\x04\x00\x01\x00\x00", "empty topic filter"),
        ("server", b"\x30\x02\x00\x00", "topic is empty"),
        ("server", b"\x30\x05\x00\x03a/+", "wildcard"),
        ("server", b"\x30\x03\x00\x01#", "wildcard"),
        ("server", b"\x30\x04\x00\x02a\x00", "U\\+0000"),
        ("server", b"\x30\x04\x00\x02\xc3\x28", "UTF-8"),
        ("server", b"\x30\x05\x00\x03\xed\xa0\x80", "UTF-8"),  # an encoded surrogate
        ("server", b"\x32\x05\x00\x01t\x00\x00", "packet id is 0"),
        ("server", b"\x32\x04\x00\x01t\x00", "packet id runs past"),
        ("server", b"\x30\x04\x00\x05tt", "runs past"),
        ("server", b"\x40\x02\x00\x00", "packet id is 0"),
        ("server", b"\x40\x03\x00\x01\x00", "trailing"),
        ("server", b"\xc0\x01\x00", "trailing"),
        ("server", b"\xe0\x01\x00", "trailing"),
        ("client", b"\x20\x02\x02\x00", "reserved acknowledge flags"),
        ("client", b"\x20\x02\x00\x06", "reserved"),
        ("client", b"\x20\x02\x01\x05", "session present"),
        ("client", b"\x20\x01\x00", "runs past"),
        ("client", b"\x90\x02\x00\x01", "SUBACK without return codes"),
        ("client", b"\x90\x03\x00\x01\x03", "invalid SUBACK return codes"),
        ("client", b"\xb0\x02\x00\x00", "packet id is 0"),
        ("client", b"\xd0\x01\x00", "trailing"),
    ],
)
def test_bad_packet_body(role: Literal["server", "client"], wire: bytes, reason: str) -> None:
    with pytest.raises(MqttProtocolError, match=reason):
        PacketDecoder(role).feed(wire)


def test_subscribe_requesting_qos_2_is_decoded() -> None:
    wire = b"\x82\x0a\x00\x07\x00\x01a\x02\x00\x01#\x00"
    assert PacketDecoder().feed(wire) == [Subscribe(7, (("a", 2), ("#", 0)))]


def test_failed_decoder_stays_failed_and_drops_its_buffer() -> None:
    decoder = PacketDecoder("server")
    assert decoder.feed(b"\x30\x10\x00") == []
    assert decoder.buffered == 3
    with pytest.raises(MqttProtocolError, match="reserved packet type 0"):
        decoder.feed(b"\x01" * 15 + b"\x00")
    assert decoder.buffered == 0
    with pytest.raises(MqttProtocolError, match="reserved packet type 0"):
        decoder.feed(encode(PingReq()))


def test_decoder_role_is_checked() -> None:
    with pytest.raises(ValueError, match="role"):
        PacketDecoder("broker")  # type: ignore[arg-type]


# --- CONNECT -----------------------------------------------------------------------------------


def _connect_wire(flags: int, payload: bytes, name: bytes = b"MQTT", level: int = 4) -> bytes:
    """A CONNECT built byte by byte as in spec section 3.1."""
    body = len(name).to_bytes(2, "big") + name + bytes([level, flags]) + b"\x00\x3c" + payload
    return b"\x10" + _varint(len(body)) + body


def _s(text: bytes) -> bytes:
    return len(text).to_bytes(2, "big") + text


def test_connect_built_from_the_spec() -> None:
    # user name, password, will retain, will QoS 1, will flag, clean session
    payload = _s(b"dev-1") + _s(b"w/t") + _s(b"bye") + _s(b"user") + _s(b"pass")
    wire = _connect_wire(0xEE, payload)
    assert wire[:12] == b"\x10\x27\x00\x04MQTT\x04\xee\x00\x3c"
    expected = Connect("dev-1", "user", b"pass", True, 60, Will("w/t", b"bye", 1, True))
    assert PacketDecoder().feed(wire) == [expected]
    assert encode(expected) == wire


def test_mqtt_31_connect_is_decoded() -> None:
    wire = _connect_wire(0x02, _s(b"legacy"), name=b"MQIsdp", level=3)
    expected = Connect("legacy", None, None, True, 60, protocol_name="MQIsdp", protocol_level=3)
    conn = ServerConnection()
    assert conn.receive_data(wire + encode(PingReq())) == [expected, PingReq()]
    assert encode(expected) == wire


@pytest.mark.parametrize(
    ("name", "level"), [(b"MQTT", 5), (b"MQTT", 3), (b"MQIsdp", 4), (b"HTTP", 4)]
)
def test_unsupported_protocol_is_returned_not_raised(name: bytes, level: int) -> None:
    # An MQTT 5 CONNECT: properties (here, none) precede the payload.
    wire = _connect_wire(0x03, b"\x00" + _s(b"dev"), name=name, level=level)
    conn = ServerConnection()
    packets = conn.receive_data(wire + b"\xff\xff garbage after it is ignored")
    assert packets == [Connect("", None, None, True, 60, None, name.decode(), level)]
    assert conn.connected
    assert conn.receive_data(b"\x00\x00") == []


@pytest.mark.parametrize(
    ("flags", "payload", "reason"),
    [
        (0x03, _s(b"c"), "reserved flag"),
        (0x42, _s(b"c") + _s(b"p"), "password flag without user name"),
        (0x1E, _s(b"c") + _s(b"t") + _s(b"m"), "will QoS 3"),
        (0x0A, _s(b"c"), "without the will flag"),
        (0x22, _s(b"c"), "without the will flag"),
        (0x02, _s(b"c") + b"\x00", "trailing"),
        (0x02, b"\x00\x05ab", "client identifier runs past"),
        (0x02, _s(b"a\x00"), "U\\+0000"),
        (0x06, _s(b"c") + _s(b"t/#") + _s(b"m"), "wildcard"),
        (0x06, _s(b"c") + _s(b"") + _s(b"m"), "will topic is empty"),
        (0x06, _s(b"c") + _s(b"t"), "will message length runs past"),
        (0x82, _s(b"c") + _s(b"\xff"), "user name is not valid UTF-8"),
        (0xC2, _s(b"c") + _s(b"u") + b"\x00\x09p", "password runs past"),
    ],
)
def test_bad_connect(flags: int, payload: bytes, reason: str) -> None:
    with pytest.raises(MqttProtocolError, match=reason):
        PacketDecoder().feed(_connect_wire(flags, payload))


def test_truncated_connect_header() -> None:
    with pytest.raises(MqttProtocolError, match="protocol level runs past"):
        PacketDecoder().feed(b"\x10\x06\x00\x04MQTT")


def test_connect_must_come_first_and_only_once() -> None:
    conn = ServerConnection()
    with pytest.raises(MqttProtocolError, match="not CONNECT"):
        conn.receive_data(encode(PingReq()))
    with pytest.raises(MqttProtocolError, match="not CONNECT"):
        conn.receive_data(encode(Connect("dev", None, None, True, 60)))

    conn = ServerConnection()
    connect = encode(Connect("dev", None, None, True, 60))
    assert conn.receive_data(connect) == [Connect("dev", None, None, True, 60)]
    with pytest.raises(MqttProtocolError, match="second CONNECT"):
        conn.receive_data(connect)


def test_bytes_after_disconnect_are_ignored() -> None:
    conn = ServerConnection()
    wire = encode(Connect("", None, None, True, 0)) + encode(Disconnect()) + b"\x00\x00"
    assert conn.receive_data(wire) == [Connect("", None, None, True, 0), Disconnect()]
    assert conn.receive_data(b"more") == []
    assert conn.buffered == 0


def test_server_connection_buffered_and_error_type() -> None:
    conn = ServerConnection()
    wire = encode(Connect("dev", None, None, True, 60))
    assert conn.receive_data(wire[:5]) == []
    assert conn.buffered == 5
    assert not conn.connected
    assert conn.receive_data(wire[5:] + b"\xc0") == [Connect("dev", None, None, True, 60)]
    assert conn.buffered == 1
    with pytest.raises(EmulatorError):  # the emulator's typed error base
        conn.receive_data(b"\x01\x00")  # a PINGREQ with a body


# --- spec byte strings and encoder checks ---------------------------------------------------


@pytest.mark.parametrize(
    ("role", "wire", "packet"),
    [
        ("server", b"\xc0\x00", PingReq()),
        ("client", b"\xd0\x00", PingResp()),
        ("server", b"\xe0\x00", Disconnect()),
        ("client", b"\x20\x02\x00\x00", ConnAck(False, 0)),
        ("client", b"\x20\x02\x01\x00", ConnAck(True, 0)),
        ("client", b"\x20\x02\x00\x05", ConnAck(False, 5)),
        ("server", b"\x40\x02\x00\x01", PubAck(1)),
        ("client", b"\xb0\x02\xff\xff", UnsubAck(0xFFFF)),
        ("client", b"\x90\x05\x00\x0a\x00\x01\x80", SubAck(10, (0, 1, SUBACK_FAILURE))),
        ("server", b"\x31\x07\x00\x03a/bhi", Publish("a/b", b"hi", retain=True)),
        (
            "server",
            b"\x3a\x07\x00\x01t\x00\x2a\x01\x02",
            Publish("t", b"\x01\x02", 1, 42, dup=True),
        ),
        ("server", b"\x82\x08\x00\x01\x00\x03a/+\x01", Subscribe(1, (("a/+", 1),))),
        ("server", b"\xa2\x0a\x00\x02\x00\x01a\x00\x03b/#", Unsubscribe(2, ("a", "b/#"))),
    ],
)
def test_known_byte_strings(role: Literal["server", "client"], wire: bytes, packet: Packet) -> None:
    assert encode(packet) == wire
    assert PacketDecoder(role).feed(wire) == [packet]


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (Publish("", b""), "topic is empty"),
        (Publish("a/+", b""), "wildcard"),
        (Publish("t", b"", qos=2, packet_id=1), "QoS 2 is not supported"),
        (Publish("t", b"", qos=3, packet_id=1), "QoS 3"),
        (Publish("t", b"", qos=1), "without a packet id"),
        (Publish("t", b"", qos=0, packet_id=1), "with a packet id"),
        (Publish("t", b"", qos=1, packet_id=0), "packet id 0"),
        (Publish("t", b"", dup=True), "DUP"),
        (Publish("t" * 65536, b""), "65535"),
        (Publish("\ud800", b""), "UTF-8"),
        (Publish("a\x00", b""), "U\\+0000"),
        (PubAck(0), "packet id 0"),
        (PubAck(65536), "packet id 65536"),
        (Subscribe(1, ()), "without topic filters"),
        (Subscribe(1, (("", 0),)), "empty topic filter"),
        (Subscribe(1, (("a", 3),)), "QoS 3"),
        (Unsubscribe(1, ()), "without topic filters"),
        (SubAck(1, ()), "without return codes"),
        (SubAck(1, (3,)), "invalid SUBACK"),
        (ConnAck(False, 6), "reserved"),
        (ConnAck(True, 1), "session present"),
        (Connect("c", None, b"p", True, 60), "password without user name"),
        (Connect("c", None, None, True, 65536), "keep alive"),
        (Connect("c", None, None, True, 60, Will("t", b"", 3, False)), "will QoS 3"),
        (Connect("c", None, None, True, 60, Will("#", b"", 0, False)), "wildcard"),
        (Connect("c", None, None, True, 60, protocol_level=256), "not a byte"),
        (Connect("c", "u", b"p" * 65536, True, 60), "password is 65536 bytes"),
    ],
)
def test_encode_refuses_invalid_packets(packet: Packet, reason: str) -> None:
    with pytest.raises(MqttProtocolError, match=reason):
        encode(packet)


def test_encode_refuses_non_packets() -> None:
    with pytest.raises(MqttProtocolError, match="not an MQTT packet"):
        encode("PINGREQ")  # type: ignore[arg-type]


# --- topics --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("$dps/registrations/res/#", "$dps/registrations/res/200/?$rid=1", True),
        ("$dps/registrations/res/#", "$dps/registrations/res", True),
        ("$dps/registrations/res/#", "$dps/registrations/PUT/iotdps-register/?$rid=1", False),
        ("devices/+/messages/devicebound/#", "devices/dev-1/messages/devicebound/%24.to=x", True),
        ("devices/+/messages/devicebound/#", "devices/dev-1/messages/devicebound", True),
        ("devices/+/messages/devicebound/#", "devices/a/b/messages/devicebound/x", False),
        ("devices/+/messages/devicebound/#", "devices/dev-1/messages/events/", False),
        ("$iothub/twin/res/#", "$iothub/twin/res/200/?$rid=4", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("#", "a/b/c", True),
        ("#", "/", True),
        ("sport/tennis/+", "sport/tennis/player1", True),
        ("sport/tennis/+", "sport/tennis/player1/ranking", False),
        ("sport/tennis/+", "sport/tennis", False),
        ("sport/+", "sport/", True),
        ("+/+", "/finance", True),
        ("/+", "/finance", True),
        ("+", "/finance", False),
        ("a/b", "a/b", True),
        ("a/b", "a/b/", False),
        ("A/b", "a/b", False),
        ("a/#/b", "a/x/b", False),  # invalid filter
        ("a/b#", "a/b#", False),  # invalid filter
        ("a/+", "a/+", False),  # a topic name may not hold wildcards
    ],
)
def test_topic_matches(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected


@pytest.mark.parametrize(
    ("topic_filter", "expected"),
    [
        ("#", True), ("+", True), ("a/+/b/#", True), ("/", True), ("+/+", True),
        ("", False), ("a#", False), ("a/#/b", False), ("a+/b", False), ("a/\x00", False),
    ],
)  # fmt: skip
def test_is_valid_topic_filter(topic_filter: str, expected: bool) -> None:
    assert is_valid_topic_filter(topic_filter) is expected


@settings(max_examples=100)
@given(topic=topic_names)
def test_topic_matches_itself_and_hash(topic: str) -> None:
    assert topic_matches(topic, topic)
    assert topic_matches("#", topic) is not topic.startswith("$")


# --- interoperability with paho-mqtt (loopback only) -----------------------------------------


def _read_packets(conn: socket.socket, server: ServerConnection, count: int) -> list[Packet]:
    """Receive until ``count`` packets were decoded (bounded reads, socket timeout set)."""
    packets: list[Packet] = []
    for _ in range(20):
        if len(packets) >= count:
            break
        data = conn.recv(65536)
        if not data:
            break
        packets += server.receive_data(data)
    return packets


def _pump(client: Any, condition: Callable[[], bool]) -> None:
    """Run paho's loop a bounded number of times until ``condition`` holds."""
    for _ in range(100):
        if condition():
            return
        client.loop(timeout=0.05)
    raise AssertionError("paho client did not reach the expected state")


@pytest.mark.parametrize("protocol_name", ["MQTTv311", "MQTTv31"])
def test_paho_client_interop(protocol_name: str) -> None:
    mqtt = pytest.importorskip("paho.mqtt.client")
    events: list[tuple[Any, ...]] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id="dev-1",
            clean_session=False,
            protocol=getattr(mqtt, protocol_name),
        )
        client.username_pw_set("hub.example/dev-1/?api-version=2021-04-12", "SharedAccess x")
        client.will_set("devices/dev-1/will", b"gone", qos=1, retain=True)
        client.on_connect = lambda c, u, f, rc, p: events.append(("connect", rc.value))
        client.on_subscribe = lambda c, u, m, rcs, p: events.append(
            ("subscribe", m, [rc.value for rc in rcs])
        )
        client.on_publish = lambda c, u, m, rc, p: events.append(("publish", m))
        client.on_message = lambda c, u, msg: events.append(
            ("message", msg.topic, msg.payload, msg.qos)
        )
        client.connect("127.0.0.1", listener.getsockname()[1], keepalive=30)
        conn, _ = listener.accept()
        try:
            conn.settimeout(5)
            server = ServerConnection()
            [connect] = _read_packets(conn, server, 1)
            assert connect == Connect(
                "dev-1",
                "hub.example/dev-1/?api-version=2021-04-12",
                b"SharedAccess x",
                False,
                30,
                Will("devices/dev-1/will", b"gone", 1, True),
                *(("MQTT", 4) if protocol_name == "MQTTv311" else ("MQIsdp", 3)),
            )
            conn.sendall(encode(ConnAck(False, CONNACK_ACCEPTED)))
            _pump(client, lambda: ("connect", 0) in events)

            _, mid = client.subscribe([("devices/dev-1/messages/devicebound/#", 1), ("$x/#", 2)])
            [subscribe] = _read_packets(conn, server, 1)
            assert subscribe == Subscribe(
                mid, (("devices/dev-1/messages/devicebound/#", 1), ("$x/#", 2))
            )
            conn.sendall(encode(SubAck(mid, (1, SUBACK_FAILURE))))
            _pump(client, lambda: ("subscribe", mid, [1, SUBACK_FAILURE]) in events)

            info = client.publish("devices/dev-1/messages/events/", b"hello", qos=1)
            [publish] = _read_packets(conn, server, 1)
            assert publish == Publish("devices/dev-1/messages/events/", b"hello", 1, info.mid)
            conn.sendall(encode(PubAck(info.mid)))
            _pump(client, lambda: ("publish", info.mid) in events)

            topic = "devices/dev-1/messages/devicebound/%24.mid=1"
            conn.sendall(encode(Publish(topic, b"c2d", 1, 77)) + encode(PingResp()))
            _pump(client, lambda: ("message", topic, b"c2d", 1) in events)
            client.loop(timeout=0.05)  # paho sends the PUBACK after the callback returns
            assert _read_packets(conn, server, 1) == [PubAck(77)]

            client.disconnect()
            assert _read_packets(conn, server, 1) == [Disconnect()]
        finally:
            conn.close()
            sock = client.socket()
            if sock is not None:
                sock.close()


def test_paho_mqtt5_connect_is_returned_for_refusal() -> None:
    mqtt = pytest.importorskip("paho.mqtt.client")
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(5)
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id="dev-5", protocol=mqtt.MQTTv5
        )
        client.connect("127.0.0.1", listener.getsockname()[1], keepalive=45)
        conn, _ = listener.accept()
        try:
            conn.settimeout(5)
            server = ServerConnection()
            [connect] = _read_packets(conn, server, 1)
            assert isinstance(connect, Connect)
            assert (connect.protocol_name, connect.protocol_level) == ("MQTT", 5)
            assert connect.keep_alive == 45
            assert server.connected
        finally:
            conn.close()
            sock = client.socket()
            if sock is not None:
                sock.close()
