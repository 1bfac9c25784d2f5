"""Routing: which service a CONNECT belongs to, and where a hub's telemetry goes.

* :class:`ConnectionRouter` is the MQTT server's ``authenticate`` callback: usernames with
  ``/registrations/`` go to DPS (:class:`DpsSession`), every other one to the hub
  (:class:`HubSession`, through :class:`HubRuntime`).
* :class:`HubRuntime` owns the hub's live state on the event loop: one session per device (a new
  connection drops the old one), persistent sessions (``clean_session=0``), pending direct-method
  calls; its public methods are the service API's entry points and are safe to call from the API's
  threads (work is scheduled onto the loop).
* :class:`TelemetryForwarder` republishes telemetry to an MQTT broker from its own thread and
  queue, so a slow or absent broker never blocks the hub ("message routing" in Azure's terms).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import queue
import threading
import time
import uuid
from collections.abc import Awaitable
from typing import Any, Callable, TypeVar
from urllib.parse import urlsplit

from .dps_service import ConnectRefused, DpsIdentity, DpsService, ProtocolViolation, Reply
from .errors import EmulatorError
from .hub_service import (
    ERROR_BAD_DEVICE_ANSWER,
    ERROR_DEVICE_NOT_ONLINE,
    ERROR_GATEWAY_TIMEOUT,
    HubIdentity,
    HubService,
    HubServiceError,
    MethodResponse,
    telemetry_envelope,
)
from .hub_store import TelemetryRecord
from .mqtt_codec import Connect, Publish, topic_matches
from .mqtt_server import MqttConnection, Refused, Session, SessionClosed

__all__ = [
    "ConnectionRouter",
    "DpsSession",
    "HubRuntime",
    "HubSession",
    "TelemetryForwarder",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

#: How long an API thread waits for the loop beyond the operation's own time-out.
_LOOP_MARGIN = 10.0
#: Error code of "the hub is not running" answers.
ERROR_HUB_STOPPED = 503001


# ---------------------------------------------------------------------------- MQTT plumbing


class ConnectionRouter:
    """Hands each CONNECT to DPS or to the hub by its username."""

    def __init__(self, dps: DpsService, hub: HubRuntime) -> None:
        self.dps = dps
        self.hub = hub

    def authenticate(self, connect: Connect, conn: MqttConnection, now: float) -> Session:
        """The MQTT server's ``authenticate`` callback."""
        username = connect.username or ""
        try:
            if "/registrations/" in username:
                identity = self.dps.authenticate(
                    connect.client_id,
                    connect.username,
                    connect.password,
                    now,
                    client_chain=conn.peer_chain,
                )
                return DpsSession(self.dps, identity, conn)
            return self.hub.open_session(connect, conn, now)
        except ConnectRefused as exc:
            raise Refused(exc.return_code, exc.reason) from exc


# ---------------------------------------------------------------------------- DPS


class DpsSession:
    """Binds one authenticated MQTT connection to the DPS service; replies go only to it."""

    def __init__(self, service: DpsService, identity: DpsIdentity, conn: MqttConnection) -> None:
        self._service = service
        self._identity = identity
        self._conn = conn
        self._granted: int | None = None

    def subscribe(self, topic_filter: str, qos: int) -> int | None:
        """Only ``$dps/registrations/res/#`` is allowed."""
        granted = self._service.grant(topic_filter, qos)
        if granted is not None:
            self._granted = granted
        return granted

    def unsubscribe(self, topic_filter: str) -> None:
        """Drop the response subscription."""
        if self._service.grant(topic_filter, 0) is not None:
            self._granted = None

    def publish(self, packet: Publish, now: float) -> None:
        """Answer a register or poll request on this connection."""
        try:
            replies = self._service.handle_publish(
                self._identity, packet.topic, packet.payload, now
            )
        except ProtocolViolation as exc:
            raise SessionClosed(str(exc)) from exc
        for reply in replies:
            if self._granted is None:
                log.info("%s did not subscribe to responses; answer dropped", packet.topic)
                continue
            self._conn.send_publish(reply.topic, reply.payload, self._granted)

    def puback(self, packet_id: int) -> None:
        """DPS keeps no state for acknowledged responses."""

    def closed(self) -> None:
        """DPS sessions are never persistent."""


# ---------------------------------------------------------------------------- hub sessions


class HubSession:
    """One device's hub connection: its subscriptions, C2D deliveries and replies."""

    def __init__(
        self,
        runtime: HubRuntime,
        identity: HubIdentity,
        conn: MqttConnection,
        subscriptions: dict[str, int],
        persistent: bool,
    ) -> None:
        self._runtime = runtime
        self._service = runtime.service
        self.identity = identity
        self._conn = conn
        self._subscriptions = subscriptions
        self._persistent = persistent
        #: Packet id of an unacknowledged C2D delivery -> the message's id.
        self._in_flight: dict[int, int] = {}
        self._delivery_scheduled = False
        self.active = True

    @property
    def device_id(self) -> str:
        """The device this session belongs to."""
        return self.identity.device_id

    @property
    def subscriptions(self) -> dict[str, int]:
        """Granted filters and their QoS (a copy)."""
        return dict(self._subscriptions)

    # -- Session protocol ---------------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int) -> int | None:
        """Grant an allowed filter while the device has fewer than 5 (re-subscribing is free)."""
        granted = self._service.grant(self.identity, topic_filter, qos)
        if granted is None:
            log.info("device %s: subscription to %r refused", self.device_id, topic_filter[:80])
            return None
        limit = self._service.config.max_subscriptions
        if topic_filter not in self._subscriptions and len(self._subscriptions) >= limit:
            log.info("device %s: more than %d subscriptions refused", self.device_id, limit)
            return None
        self._subscriptions[topic_filter] = granted
        self._save()
        self.schedule_delivery()
        return granted

    def unsubscribe(self, topic_filter: str) -> None:
        """Forget a filter."""
        if self._subscriptions.pop(topic_filter, None) is not None:
            self._save()

    def publish(self, packet: Publish, now: float) -> None:
        """Telemetry, twin requests and method answers; bad input closes this connection."""
        try:
            outcome = self._service.handle_publish(
                self.identity, packet.topic, packet.payload, packet.retain, now
            )
        except ProtocolViolation as exc:
            raise SessionClosed(str(exc)) from exc
        except EmulatorError as exc:
            log.error("device %s: cannot handle a message: %s", self.device_id, exc)
            raise SessionClosed("internal error") from exc
        for reply in outcome.replies:
            self.send(reply)
        if outcome.method_response is not None:
            self._runtime.method_answered(self.device_id, outcome.method_response)
        if outcome.telemetry is not None:
            self._runtime.telemetry_stored(outcome.telemetry)

    def puback(self, packet_id: int) -> None:
        """A C2D delivery was acknowledged: the message is complete (removed from the queue)."""
        message_id = self._in_flight.pop(packet_id, None)
        if message_id is not None:
            self._service.devices.complete_c2d(message_id)

    def closed(self) -> None:
        """The connection is gone; unacknowledged C2D messages stay queued."""
        self.active = False
        self._runtime.session_closed(self)

    # -- sending ------------------------------------------------------------------------------

    def granted_qos(self, topic: str) -> int | None:
        """The QoS this session receives ``topic`` at, or None when no filter matches it."""
        granted = [qos for flt, qos in self._subscriptions.items() if topic_matches(flt, topic)]
        return max(granted) if granted else None

    def send(self, reply: Reply, max_qos: int = 1) -> bool:
        """Publish to the device if it subscribed to the topic; False when dropped."""
        qos = self.granted_qos(reply.topic)
        if not self.active or self._conn.closed or qos is None:
            log.debug("device %s: %s not delivered", self.device_id, reply.topic[:80])
            return False
        self._conn.send_publish(reply.topic, reply.payload, min(qos, max_qos))
        return True

    def drop(self, reason: str) -> None:
        """Close the connection because another one replaced it."""
        log.info("device %s: closing its older connection: %s", self.device_id, reason)
        self.active = False
        self._conn.close()

    def schedule_delivery(self) -> None:
        """Deliver queued C2D messages soon (after the CONNACK or SUBACK now being sent)."""
        if not self._delivery_scheduled:
            self._delivery_scheduled = True
            asyncio.get_running_loop().call_soon(self._deliver_scheduled)

    def _deliver_scheduled(self) -> None:
        self._delivery_scheduled = False
        try:
            self.deliver_c2d()
        except EmulatorError as exc:
            log.error("device %s: C2D delivery failed: %s", self.device_id, exc)

    def deliver_c2d(self) -> None:
        """Send every queued C2D message not already in flight on this connection.

        At QoS 1 a message is removed when the device acknowledges it; a QoS 0 subscription
        gets at-most-once delivery (removed when sent).
        """
        if not self.active or self._conn.closed:
            return
        in_flight = set(self._in_flight.values())
        for record in self._service.devices.pending_c2d(self.device_id):
            if record.id in in_flight:
                continue
            reply = self._service.c2d_reply(record)
            qos = self.granted_qos(reply.topic)
            if qos is None:
                return
            packet_id = self._conn.send_publish(reply.topic, reply.payload, qos)
            if packet_id is None:
                self._service.devices.complete_c2d(record.id)
            else:
                self._in_flight[packet_id] = record.id

    def _save(self) -> None:
        if self._persistent and self.active:
            self._service.devices.put_session(self.device_id, self._subscriptions)


# ---------------------------------------------------------------------------- hub runtime


class HubRuntime:
    """The hub's live side: sessions by device, method calls in flight, telemetry routing."""

    def __init__(
        self,
        service: HubService,
        forwarder: TelemetryForwarder | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.forwarder = forwarder
        self._clock = clock
        self._sessions: dict[str, HubSession] = {}
        self._calls: dict[tuple[str, str], asyncio.Future[MethodResponse]] = {}
        self._rids = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop | None) -> None:
        """Bind to the event loop the MQTT server runs on; None (on that loop) when the hub
        stops, which ends pending method calls with 503."""
        self._loop = loop
        if loop is None:
            for future in self._calls.values():
                if not future.done():
                    future.set_exception(
                        HubServiceError(503, ERROR_HUB_STOPPED, "the hub is stopping")
                    )

    # -- loop side ----------------------------------------------------------------------------

    def open_session(self, connect: Connect, conn: MqttConnection, now: float) -> HubSession:
        """Authenticate a hub CONNECT and attach its session; :class:`ConnectRefused` if not."""
        identity = self.service.authenticate(
            connect.client_id,
            connect.username,
            connect.password,
            now,
            client_chain=conn.peer_chain,
        )
        device_id = identity.device_id
        old = self._sessions.pop(device_id, None)
        if old is not None:
            old.drop("a new connection for the same device")
        devices = self.service.devices
        present = False
        subscriptions: dict[str, int] = {}
        if connect.clean_session:
            devices.delete_session(device_id)
        else:
            stored = devices.get_session(device_id)
            present = stored is not None
            if stored is None:
                devices.put_session(device_id, {})
            else:
                subscriptions = stored
        session = HubSession(self, identity, conn, subscriptions, not connect.clean_session)
        self._sessions[device_id] = session
        conn.session_present = present
        if subscriptions:
            session.schedule_delivery()
        log.info(
            "hub %s: device %s connected (%s session)",
            identity.hub,
            device_id,
            "resumed" if present else ("persistent" if not connect.clean_session else "clean"),
        )
        return session

    def session_closed(self, session: HubSession) -> None:
        """Forget a closed session unless a newer connection already replaced it."""
        if self._sessions.get(session.device_id) is session:
            del self._sessions[session.device_id]
            log.info("device %s disconnected", session.device_id)

    def method_answered(self, device_id: str, response: MethodResponse) -> None:
        """A device answered a direct method; unknown or late answers are ignored."""
        future = self._calls.get((device_id, response.rid))
        if future is None or future.done():
            log.info("device %s: answer to unknown method call %r ignored", device_id, response.rid)
            return
        future.set_result(response)

    def telemetry_stored(self, record: TelemetryRecord) -> None:
        """Hand a stored message to the broker route, if there is one (never blocks)."""
        if self.forwarder is not None:
            self.forwarder.submit(
                f"devices/{record.device_id}/messages/events",
                json.dumps(telemetry_envelope(record), separators=(",", ":")).encode("utf-8"),
            )

    def is_connected(self, device_id: str) -> bool:
        """Whether the device has a live connection (a dict lookup, safe from any thread)."""
        return device_id in self._sessions

    def disconnect_device(self, device_id: str, reason: str = "its identity moved") -> bool:
        """Close the device's live connection, if it has one (on the loop). True if it had."""
        session = self._sessions.pop(device_id, None)
        if session is None:
            return False
        session.drop(reason)
        return True

    def disconnect_hub(self, hub: str) -> int:
        """Close every live connection to ``hub`` (on the loop); how many there were."""
        doomed = [d for d, session in self._sessions.items() if session.identity.hub == hub]
        for device_id in doomed:
            self.disconnect_device(device_id, f"the hub {hub} was unlinked")
        return len(doomed)

    # -- service API (any thread) -------------------------------------------------------------

    def list_devices(self) -> list[dict[str, Any]]:
        """Every device identity."""
        return [
            self.service.device_view(device, self.is_connected(device.device_id))
            for device in self.service.devices.list_devices()
        ]

    def get_device(self, device_id: str) -> dict[str, Any]:
        """One device identity (404 if unknown)."""
        device = self.service.require_device(device_id)
        return self.service.device_view(device, self.is_connected(device_id))

    def get_twin(self, device_id: str) -> dict[str, Any]:
        """One device twin (404 if unknown)."""
        return self.service.twin_view(device_id, self.is_connected(device_id))

    def set_device_status(self, device_id: str, body: Any) -> dict[str, Any]:
        """Enable or disable a device identity (``{"status": "enabled" | "disabled"}``); disabling
        closes its live connection, and its next CONNECT is refused (CONNACK 3)."""

        async def run() -> dict[str, Any]:
            device = self.service.set_device_status(device_id, body)
            if device.status == "disabled" and self.disconnect_device(
                device_id, "the device was disabled"
            ):
                log.info("device %s disabled: its connection was closed", device_id)
            return self.service.device_view(device, self.is_connected(device_id))

        return self._on_loop(run, _LOOP_MARGIN)

    def unlink_hub(self, hub: str) -> None:
        """Close the live connections of a hub that was just unlinked (any thread)."""

        async def run() -> None:
            self.disconnect_hub(hub)

        self._on_loop(run, _LOOP_MARGIN)

    def telemetry(self, device_id: str, since: int, limit: int) -> list[dict[str, Any]]:
        """Stored telemetry after ``since`` (404 if the device is unknown)."""
        return self.service.telemetry_since(device_id, since, limit)

    def update_twin(self, device_id: str, body: Any) -> dict[str, Any]:
        """Patch tags / desired properties and notify the device; returns the new twin."""

        async def run() -> dict[str, Any]:
            twin, push = self.service.update_twin(device_id, body, self.is_connected(device_id))
            session = self._sessions.get(device_id)
            if push is not None and session is not None:
                session.send(push)
            return twin

        return self._on_loop(run, _LOOP_MARGIN)

    def send_c2d(self, device_id: str, body: Any) -> None:
        """Queue a cloud-to-device message and deliver it if the device is subscribed."""

        async def run() -> None:
            self.service.enqueue_c2d(device_id, body, self._clock())
            session = self._sessions.get(device_id)
            if session is not None:
                session.deliver_c2d()

        self._on_loop(run, _LOOP_MARGIN)

    def invoke_method(self, device_id: str, body: Any) -> dict[str, Any]:
        """Call a direct method; ``{"status", "payload"}`` or 404 (offline) / 504 (time-out)."""
        limit = self.service.config.max_method_timeout + _LOOP_MARGIN
        return self._on_loop(lambda: self._invoke(device_id, body), limit)

    async def _invoke(self, device_id: str, body: Any) -> dict[str, Any]:
        if self._loop is None:
            raise HubServiceError(503, ERROR_HUB_STOPPED, "the hub is stopping")
        self.service.require_device(device_id)
        invocation = self.service.parse_invocation(body)
        rid = f"{next(self._rids):x}"
        request = self.service.method_request(invocation, rid)
        session = self._sessions.get(device_id)
        if session is None or session.granted_qos(request.topic) is None:
            raise HubServiceError(
                404,
                ERROR_DEVICE_NOT_ONLINE,
                f"device {device_id!r} is not connected or not subscribed to methods",
            )
        key = (device_id, rid)
        future: asyncio.Future[MethodResponse] = asyncio.get_running_loop().create_future()
        self._calls[key] = future
        try:
            session.send(request, max_qos=0)
            response = await asyncio.wait_for(future, invocation.timeout)
        except asyncio.TimeoutError as exc:
            raise HubServiceError(
                504,
                ERROR_GATEWAY_TIMEOUT,
                f"device {device_id!r} did not answer {invocation.name!r} in"
                f" {invocation.timeout:g} s",
            ) from exc
        finally:
            self._calls.pop(key, None)
        if response.error is not None:
            raise HubServiceError(502, ERROR_BAD_DEVICE_ANSWER, response.error)
        return {"status": response.status, "payload": response.payload}

    def _on_loop(self, work: Callable[[], Awaitable[_T]], timeout: float) -> _T:
        """Run ``work()`` on the hub's loop and wait for its result (from another thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise HubServiceError(503, ERROR_HUB_STOPPED, "the hub is not running")

        async def call() -> _T:
            return await work()

        try:
            future = asyncio.run_coroutine_threadsafe(call(), loop)
        except RuntimeError as exc:
            raise HubServiceError(503, ERROR_HUB_STOPPED, "the hub is not running") from exc
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise HubServiceError(504, ERROR_GATEWAY_TIMEOUT, "the hub did not answer") from exc


# ---------------------------------------------------------------------------- telemetry route


class TelemetryForwarder:
    """Republishes telemetry envelopes to an MQTT broker (``mqtt://host[:port]``), QoS 1.

    :meth:`submit` only puts the message in a bounded queue; a paho client in a background thread
    publishes while connected (paho reconnects on its own). A full queue drops the message. Drops,
    refused publishes and failed connection attempts are counted (:meth:`stats`) and logged, at
    most once per :attr:`LOG_INTERVAL` seconds.
    """

    LOG_INTERVAL = 10.0

    def __init__(self, url: str, *, queue_size: int = 10_000) -> None:
        parts = urlsplit(url)
        if parts.scheme != "mqtt" or not parts.hostname:
            raise EmulatorError(f"the telemetry route must be mqtt://HOST[:PORT], got {url!r}")
        try:
            self.port = parts.port or 1883
        except ValueError as exc:
            raise EmulatorError(f"bad port in telemetry route {url!r}") from exc
        self.url = url
        self.host = parts.hostname
        self._queue: queue.Queue[tuple[str, bytes]] = queue.Queue(queue_size)
        self._connected = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._counts = {"forwarded": 0, "failed": 0, "dropped": 0, "connectFailures": 0}
        self._last_log = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the publishing thread (it connects in the background)."""
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="telemetry-forwarder", daemon=True
            )
            self._thread.start()

    def submit(self, topic: str, payload: bytes) -> None:
        """Queue a message for the broker; never blocks."""
        try:
            self._queue.put_nowait((topic, payload))
        except queue.Full:
            self._count("dropped", "telemetry route queue full; message dropped")

    def stats(self) -> dict[str, Any]:
        """URL, connection state and counters."""
        with self._lock:
            counts = dict(self._counts)
        return {
            "url": self.url,
            "connected": self._connected.is_set(),
            "queued": self._queue.qsize(),
            **counts,
        }

    def wait_connected(self, timeout: float) -> bool:
        """Wait (bounded) until connected to the broker."""
        return self._connected.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop publishing (queued messages are dropped) and join the thread."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _count(self, name: str, message: str) -> None:
        with self._lock:
            self._counts[name] += 1
            now = time.monotonic()
            should_log = now - self._last_log >= self.LOG_INTERVAL
            if should_log:
                self._last_log = now
        if should_log:
            log.warning("%s (%s: %s)", message, self.url, self.stats())

    def _run(self) -> None:
        from paho.mqtt.client import MQTT_ERR_SUCCESS, Client, MQTTv311
        from paho.mqtt.enums import CallbackAPIVersion

        client = Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"dps-mqtt-emulator-{uuid.uuid4().hex[:12]}",
            protocol=MQTTv311,
        )

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if reason.is_failure:
                self._count("connectFailures", f"the broker refused the connection: {reason}")
            else:
                log.info("telemetry route connected to %s", self.url)
                self._connected.set()

        def on_disconnect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            self._connected.clear()

        def on_connect_fail(client: Any, userdata: Any) -> None:
            self._count("connectFailures", "cannot connect to the telemetry route's broker")

        client.on_connect = on_connect
        client.on_disconnect = on_disconnect
        client.on_connect_fail = on_connect_fail
        client.reconnect_delay_set(min_delay=1, max_delay=5)
        client.max_queued_messages_set(1000)
        client.connect_async(self.host, self.port, keepalive=30)
        client.loop_start()
        try:
            while not self._stopping.is_set():
                if not self._connected.wait(0.2):
                    continue
                try:
                    topic, payload = self._queue.get(timeout=0.2)
                except queue.Empty:
                    continue
                info = client.publish(topic, payload, qos=1)
                if info.rc == MQTT_ERR_SUCCESS:
                    with self._lock:
                        self._counts["forwarded"] += 1
                else:
                    self._count("failed", f"telemetry route publish failed (rc {info.rc})")
        finally:
            client.disconnect()
            client.loop_stop()
