"""Sans-IO MQTT 3.1.1 codec: packet types, an encoder, incremental decoders and topic matching.

It holds no sockets and no clock: the emulator's MQTT server feeds it received bytes and writes
what ``encode`` returns; tests use the same pieces to act as a raw client. QoS 2 is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from .errors import EmulatorError

__all__ = [
    "CONNACK_ACCEPTED", "CONNACK_REFUSED_BAD_USERNAME_PASSWORD",
    "CONNACK_REFUSED_IDENTIFIER_REJECTED", "CONNACK_REFUSED_NOT_AUTHORIZED",
    "CONNACK_REFUSED_PROTOCOL_VERSION", "CONNACK_REFUSED_SERVER_UNAVAILABLE", "SUBACK_FAILURE",
    "SUPPORTED_PROTOCOLS", "ConnAck", "Connect", "Disconnect", "MqttProtocolError", "Packet",
    "PacketDecoder", "PingReq", "PingResp", "PubAck", "Publish", "ServerConnection", "SubAck",
    "Subscribe", "UnsubAck", "Unsubscribe", "Will", "encode", "is_valid_topic_filter",
    "topic_matches",
]  # fmt: skip

CONNACK_ACCEPTED = 0
CONNACK_REFUSED_PROTOCOL_VERSION = 1
CONNACK_REFUSED_IDENTIFIER_REJECTED = 2
CONNACK_REFUSED_SERVER_UNAVAILABLE = 3
CONNACK_REFUSED_BAD_USERNAME_PASSWORD = 4
CONNACK_REFUSED_NOT_AUTHORIZED = 5
SUBACK_FAILURE = 0x80

#: (protocol name, level) pairs whose CONNECT is decoded in full: MQTT 3.1.1 and MQTT 3.1.
SUPPORTED_PROTOCOLS = frozenset({("MQTT", 4), ("MQIsdp", 3)})

_CONNECT, _CONNACK, _PUBLISH, _PUBACK, _PUBREC, _PUBREL, _PUBCOMP = 1, 2, 3, 4, 5, 6, 7
_SUBSCRIBE, _SUBACK, _UNSUBSCRIBE, _UNSUBACK = 8, 9, 10, 11
_PINGREQ, _PINGRESP, _DISCONNECT = 12, 13, 14
_NAMES = {
    _CONNECT: "CONNECT", _CONNACK: "CONNACK", _PUBLISH: "PUBLISH", _PUBACK: "PUBACK",
    _PUBREC: "PUBREC", _PUBREL: "PUBREL", _PUBCOMP: "PUBCOMP", _SUBSCRIBE: "SUBSCRIBE",
    _SUBACK: "SUBACK", _UNSUBSCRIBE: "UNSUBSCRIBE", _UNSUBACK: "UNSUBACK",
    _PINGREQ: "PINGREQ", _PINGRESP: "PINGRESP", _DISCONNECT: "DISCONNECT",
}  # fmt: skip
_ACCEPTED_BY_ROLE = {
    "server": frozenset({_CONNECT, _PUBLISH, _PUBACK, _SUBSCRIBE, _UNSUBSCRIBE, _PINGREQ,
                         _DISCONNECT}),
    "client": frozenset({_CONNACK, _PUBLISH, _PUBACK, _SUBACK, _UNSUBACK, _PINGRESP}),
}  # fmt: skip
_MAX_REMAINING_LENGTH = 268_435_455  # the largest value four length bytes can carry
_MAX_U16 = 0xFFFF
_SUBACK_CODES = frozenset({0, 1, 2, SUBACK_FAILURE})


class MqttProtocolError(EmulatorError):
    """A peer broke MQTT 3.1.1; the connection must be closed.

    Also raised by ``encode`` for a packet that would break the protocol on the wire.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Will:
    """Last-will message carried in CONNECT."""

    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass(frozen=True)
class Connect:
    """CONNECT; for an unsupported protocol only name, level, clean_session, keep_alive are set."""

    client_id: str
    username: str | None
    password: bytes | None
    clean_session: bool
    keep_alive: int
    will: Will | None = None
    protocol_name: str = "MQTT"
    protocol_level: int = 4


@dataclass(frozen=True)
class ConnAck:
    """CONNACK: the server's answer to CONNECT."""

    session_present: bool
    return_code: int


@dataclass(frozen=True)
class Publish:
    """PUBLISH at QoS 0 (no packet id) or QoS 1 (packet id required)."""

    topic: str
    payload: bytes
    qos: int = 0
    packet_id: int | None = None
    retain: bool = False
    dup: bool = False


@dataclass(frozen=True)
class PubAck:
    """PUBACK: acknowledges a QoS 1 PUBLISH."""

    packet_id: int


@dataclass(frozen=True)
class Subscribe:
    """SUBSCRIBE: (topic filter, requested QoS) pairs."""

    packet_id: int
    topics: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class SubAck:
    """SUBACK: one granted QoS (or ``SUBACK_FAILURE``) per requested filter."""

    packet_id: int
    return_codes: tuple[int, ...]


@dataclass(frozen=True)
class Unsubscribe:
    """UNSUBSCRIBE: topic filters to drop."""

    packet_id: int
    topics: tuple[str, ...]


@dataclass(frozen=True)
class UnsubAck:
    """UNSUBACK: acknowledges UNSUBSCRIBE."""

    packet_id: int


@dataclass(frozen=True)
class PingReq:
    """PINGREQ: client keep-alive probe."""


@dataclass(frozen=True)
class PingResp:
    """PINGRESP: server answer to PINGREQ."""


@dataclass(frozen=True)
class Disconnect:
    """DISCONNECT: clean client shutdown (the will is discarded)."""


Packet = Union[
    Connect, ConnAck, Publish, PubAck, Subscribe, SubAck, Unsubscribe, UnsubAck,
    PingReq, PingResp, Disconnect,
]  # fmt: skip


# --- encoding --------------------------------------------------------------------------------


def _encode_length(length: int) -> bytes:
    """Remaining length as the MQTT variable-length integer (1 to 4 bytes)."""
    if not 0 <= length <= _MAX_REMAINING_LENGTH:
        raise MqttProtocolError(f"remaining length {length} does not fit in four bytes")
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)


def _u16(value: int, what: str, minimum: int = 0) -> bytes:
    if not minimum <= value <= _MAX_U16:
        raise MqttProtocolError(f"{what} {value} is outside {minimum}..{_MAX_U16}")
    return value.to_bytes(2, "big")


def _binary(data: bytes, what: str) -> bytes:
    if len(data) > _MAX_U16:
        raise MqttProtocolError(f"{what} is {len(data)} bytes; at most {_MAX_U16} fit")
    return len(data).to_bytes(2, "big") + bytes(data)


def _string(text: str, what: str) -> bytes:
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MqttProtocolError(f"{what} is not encodable as UTF-8: {exc.reason}") from None
    if "\x00" in text:
        raise MqttProtocolError(f"{what} contains U+0000")
    return _binary(raw, what)


def _check_topic_name(topic: str, what: str) -> str:
    """A topic name (not filter): non-empty and free of wildcards."""
    if not topic:
        raise MqttProtocolError(f"{what} is empty")
    if "+" in topic or "#" in topic:
        raise MqttProtocolError(f"{what} {topic!r} contains a wildcard")
    return topic


def _check_qos(qos: int, what: str, maximum: int) -> None:
    if qos == 2 and maximum < 2:
        raise MqttProtocolError(f"{what} QoS 2 is not supported")
    if not 0 <= qos <= maximum:
        raise MqttProtocolError(f"{what} QoS {qos} is invalid")


def _fixed(ptype: int, flags: int, body: bytes) -> bytes:
    return bytes([ptype << 4 | flags]) + _encode_length(len(body)) + body


def _encode_connect(p: Connect) -> bytes:
    flags = 0x02 if p.clean_session else 0
    payload = _string(p.client_id, "client identifier")
    if p.will is not None:
        _check_qos(p.will.qos, "will", 2)
        flags |= 0x04 | p.will.qos << 3 | (0x20 if p.will.retain else 0)
        payload += _string(_check_topic_name(p.will.topic, "will topic"), "will topic")
        payload += _binary(p.will.payload, "will message")
    if p.username is not None:
        flags |= 0x80
        payload += _string(p.username, "user name")
    if p.password is not None:
        if p.username is None:
            raise MqttProtocolError("password without user name")
        flags |= 0x40
        payload += _binary(p.password, "password")
    if not 0 <= p.protocol_level <= 0xFF:
        raise MqttProtocolError(f"protocol level {p.protocol_level} is not a byte")
    header = _string(p.protocol_name, "protocol name") + bytes([p.protocol_level, flags])
    return _fixed(_CONNECT, 0, header + _u16(p.keep_alive, "keep alive") + payload)


def _encode_publish(p: Publish) -> bytes:
    _check_qos(p.qos, "PUBLISH", 1)
    if p.dup and p.qos == 0:
        raise MqttProtocolError("DUP set on a QoS 0 PUBLISH")
    body = _string(_check_topic_name(p.topic, "topic"), "topic")
    if p.qos == 1:
        if p.packet_id is None:
            raise MqttProtocolError("QoS 1 PUBLISH without a packet id")
        body += _u16(p.packet_id, "packet id", 1)
    elif p.packet_id is not None:
        raise MqttProtocolError("QoS 0 PUBLISH with a packet id")
    flags = (0x08 if p.dup else 0) | p.qos << 1 | (0x01 if p.retain else 0)
    return _fixed(_PUBLISH, flags, body + bytes(p.payload))


def _encode_subscribe(p: Subscribe) -> bytes:
    if not p.topics:
        raise MqttProtocolError("SUBSCRIBE without topic filters")
    body = _u16(p.packet_id, "packet id", 1)
    for topic_filter, qos in p.topics:
        if not topic_filter:
            raise MqttProtocolError("empty topic filter")
        _check_qos(qos, "requested", 2)
        body += _string(topic_filter, "topic filter") + bytes([qos])
    return _fixed(_SUBSCRIBE, 0x02, body)


def _encode_unsubscribe(p: Unsubscribe) -> bytes:
    if not p.topics:
        raise MqttProtocolError("UNSUBSCRIBE without topic filters")
    body = _u16(p.packet_id, "packet id", 1)
    for topic_filter in p.topics:
        if not topic_filter:
            raise MqttProtocolError("empty topic filter")
        body += _string(topic_filter, "topic filter")
    return _fixed(_UNSUBSCRIBE, 0x02, body)


def _encode_connack(p: ConnAck) -> bytes:
    if not CONNACK_ACCEPTED <= p.return_code <= CONNACK_REFUSED_NOT_AUTHORIZED:
        raise MqttProtocolError(f"CONNACK return code {p.return_code} is reserved")
    if p.session_present and p.return_code != CONNACK_ACCEPTED:
        raise MqttProtocolError("session present on a refused CONNACK")
    return _fixed(_CONNACK, 0, bytes([int(p.session_present), p.return_code]))


def _encode_suback(p: SubAck) -> bytes:
    if not p.return_codes:
        raise MqttProtocolError("SUBACK without return codes")
    if any(code not in _SUBACK_CODES for code in p.return_codes):
        raise MqttProtocolError(f"invalid SUBACK return codes {p.return_codes}")
    return _fixed(_SUBACK, 0, _u16(p.packet_id, "packet id", 1) + bytes(p.return_codes))


def encode(packet: Packet) -> bytes:
    """Wire bytes of ``packet``; raises ``MqttProtocolError`` if it would break MQTT 3.1.1."""
    if isinstance(packet, Connect):
        return _encode_connect(packet)
    if isinstance(packet, Publish):
        return _encode_publish(packet)
    if isinstance(packet, Subscribe):
        return _encode_subscribe(packet)
    if isinstance(packet, Unsubscribe):
        return _encode_unsubscribe(packet)
    if isinstance(packet, ConnAck):
        return _encode_connack(packet)
    if isinstance(packet, SubAck):
        return _encode_suback(packet)
    if isinstance(packet, PubAck):
        return _fixed(_PUBACK, 0, _u16(packet.packet_id, "packet id", 1))
    if isinstance(packet, UnsubAck):
        return _fixed(_UNSUBACK, 0, _u16(packet.packet_id, "packet id", 1))
    if isinstance(packet, PingReq):
        return b"\xc0\x00"
    if isinstance(packet, PingResp):
        return b"\xd0\x00"
    if isinstance(packet, Disconnect):
        return b"\xe0\x00"
    raise MqttProtocolError(f"not an MQTT packet: {type(packet).__name__}")


# --- decoding --------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked cursor over one packet body; every overrun is a protocol error."""

    def __init__(self, data: bytes, packet: str) -> None:
        self._data = data
        self._pos = 0
        self._packet = packet

    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, count: int, what: str) -> bytes:
        if count > self.remaining():
            raise MqttProtocolError(f"{self._packet} {what} runs past the end of the packet")
        chunk = self._data[self._pos : self._pos + count]
        self._pos += count
        return chunk

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def packet_id(self) -> int:
        packet_id = self.u16("packet id")
        if packet_id == 0:
            raise MqttProtocolError(f"{self._packet} packet id is 0")
        return packet_id

    def binary(self, what: str) -> bytes:
        return self.take(self.u16(f"{what} length"), what)

    def string(self, what: str) -> str:
        try:
            text = self.binary(what).decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"{self._packet} {what} is not valid UTF-8: {exc.reason}"
            raise MqttProtocolError(reason) from None
        if "\x00" in text:
            raise MqttProtocolError(f"{self._packet} {what} contains U+0000")
        return text

    def rest(self) -> bytes:
        return self.take(self.remaining(), "payload")

    def end(self) -> None:
        if self.remaining():
            raise MqttProtocolError(f"{self._packet} has {self.remaining()} trailing bytes")


def _check_first_byte(byte: int, role: str) -> None:
    """Reject a packet type or fixed-header flags as soon as the first byte arrives."""
    ptype, flags = byte >> 4, byte & 0x0F
    name = _NAMES.get(ptype)
    if name is None:
        raise MqttProtocolError(f"reserved packet type {ptype}")
    if ptype in (_PUBREC, _PUBREL, _PUBCOMP):
        raise MqttProtocolError(f"{name} (QoS 2 flow) is not supported")
    if ptype not in _ACCEPTED_BY_ROLE[role]:
        peer = "client" if role == "server" else "server"
        raise MqttProtocolError(f"a {peer} may not send {name}")
    if ptype == _PUBLISH:
        qos = flags >> 1 & 0x03
        if qos == 3:
            raise MqttProtocolError("PUBLISH with QoS 3")
        if qos == 2:
            raise MqttProtocolError("PUBLISH QoS 2 is not supported")
        if flags & 0x08 and qos == 0:
            raise MqttProtocolError("DUP set on a QoS 0 PUBLISH")
    elif ptype in (_SUBSCRIBE, _UNSUBSCRIBE):
        if flags != 0x02:
            raise MqttProtocolError(f"{name} fixed-header flags are {flags:#x}, not 0x2")
    elif flags:
        raise MqttProtocolError(f"{name} fixed-header flags are {flags:#x}, not 0")


def _decode_connect(r: _Reader) -> Connect:
    name = r.string("protocol name")
    level = r.u8("protocol level")
    flags = r.u8("connect flags")
    keep_alive = r.u16("keep alive")
    clean_session = bool(flags & 0x02)
    if (name, level) not in SUPPORTED_PROTOCOLS:
        # The rest is laid out by a protocol we do not speak; the server refuses with code 1.
        return Connect("", None, None, clean_session, keep_alive, None, name, level)
    if flags & 0x01:
        raise MqttProtocolError("CONNECT reserved flag is set")
    will_qos = flags >> 3 & 0x03
    if will_qos == 3:
        raise MqttProtocolError("CONNECT will QoS 3")
    if not flags & 0x04 and flags & 0x38:
        raise MqttProtocolError("CONNECT will QoS or retain set without the will flag")
    if flags & 0x40 and not flags & 0x80:
        raise MqttProtocolError("CONNECT password flag without user name flag")
    client_id = r.string("client identifier")
    will = None
    if flags & 0x04:
        topic = _check_topic_name(r.string("will topic"), "will topic")
        will = Will(topic, r.binary("will message"), will_qos, bool(flags & 0x20))
    username = r.string("user name") if flags & 0x80 else None
    password = r.binary("password") if flags & 0x40 else None
    r.end()
    return Connect(client_id, username, password, clean_session, keep_alive, will, name, level)


def _decode_body(ptype: int, flags: int, body: bytes) -> Packet:
    """One packet from its type, fixed-header flags (already checked) and body."""
    r = _Reader(body, _NAMES[ptype])
    packet: Packet
    if ptype == _CONNECT:
        return _decode_connect(r)
    if ptype == _PUBLISH:
        topic = _check_topic_name(r.string("topic"), "PUBLISH topic")
        qos = flags >> 1 & 0x03
        packet_id = r.packet_id() if qos else None
        return Publish(topic, r.rest(), qos, packet_id, bool(flags & 0x01), bool(flags & 0x08))
    if ptype == _SUBSCRIBE:
        packet_id = r.packet_id()
        if not r.remaining():
            raise MqttProtocolError("SUBSCRIBE without topic filters")
        topics: list[tuple[str, int]] = []
        while r.remaining():
            topic_filter = r.string("topic filter")
            options = r.u8("requested QoS")
            if not topic_filter:
                raise MqttProtocolError("SUBSCRIBE with an empty topic filter")
            if options > 2:  # reserved bits set, or QoS 3
                raise MqttProtocolError(f"SUBSCRIBE requested QoS byte {options:#x} is invalid")
            topics.append((topic_filter, options))
        return Subscribe(packet_id, tuple(topics))
    if ptype == _UNSUBSCRIBE:
        packet_id = r.packet_id()
        if not r.remaining():
            raise MqttProtocolError("UNSUBSCRIBE without topic filters")
        filters: list[str] = []
        while r.remaining():
            topic_filter = r.string("topic filter")
            if not topic_filter:
                raise MqttProtocolError("UNSUBSCRIBE with an empty topic filter")
            filters.append(topic_filter)
        return Unsubscribe(packet_id, tuple(filters))
    if ptype == _CONNACK:
        ack_flags, return_code = r.u8("acknowledge flags"), r.u8("return code")
        if ack_flags & 0xFE:
            raise MqttProtocolError("CONNACK reserved acknowledge flags are set")
        packet = ConnAck(bool(ack_flags), return_code)
        _encode_connack(packet)  # same rules as for sending
    elif ptype == _SUBACK:
        packet_id = r.packet_id()
        packet = SubAck(packet_id, tuple(r.rest()))
        _encode_suback(packet)
    elif ptype == _PUBACK:
        packet = PubAck(r.packet_id())
    elif ptype == _UNSUBACK:
        packet = UnsubAck(r.packet_id())
    elif ptype == _PINGREQ:
        packet = PingReq()
    elif ptype == _PINGRESP:
        packet = PingResp()
    else:
        packet = Disconnect()
    r.end()
    return packet


class PacketDecoder:
    """Incremental decoder: feed bytes, get whole packets.

    role='server' decodes what a client may send (CONNECT, PUBLISH, PUBACK, SUBSCRIBE,
    UNSUBSCRIBE, PINGREQ, DISCONNECT); role='client' decodes what a server may send (CONNACK,
    PUBLISH, PUBACK, SUBACK, UNSUBACK, PINGRESP). After an error the decoder stays failed.
    """

    def __init__(
        self, role: Literal["server", "client"] = "server", max_packet_size: int = 128 * 1024
    ) -> None:
        if role not in _ACCEPTED_BY_ROLE:
            raise ValueError(f"role must be 'server' or 'client', not {role!r}")
        self._role = role
        self._max_packet_size = max_packet_size
        self._buffer = bytearray()
        self._failed: MqttProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but waiting for the rest of their packet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Packet]:
        """Append ``data`` and return every packet it completes; raises ``MqttProtocolError``."""
        self._extend(data)
        packets: list[Packet] = []
        while (packet := self._next()) is not None:
            packets.append(packet)
        return packets

    def _extend(self, data: bytes) -> None:
        if self._failed is not None:
            raise MqttProtocolError(self._failed.reason)
        self._buffer += data

    def _next(self) -> Packet | None:
        """The next whole packet in the buffer, or None until more bytes arrive."""
        if self._failed is not None:
            raise MqttProtocolError(self._failed.reason)
        try:
            return self._decode_next()
        except MqttProtocolError as exc:
            self._failed = exc
            self._buffer.clear()
            raise

    def _decode_next(self) -> Packet | None:
        buffer = self._buffer
        if not buffer:
            return None
        first = buffer[0]
        _check_first_byte(first, self._role)
        length = 0
        for index in range(1, 5):
            if index >= len(buffer):
                return None
            byte = buffer[index]
            length |= (byte & 0x7F) << 7 * (index - 1)
            if not byte & 0x80:
                break
            if index == 4:
                raise MqttProtocolError("remaining length is longer than four bytes")
        if length > self._max_packet_size:
            raise MqttProtocolError(
                f"packet of {length} bytes exceeds the limit of {self._max_packet_size}"
            )
        end = index + 1 + length
        if len(buffer) < end:
            return None
        body = bytes(buffer[index + 1 : end])
        del buffer[:end]
        return _decode_body(first >> 4, first & 0x0F, body)


class ServerConnection:
    """Decodes a client's byte stream and enforces MQTT 3.1.1 connection-level rules for a server.

    The first packet must be CONNECT and only one CONNECT is allowed. A CONNECT for a protocol
    not in ``SUPPORTED_PROTOCOLS`` is returned (answer CONNACK 1 and close), as is MQTT 3.1;
    bytes after it, or after DISCONNECT, are ignored because the server is closing anyway.
    """

    def __init__(self, max_packet_size: int = 128 * 1024) -> None:
        self._decoder = PacketDecoder("server", max_packet_size)
        self._connected = False
        self._closing = False
        self._failed: MqttProtocolError | None = None

    @property
    def connected(self) -> bool:
        """Whether a CONNECT has been received."""
        return self._connected

    @property
    def buffered(self) -> int:
        """Bytes received but waiting for the rest of their packet (0 once closing)."""
        return 0 if self._closing else self._decoder.buffered

    def receive_data(self, data: bytes) -> list[Packet]:
        """Decode ``data`` into packets; raises ``MqttProtocolError`` (and stays failed)."""
        if self._failed is not None:
            raise MqttProtocolError(self._failed.reason)
        if self._closing:
            return []
        packets: list[Packet] = []
        try:
            self._decoder._extend(data)
            while not self._closing and (packet := self._decoder._next()) is not None:
                self._check(packet)
                packets.append(packet)
        except MqttProtocolError as exc:
            self._failed = exc
            raise
        return packets

    def _check(self, packet: Packet) -> None:
        if isinstance(packet, Connect):
            if self._connected:
                raise MqttProtocolError("second CONNECT on one connection")
            self._connected = True
            protocol = (packet.protocol_name, packet.protocol_level)
            self._closing = protocol not in SUPPORTED_PROTOCOLS
        elif not self._connected:
            raise MqttProtocolError(f"first packet is {type(packet).__name__}, not CONNECT")
        elif isinstance(packet, Disconnect):
            self._closing = True


# --- topics ----------------------------------------------------------------------------------


def is_valid_topic_filter(topic_filter: str) -> bool:
    """Whether wildcards are well placed: ``+`` fills a level, ``#`` is alone and last."""
    if not topic_filter or "\x00" in topic_filter:
        return False
    levels = topic_filter.split("/")
    for position, level in enumerate(levels):
        if "+" in level and level != "+":
            return False
        if "#" in level and (level != "#" or position != len(levels) - 1):
            return False
    return True


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter``; leading wildcards skip ``$`` topics."""
    if not is_valid_topic_filter(topic_filter) or not topic or "+" in topic or "#" in topic:
        return False
    filter_levels, topic_levels = topic_filter.split("/"), topic.split("/")
    if topic.startswith("$") and filter_levels[0] in ("+", "#"):
        return False
    for position, level in enumerate(filter_levels):
        if level == "#":
            return True
        if position >= len(topic_levels) or level not in ("+", topic_levels[position]):
            return False
    return len(filter_levels) == len(topic_levels)
