"""A raw MQTT client for emulator tests: an ``ssl`` (or plain) socket plus the emulator's own
codec (``encode`` and ``PacketDecoder(role="client")``), so every byte on the wire is under the
test's control. Every socket operation and every wait is bounded by :data:`IO_TIMEOUT`.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from emulator.mqtt_codec import Packet, PacketDecoder, PubAck, Publish, encode
from emulator.server import Emulator

#: Bound on every single socket operation and on every "wait for X" loop.
IO_TIMEOUT = 10.0


@dataclass
class RawClient:
    """A TLS (or plain) socket speaking MQTT through the emulator's codec; acknowledges QoS 1
    deliveries as it reads them while ``auto_ack`` is set."""

    sock: socket.socket
    decoder: PacketDecoder = field(default_factory=lambda: PacketDecoder(role="client"))
    pending: deque[Packet] = field(default_factory=deque)
    next_id: int = 0
    auto_ack: bool = True

    def send(self, data: Packet | bytes) -> None:
        self.sock.sendall(data if isinstance(data, bytes) else encode(data))

    def packet_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def read_packet(self, deadline: float) -> Packet:
        """The next packet from the server; fails on EOF or when ``deadline`` passes."""
        while not self.pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no packet from the server in time")
            self.sock.settimeout(remaining)
            data = self.sock.recv(65536)
            if not data:
                raise AssertionError("the server closed the connection")
            self.pending.extend(self.decoder.feed(data))
        packet = self.pending.popleft()
        if (
            self.auto_ack
            and isinstance(packet, Publish)
            and packet.qos == 1
            and packet.packet_id is not None
        ):
            self.send(PubAck(packet.packet_id))
        return packet

    def read_until(
        self, match: Callable[[Packet], bool], timeout: float = IO_TIMEOUT
    ) -> tuple[Packet, list[Packet]]:
        """Read until a packet matches; returns it and the packets read before it."""
        deadline = time.monotonic() + timeout
        skipped: list[Packet] = []
        while True:
            packet = self.read_packet(deadline)
            if match(packet):
                return packet, skipped
            skipped.append(packet)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def tls_context(emulator: Emulator, max_version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(emulator.ca_file))
    if max_version is not None:
        context.maximum_version = max_version
    return context


def open_tls(emulator: Emulator, max_version: ssl.TLSVersion | None = None) -> RawClient:
    raw = socket.create_connection(("127.0.0.1", emulator.mqtt_port), timeout=IO_TIMEOUT)
    try:
        sock = tls_context(emulator, max_version).wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise
    sock.settimeout(IO_TIMEOUT)
    return RawClient(sock)


def open_plain(emulator: Emulator) -> RawClient:
    return RawClient(
        socket.create_connection(("127.0.0.1", emulator.mqtt_port), timeout=IO_TIMEOUT)
    )


def expect_closed(client: RawClient, timeout: float = IO_TIMEOUT) -> bytes:
    """Read until the server closes (EOF, reset or TLS error); returns what came before."""
    deadline = time.monotonic() + timeout
    received = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError("the server did not close the connection")
        client.sock.settimeout(remaining)
        try:
            data = client.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            raise AssertionError("the server did not close the connection") from None
        except (ssl.SSLError, ConnectionError, OSError):
            return received
        if not data:
            return received
        received += data


def is_closed(client: RawClient, timeout: float = IO_TIMEOUT) -> bool:
    """True once the server closes the connection (within ``timeout``); packets are skipped."""
    try:
        expect_closed(client, timeout)
    except AssertionError:
        return False
    return True


def wait_for(condition: Callable[[], bool], timeout: float = IO_TIMEOUT) -> None:
    """Poll a condition about the emulator's state, a bounded number of times."""
    for _ in range(int(timeout / 0.01)):
        if condition():
            return
        time.sleep(0.01)
    raise AssertionError("condition not reached in time")


def publish_header(remaining_length: int, flags: int = 0x02) -> bytes:
    """A raw PUBLISH fixed header (QoS 1 by default) for ``remaining_length`` bytes of body."""
    out = bytearray([0x30 | flags])
    while True:
        byte, remaining_length = remaining_length % 128, remaining_length // 128
        out.append(byte | 0x80 if remaining_length else byte)
        if not remaining_length:
            return bytes(out)


def qos2_publish(topic: str, payload: bytes) -> bytes:
    """A raw QoS 2 PUBLISH (which the emulator does not support), packet id 1."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + (1).to_bytes(2, "big") + payload
    return publish_header(len(body), flags=0x04) + body
