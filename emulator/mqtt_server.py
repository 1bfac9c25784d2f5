"""The emulator's MQTT 3.1.1 server: one asyncio task per connection around the sans-IO codec.

It knows MQTT, not Azure: a CONNECT is handed to an ``authenticate`` callback, which returns the
:class:`Session` (DPS or hub) that handles the connection's subscriptions and publishes. Every
protocol error, time-out or oversized packet closes that one connection and nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Callable, Protocol

from .client_trust import peer_chain
from .mqtt_codec import (
    CONNACK_ACCEPTED,
    CONNACK_REFUSED_PROTOCOL_VERSION,
    SUBACK_FAILURE,
    ConnAck,
    Connect,
    Disconnect,
    MqttProtocolError,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    ServerConnection,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    encode,
    is_valid_topic_filter,
)

log = logging.getLogger(__name__)


class SessionClosed(Exception):
    """Raised by a session to close its connection (a protocol violation at the service level)."""


class Session(Protocol):
    """What a service attaches to an accepted connection."""

    def subscribe(self, topic_filter: str, qos: int) -> int | None:
        """Granted QoS, or None to refuse the filter."""
        ...

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget a subscription."""
        ...

    def publish(self, packet: Publish, now: float) -> None:
        """Handle a client's PUBLISH; raise :class:`SessionClosed` to drop the connection."""
        ...

    def puback(self, packet_id: int) -> None:
        """The client acknowledged a QoS 1 message we sent."""
        ...

    def closed(self) -> None:
        """The connection is gone."""
        ...


class Refused(Exception):
    """Raised by an ``authenticate`` callback: answer CONNACK ``return_code`` and close."""

    def __init__(self, return_code: int, reason: str) -> None:
        self.return_code = return_code
        self.reason = reason
        super().__init__(reason)


Authenticate = Callable[[Connect, "MqttConnection", float], Session]


@dataclass(frozen=True)
class ServerLimits:
    """Time and size limits that protect the server from slow, silent or greedy clients."""

    #: A client must complete TLS and send CONNECT within this many seconds.
    connect_timeout: float = 10.0
    #: Once a packet has started, its last byte must arrive within this many seconds.
    packet_timeout: float = 30.0
    #: Largest packet accepted (remaining length); larger ones close the connection.
    max_packet_size: int = 300 * 1024
    #: A client that does not read what we send for this long is dropped.
    write_timeout: float = 10.0
    #: Idle limit when the client asks for keep-alive 0 (Azure's server-side maximum).
    max_idle: float = 1767.0


class MqttConnection:
    """One client connection: reads packets, writes replies, enforces the limits."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        authenticate: Authenticate,
        limits: ServerLimits,
        clock: Callable[[], float],
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._authenticate = authenticate
        self._limits = limits
        self._clock = clock
        self._codec = ServerConnection(limits.max_packet_size)
        self._session: Session | None = None
        self._next_packet_id = 0
        self._keep_alive = 0
        self._closed = False
        peer = writer.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self.client_id = ""
        #: The TLS client certificate chain the client presented (DER, leaf first), if any.
        self.peer_chain = peer_chain(writer.get_extra_info("ssl_object"))
        #: Set by ``authenticate`` when a persistent session is resumed (CONNACK session present).
        self.session_present = False
        self._loop = asyncio.get_event_loop()
        self._out: list[bytes] = []
        self._write_scheduled = False

    # -- sending ----------------------------------------------------------------------------

    def send(self, packet: Packet) -> None:
        """Queue a packet for the client (no-op once closed).

        Packets queued in one turn of the event loop go out in one write (one TLS record), so a
        burst of PUBACKs and replies does not cost a write each.
        """
        if self._closed:
            return
        self._out.append(encode(packet))
        if not self._write_scheduled:
            self._write_scheduled = True
            self._loop.call_soon(self._write_out)

    def _write_out(self) -> None:
        """Hand everything queued to the transport in one write."""
        self._write_scheduled = False
        if self._out and not self._closed:
            data = b"".join(self._out)
            self._out.clear()
            self._writer.write(data)

    def send_publish(self, topic: str, payload: bytes, qos: int) -> int | None:
        """Publish to the client at ``qos`` (0 or 1); returns the packet id for QoS 1."""
        packet_id: int | None = None
        if qos:
            self._next_packet_id = self._next_packet_id % 65535 + 1
            packet_id = self._next_packet_id
        self.send(Publish(topic=topic, payload=payload, qos=min(qos, 1), packet_id=packet_id))
        return packet_id

    def close(self) -> None:
        """Close the connection (from any callback running on the loop), after what is queued."""
        if not self._closed:
            self._write_out()
            self._closed = True
            self._writer.close()

    @property
    def closed(self) -> bool:
        """True once the connection is closed or closing."""
        return self._closed

    async def flush(self) -> None:
        """Wait until the client has taken what we wrote; drop it if it does not read."""
        if self._closed:
            return
        try:
            await asyncio.wait_for(self._writer.drain(), self._limits.write_timeout)
        except asyncio.TimeoutError:
            log.warning("%s %s: not reading; dropping", self.peer, self.client_id)
            self.close()
        except (ConnectionError, OSError):
            self.close()

    # -- serving ----------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the connection until the client leaves or breaks a rule."""
        try:
            await self._read_loop()
        except MqttProtocolError as exc:
            log.info("%s %s: protocol error: %s; closing", self.peer, self.client_id, exc.reason)
        except SessionClosed as exc:
            log.info("%s %s: %s; closing", self.peer, self.client_id, exc)
        except asyncio.TimeoutError:
            log.info("%s %s: timed out; closing", self.peer, self.client_id)
        except (ConnectionError, OSError, ssl.SSLError) as exc:
            log.debug("%s %s: connection error: %s", self.peer, self.client_id, exc)
        finally:
            self.close()
            if self._session is not None:
                try:
                    self._session.closed()
                except Exception:
                    log.exception("session close hook failed for %s", self.client_id)
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError, OSError, ssl.SSLError):
                await asyncio.wait_for(self._writer.wait_closed(), 2.0)

    def _read_timeout(self) -> float:
        if not self._codec.connected:
            return self._limits.connect_timeout
        idle = self._keep_alive * 1.5 if self._keep_alive else self._limits.max_idle
        if self._codec.buffered:
            return min(idle, self._limits.packet_timeout)
        return min(idle, self._limits.max_idle)

    async def _read_loop(self) -> None:
        connect_deadline = time.monotonic() + self._limits.connect_timeout
        # When the packet now being received must be complete (packet_timeout after it started).
        packet_deadline: float | None = None
        while not self._closed:
            timeout = self._read_timeout()
            if not self._codec.connected:
                timeout = max(0.0, connect_deadline - time.monotonic())
            elif packet_deadline is not None:
                timeout = min(timeout, max(0.0, packet_deadline - time.monotonic()))
            data = await asyncio.wait_for(self._reader.read(65536), timeout)
            if not data:
                return
            packets = self._codec.receive_data(data)
            if not self._codec.buffered:
                packet_deadline = None
            elif packets or packet_deadline is None:
                packet_deadline = time.monotonic() + self._limits.packet_timeout
            for packet in packets:
                self._handle(packet)
                if self._closed:
                    break
            self._write_out()
            await self.flush()

    def _handle(self, packet: Packet) -> None:
        now = self._clock()
        if isinstance(packet, Connect):
            self._on_connect(packet, now)
            return
        session = self._session
        if session is None:  # CONNACK was a refusal; the codec stops after CONNECT
            return
        if isinstance(packet, Publish):
            session.publish(packet, now)
            if packet.qos == 1 and packet.packet_id is not None:
                self.send(PubAck(packet.packet_id))
        elif isinstance(packet, PubAck):
            session.puback(packet.packet_id)
        elif isinstance(packet, Subscribe):
            codes = []
            for topic_filter, qos in packet.topics:
                granted = (
                    session.subscribe(topic_filter, qos)
                    if is_valid_topic_filter(topic_filter)
                    else None
                )
                codes.append(SUBACK_FAILURE if granted is None else granted)
            self.send(SubAck(packet.packet_id, tuple(codes)))
        elif isinstance(packet, Unsubscribe):
            for topic_filter in packet.topics:
                session.unsubscribe(topic_filter)
            self.send(UnsubAck(packet.packet_id))
        elif isinstance(packet, PingReq):
            self.send(PingResp())
        elif isinstance(packet, Disconnect):
            self.close()

    def _on_connect(self, packet: Connect, now: float) -> None:
        self.client_id = packet.client_id
        if (packet.protocol_name, packet.protocol_level) != ("MQTT", 4):
            self.send(ConnAck(False, CONNACK_REFUSED_PROTOCOL_VERSION))
            self.close()
            return
        try:
            self._session = self._authenticate(packet, self, now)
        except Refused as exc:
            log.info(
                "%s %s: CONNECT refused (%d): %s",
                self.peer,
                packet.client_id,
                exc.return_code,
                exc.reason,
            )
            self.send(ConnAck(False, exc.return_code))
            self.close()
            return
        self._keep_alive = packet.keep_alive
        self.send(ConnAck(self.session_present, CONNACK_ACCEPTED))
        log.info("%s %s: connected", self.peer, packet.client_id)


class MqttServer:
    """A TLS MQTT listener; each accepted connection runs as its own task."""

    def __init__(
        self,
        authenticate: Authenticate,
        ssl_context: ssl.SSLContext | None,
        *,
        limits: ServerLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._authenticate = authenticate
        self._ssl = ssl_context
        self._limits = limits or ServerLimits()
        self._clock = clock
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[MqttConnection] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0 picks a free port); returns the port."""
        self._server = await asyncio.start_server(
            self._accept,
            host,
            port,
            ssl=self._ssl,
            ssl_handshake_timeout=self._limits.connect_timeout if self._ssl else None,
            reuse_address=True,
        )
        sockets = self._server.sockets
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = MqttConnection(reader, writer, self._authenticate, self._limits, self._clock)
        self._connections.add(connection)
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await connection.serve()
        finally:
            self._connections.discard(connection)
            if task is not None:
                self._tasks.discard(task)

    @property
    def connection_count(self) -> int:
        """Connections open right now."""
        return len(self._connections)

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
