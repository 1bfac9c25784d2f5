"""Scripted TLS MQTT servers for cases a real broker will not play: CONNACK refusals.

:class:`ScriptedTlsServer` serves TLS connections on a loopback port, playing a subclass's
:meth:`~ScriptedTlsServer.script` on each. :class:`RefusingServer` accepts any number of TLS
connections and answers every CONNECT with one fixed CONNACK return code, counting the attempts
(and keeping their user names and passwords, so a test can check what a client sent without a
broker that validates SAS tokens).
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import TypeVar

from .pki import Pki

_Server = TypeVar("_Server", bound="ScriptedTlsServer")


def read_packet(conn: ssl.SSLSocket) -> tuple[int, bytes]:
    """One MQTT packet: (first byte, body)."""
    header = conn.recv(1)
    if not header:
        raise ConnectionError("closed")
    length, shift = 0, 0
    for _ in range(4):
        byte = conn.recv(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            raise ConnectionError("closed")
        body += chunk
    return header[0], body


def packet(first: int, body: bytes) -> bytes:
    """An MQTT packet with the remaining-length header."""
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length & 0x7F, length >> 7
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([first]) + bytes(encoded) + body


def _string(body: bytes, offset: int) -> tuple[str, int]:
    size = int.from_bytes(body[offset : offset + 2], "big")
    return body[offset + 2 : offset + 2 + size].decode("utf-8"), offset + 2 + size


def parse_connect(body: bytes) -> tuple[str, str | None, str | None]:
    """Client id, user name and password of an MQTT 3.1.1 CONNECT body."""
    _, offset = _string(body, 0)  # protocol name
    flags = body[offset + 1]
    offset += 4  # level, flags, keep-alive
    client_id, offset = _string(body, offset)
    if flags & 0x04:  # will topic and message
        _, offset = _string(body, offset)
        _, offset = _string(body, offset)
    user = password = None
    if flags & 0x80:
        user, offset = _string(body, offset)
    if flags & 0x40:
        password, offset = _string(body, offset)
    return client_id, user, password


class ScriptedTlsServer:
    """Accepts TLS connections on 127.0.0.1 (a free port) and plays :meth:`script` on each, until
    closed or (with ``connections``) that many have been served."""

    #: Time-out of every socket operation on an accepted connection.
    io_timeout = 5.0

    def __init__(self, pki: Pki, *, connections: int | None = None) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(pki.server_cert, pki.server_key)
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self._connections = connections
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self: _Server) -> _Server:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join(10)
        self.listener.close()

    def script(self, conn: ssl.SSLSocket) -> None:
        """Play one connection (the caller closes it)."""
        raise NotImplementedError

    def _serve(self) -> None:
        served = 0
        while not self._stop.is_set() and (self._connections is None or served < self._connections):
            try:
                raw, _ = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            served += 1
            raw.settimeout(self.io_timeout)
            try:
                with self.context.wrap_socket(raw, server_side=True) as conn:
                    self.script(conn)
            except (OSError, IndexError, ValueError):
                pass
            finally:
                raw.close()


class RefusingServer(ScriptedTlsServer):
    """Answers every CONNECT with CONNACK ``return_code`` (on 127.0.0.1, a free port)."""

    def __init__(self, pki: Pki, return_code: int) -> None:
        super().__init__(pki)
        self.return_code = return_code
        self.connects: list[tuple[str, str | None, str | None]] = []
        self._lock = threading.Lock()

    @property
    def attempts(self) -> int:
        """CONNECT packets received so far."""
        with self._lock:
            return len(self.connects)

    def script(self, conn: ssl.SSLSocket) -> None:
        first, body = read_packet(conn)
        if first != 0x10:  # CONNECT
            return
        with self._lock:
            self.connects.append(parse_connect(body))
        conn.sendall(packet(0x20, bytes([0, self.return_code])))
        conn.recv(1)  # until the client closes
