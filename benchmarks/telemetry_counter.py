"""Child process: counts the telemetry that reaches a broker, per device, for the benchmarks.

A minimal MQTT 3.1.1 subscriber on raw sockets (plain TCP on loopback): it subscribes to
``devices/+/messages/events`` and ``devices/+/messages/events/#`` at QoS 1, acknowledges every
QoS 1 message, and counts arrivals per device id (the second topic level) with the time
(``time.monotonic()``, the same clock in every process on Linux) of the first and the last one.
It parses whole receive buffers in one pass, so that it stays far faster than the publishers it
watches (paho's own reader takes a system call per packet header).

Prints one JSON line (``pid``, ``control_port``) when subscribed. The control port answers one
line per request line: ``count PREFIX`` gives ``{"count", "bytes", "devices", "first", "last"}``
over the devices whose id starts with ``PREFIX``; ``devices PREFIX`` gives ``{device: count}``.
Runs until its standard input closes, SIGTERM, or ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import socket
import sys
import time
from typing import Any

from benchmarks.common import CHILD_MAX_LIFETIME, HOST

FILTERS = ("devices/+/messages/events", "devices/+/messages/events/#")
_PREFIX = b"devices/"
_READ_SIZE = 1 << 20


class ProtocolError(Exception):
    """The broker sent something this subscriber does not expect."""


def _string(value: str) -> bytes:
    data = value.encode("utf-8")
    return len(data).to_bytes(2, "big") + data


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        byte, length = length % 128, length // 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out)


def connect_packet(client_id: str, keepalive: int = 0) -> bytes:
    """CONNECT, MQTT 3.1.1, clean session, no credentials (mosquitto allows anonymous)."""
    body = _string("MQTT") + bytes([4, 0x02]) + keepalive.to_bytes(2, "big") + _string(client_id)
    return bytes([0x10]) + _remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, filters: tuple[str, ...], qos: int = 1) -> bytes:
    """SUBSCRIBE to ``filters`` at ``qos``."""
    body = packet_id.to_bytes(2, "big") + b"".join(_string(f) + bytes([qos]) for f in filters)
    return bytes([0x82]) + _remaining_length(len(body)) + body


class Counter:
    """Per-device arrival counts, first and last arrival times, payload bytes."""

    def __init__(self) -> None:
        self.devices: dict[bytes, list[float]] = {}  # id -> [count, bytes, first, last]
        self.other = 0

    def summary(self, prefix: str) -> dict[str, Any]:
        """Totals over the devices whose id starts with ``prefix``."""
        wanted = prefix.encode("utf-8")
        count = size = devices = 0
        first: float | None = None
        last: float | None = None
        for device, (n, nbytes, t0, t1) in self.devices.items():
            if device.startswith(wanted):
                count += int(n)
                size += int(nbytes)
                devices += 1
                first = t0 if first is None else min(first, t0)
                last = t1 if last is None else max(last, t1)
        return {"count": count, "bytes": size, "devices": devices, "first": first, "last": last}

    def per_device(self, prefix: str) -> dict[str, int]:
        """``{device: count}`` for the devices whose id starts with ``prefix``."""
        wanted = prefix.encode("utf-8")
        return {
            device.decode("utf-8", "replace"): int(values[0])
            for device, values in self.devices.items()
            if device.startswith(wanted)
        }


class Subscriber:
    """Parses the broker's stream, counts PUBLISHes, queues PUBACKs (sent per buffer)."""

    def __init__(self, sock: socket.socket, counter: Counter) -> None:
        self.sock = sock
        self.counter = counter
        self.buffer = b""
        self.connacked = False
        self.subacked = False

    def feed(self, data: bytes, now: float) -> None:
        """Handle every complete packet in the buffer; acknowledge the QoS 1 ones at once."""
        buffer = self.buffer + data if self.buffer else data
        acks: list[bytes] = []
        devices = self.counter.devices
        pos, end = 0, len(buffer)
        while pos + 2 <= end:
            header = buffer[pos]
            # Remaining length: up to four bytes of 7 bits each, low bits first.
            length = shift = 0
            index = pos + 1
            complete = False
            while index < end:
                byte = buffer[index]
                index += 1
                length |= (byte & 0x7F) << shift
                if not byte & 0x80:
                    complete = True
                    break
                shift += 7
                if shift > 21:
                    raise ProtocolError("remaining length over four bytes")
            if not complete:
                break
            stop = index + length
            if stop > end:
                break
            kind = header >> 4
            if kind == 3:
                topic_length = (buffer[index] << 8) | buffer[index + 1]
                topic_end = index + 2 + topic_length
                topic = buffer[index + 2 : topic_end]
                payload_start = topic_end
                if header & 0x06:
                    acks.append(b"\x40\x02" + buffer[topic_end : topic_end + 2])
                    payload_start += 2
                if topic.startswith(_PREFIX):
                    slash = topic.find(b"/", 8)
                    device = topic[8:slash] if slash > 0 else topic[8:]
                    entry = devices.get(device)
                    if entry is None:
                        devices[device] = [1, stop - payload_start, now, now]
                    else:
                        entry[0] += 1
                        entry[1] += stop - payload_start
                        entry[3] = now
                else:
                    self.counter.other += 1
            elif kind == 2:
                if buffer[index + 1] != 0:
                    raise ProtocolError(f"CONNACK refused: {buffer[index + 1]}")
                self.connacked = True
            elif kind == 9:
                if any(code == 0x80 for code in buffer[index + 2 : stop]):
                    raise ProtocolError("SUBACK refused a filter")
                self.subacked = True
            pos = stop
        self.buffer = buffer[pos:]
        if acks:
            self.sock.sendall(b"".join(acks))


def _connect(port: int, counter: Counter, timeout: float = 10.0) -> Subscriber:
    sock = socket.create_connection((HOST, port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    subscriber = Subscriber(sock, counter)
    sock.sendall(connect_packet(f"bench-counter-{os.getpid()}"))
    sock.sendall(subscribe_packet(1, FILTERS))
    deadline = time.monotonic() + timeout
    while not subscriber.subacked:
        if time.monotonic() > deadline:
            raise SystemExit("the counter could not subscribe in time")
        data = sock.recv(_READ_SIZE)
        if not data:
            raise SystemExit("the broker closed the counter's connection")
        subscriber.feed(data, time.monotonic())
    sock.setblocking(False)
    return subscriber


def _answer(counter: Counter, line: str) -> dict[str, Any]:
    command, _, argument = line.strip().partition(" ")
    if command == "count":
        return counter.summary(argument)
    if command == "devices":
        return {"devices": counter.per_device(argument)}
    return {"error": f"unknown command {command!r}"}


def main() -> None:
    """Subscribe, count, answer queries until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True, help="the broker's plain MQTT port")
    parser.add_argument("--max-seconds", type=float, default=CHILD_MAX_LIFETIME)
    args = parser.parse_args()

    counter = Counter()
    subscriber = _connect(args.port, counter)
    control = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    control.bind((HOST, 0))
    control.listen(8)
    control.setblocking(False)
    selector = selectors.DefaultSelector()
    selector.register(subscriber.sock, selectors.EVENT_READ, "mqtt")
    selector.register(control, selectors.EVENT_READ, "listen")
    stdin = sys.stdin.fileno()
    selector.register(stdin, selectors.EVENT_READ, "stdin")
    stop = False

    def on_term(*_args: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print(json.dumps({"pid": os.getpid(), "control_port": control.getsockname()[1]}), flush=True)
    deadline = time.monotonic() + args.max_seconds
    pending: dict[socket.socket, bytes] = {}
    while not stop and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            what = key.data
            if what == "mqtt":
                try:
                    data = subscriber.sock.recv(_READ_SIZE)
                except BlockingIOError:
                    continue
                if not data:
                    raise SystemExit("the broker closed the counter's connection")
                subscriber.feed(data, time.monotonic())
            elif what == "listen":
                with contextlib.suppress(BlockingIOError):
                    conn, _ = control.accept()
                    conn.setblocking(False)
                    pending[conn] = b""
                    selector.register(conn, selectors.EVENT_READ, "control")
            elif what == "stdin":
                if not os.read(stdin, 4096):
                    stop = True
            else:
                peer = key.fileobj
                assert isinstance(peer, socket.socket)
                try:
                    chunk = peer.recv(4096)
                except BlockingIOError:
                    continue
                except OSError:
                    chunk = b""
                if not chunk:
                    selector.unregister(peer)
                    pending.pop(peer, None)
                    peer.close()
                    continue
                data = pending.get(peer, b"") + chunk
                while b"\n" in data:
                    line, data = data.split(b"\n", 1)
                    reply = json.dumps(_answer(counter, line.decode("utf-8", "replace")))
                    peer.setblocking(True)
                    peer.sendall(reply.encode("utf-8") + b"\n")
                    peer.setblocking(False)
                pending[peer] = data
    with contextlib.suppress(OSError):
        subscriber.sock.sendall(b"\xe0\x00")  # DISCONNECT
    subscriber.sock.close()
    control.close()


class CounterClient:
    """The benchmark's side of the control port: one connection, one line per query."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self._sock = socket.create_connection((HOST, port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def count(self, prefix: str) -> dict[str, Any]:
        """Totals for the devices whose id starts with ``prefix``."""
        return self._ask(f"count {prefix}")

    def devices(self, prefix: str) -> dict[str, int]:
        """Per-device counts for the devices whose id starts with ``prefix``."""
        answer: dict[str, int] = self._ask(f"devices {prefix}")["devices"]
        return answer

    def _ask(self, line: str) -> dict[str, Any]:
        self._sock.sendall(line.encode("utf-8") + b"\n")
        reply = self._file.readline()
        if not reply:
            raise RuntimeError("the telemetry counter closed its control connection")
        answer: dict[str, Any] = json.loads(reply)
        return answer

    def close(self) -> None:
        """Close the control connection."""
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()


if __name__ == "__main__":
    main()
