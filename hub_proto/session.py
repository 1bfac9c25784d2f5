"""The IoT Hub session core: connection lifecycle, SAS renewal, telemetry, twin and methods.

A sans-IO state machine the transports drive. Time is always an argument ``now`` (seconds from
any monotonic origin). The transport:

1. connects when :meth:`HubSession.should_connect` says so, calling
   :meth:`~HubSession.connect_started` just before it signs a fresh SAS token (expiry = wall
   clock + ``token_ttl``; see :func:`~hub_proto.auth.sas_password`), then
   :meth:`~HubSession.connection_made` or :meth:`~HubSession.connect_failed`;
2. subscribes to :meth:`~HubSession.subscriptions_needed` on every new connection, before
   publishing anything;
3. after every input, publishes what :meth:`~HubSession.outgoing` returns, reporting packet ids
   with :meth:`~HubSession.publish_sent` and completions with :meth:`~HubSession.puback`;
4. feeds received messages to :meth:`~HubSession.receive`, wakes at
   :meth:`~HubSession.next_deadline` to call :meth:`~HubSession.on_timer`;
5. on :class:`TokenRenewalDue` disconnects and calls ``connection_lost(now, "renewal")``
   (MQTT 3.1.1 cannot re-authenticate a live connection).

The session replays unacknowledged QoS 1 telemetry itself, so the MQTT client must not: use a
fresh client (or a clean session) per connection. Events come back from every input that returns
a list, including those caused by calls that do not return events (e.g. a message dropped by
:meth:`~HubSession.send_message`); :meth:`~HubSession.events` drains them without other input.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Iterable
from typing import Any, Literal

from .backoff import SHARED_RNG as _SHARED_RNG
from .backoff import Backoff, BackoffPolicy
from .errors import (
    HubAuthError,
    HubError,
    HubParseError,
    HubRequestError,
    HubStateError,
)
from .events import (
    C2DMessage,
    Event,
    MethodRequest,
    OutgoingPublish,
    ReceiveError,
    RequestFailed,
    SessionFailed,
    TokenRenewalDue,
    TwinResponse,
)
from .message import Message
from .telemetry import MessageTicket, QueueLimits, QueueStats, TelemetryQueue
from .topics import (
    DEFAULT_API_VERSION,
    DESIRED_PATCH_SUBSCRIBE_TOPIC,
    METHODS_SUBSCRIBE_TOPIC,
    TWIN_RESPONSE_SUBSCRIBE_TOPIC,
    C2DTopic,
    DesiredPatchTopic,
    MethodRequestTopic,
    TwinResponseTopic,
    c2d_subscribe_topic,
    client_id,
    method_response_topic,
    parse_received_topic,
    twin_get_topic,
    twin_patch_reported_topic,
    username,
)
from .tracker import Request, RequestTracker, RetryPolicy
from .twin import decode_json_object, encode_json, validate_reported_patch
from .twin_sync import TwinSync

log = logging.getLogger(__name__)

#: CONNACK return codes that mean "these credentials are refused" (MQTT 3.1.1: 2 identifier
#: rejected, 4 bad user name or password, 5 not authorised). Others (1, 3, socket errors) are
#: retried with back-off.
AUTH_RETURN_CODES = frozenset([2, 4, 5])
#: QoS of control publishes (twin requests, method responses).
CONTROL_QOS = 1

DisconnectReason = Literal["network", "auth", "renewal"]


class ConnectionState(enum.Enum):
    """The connection lifecycle."""

    IDLE = "idle"  # never connected: connect now
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"  # waiting until next_connect_at()
    CLOSED = "closed"  # close() was called
    FAILED = "failed"  # credentials refused too often: see .error


class HubSession:
    """Sans-IO IoT Hub device (or module) session."""

    def __init__(
        self,
        device_id: str,
        *,
        host: str,
        module_id: str | None = None,
        api_version: str = DEFAULT_API_VERSION,
        client_type: str | None = None,
        model_id: str | None = None,
        token_ttl: float = 3600.0,
        renew_margin: float = 0.2,
        queue: QueueLimits | None = None,
        backoff: BackoffPolicy | None = None,
        stable_after: float = 30.0,
        max_auth_failures: int = 3,
        request_timeout: float = 30.0,
        retry: RetryPolicy | None = None,
        twin: bool = True,
        methods: bool = True,
        c2d: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        if not token_ttl > 0 or not 0 < renew_margin < 1:
            raise HubStateError("token_ttl must be positive and renew_margin in (0, 1)")
        if max_auth_failures < 1:
            raise HubStateError("max_auth_failures must be at least 1")
        self.device_id = device_id
        self.module_id = module_id
        self.host = host
        #: MQTT CONNECT client id and user name.
        self.client_id = client_id(device_id, module_id)
        self.username = username(
            host,
            device_id,
            module_id,
            api_version=api_version,
            client_type=client_type,
            model_id=model_id,
        )
        self.token_ttl = float(token_ttl)
        self.renew_margin = float(renew_margin)
        self.stable_after = float(stable_after)
        self.max_auth_failures = max_auth_failures
        self.twin_enabled, self.methods_enabled, self.c2d_enabled = twin, methods, c2d
        # One shared generator by default (a Random is ~2.5 KiB; a fleet has thousands of
        # sessions); tests inject their own.
        self._rng = rng if rng is not None else _SHARED_RNG
        self._backoff = Backoff(backoff, self._rng)
        self._queue = TelemetryQueue(device_id, module_id, queue)
        self._tracker = RequestTracker(request_timeout, retry, self._rng)
        #: The device's copy of its twin.
        self.twin = TwinSync()
        self._state = ConnectionState.IDLE
        self._error: HubAuthError | None = None
        self._connect_at: float | None = None
        self._token_issued_at: float | None = None
        self._renew_at: float | None = None
        self._renewal_signalled = False
        self._connected_at: float | None = None
        self._auth_failures = 0
        self.session_present = False
        self._events: list[Event] = []
        self._token_counter = 0
        self._tokens: dict[int, MessageTicket | None] = {}  # this connection's publishes
        self._control_packets: set[int] = set()
        self._method_rids: set[str] = set()
        self._sync_request: Request | None = None

    # -- views -----------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """Where the connection lifecycle is."""
        return self._state

    @property
    def error(self) -> HubAuthError | None:
        """Why the session failed, once it has."""
        return self._error

    @property
    def stats(self) -> QueueStats:
        """Telemetry counters."""
        return self._queue.stats

    @property
    def auth_failures(self) -> int:
        """Consecutive refusals of the credentials."""
        return self._auth_failures

    @property
    def renew_at(self) -> float | None:
        """When the current connection's token should be replaced (while connecting/connected)."""
        return self._renew_at

    def events(self) -> list[Event]:
        """Drain events produced by calls that do not return them."""
        out, self._events = self._events, []
        return out

    # -- connection lifecycle --------------------------------------------------------------

    def should_connect(self, now: float) -> bool:
        """True when the transport should start a connection attempt now."""
        if self._state is ConnectionState.IDLE:
            return True
        return (
            self._state is ConnectionState.BACKOFF
            and self._connect_at is not None
            and now >= self._connect_at
        )

    def next_connect_at(self) -> float | None:
        """When to connect next while in back-off (None otherwise; in IDLE connect at once)."""
        return self._connect_at if self._state is ConnectionState.BACKOFF else None

    def connect_started(self, now: float) -> None:
        """The transport starts a connection attempt with a token it signs now."""
        if self._state not in (ConnectionState.IDLE, ConnectionState.BACKOFF):
            raise HubStateError(f"connect_started() in state {self._state.value}")
        self._state = ConnectionState.CONNECTING
        self._connect_at = None
        self._token_issued_at = now
        self._renew_at = now + self.token_ttl * (1.0 - self.renew_margin)
        self._renewal_signalled = False

    def connection_made(self, now: float, session_present: bool = False) -> list[Event]:
        """CONNACK accepted. Subscribe to :meth:`subscriptions_needed`, then send
        :meth:`outgoing` (which starts with the twin re-sync GET)."""
        if self._state is not ConnectionState.CONNECTING:
            raise HubStateError(f"connection_made() in state {self._state.value}")
        self._state = ConnectionState.CONNECTED
        self.session_present = bool(session_present)
        self._connected_at = now
        self._auth_failures = 0
        self._tokens.clear()
        self._control_packets.clear()
        if self.twin_enabled:
            self.twin.begin_sync()
            if self._sync_request is None or self._sync_request.done:
                self._sync_request = self._new_request("get", now, internal=True)
        return self._drain()

    def connect_failed(self, now: float, return_code: int | None = None) -> list[Event]:
        """The attempt failed: CONNACK ``return_code``, or None for a network/TLS failure."""
        if self._state is not ConnectionState.CONNECTING:
            raise HubStateError(f"connect_failed() in state {self._state.value}")
        self._renew_at = None
        if return_code in AUTH_RETURN_CODES:
            self._auth_failure(now, return_code)
        else:
            self._retry_later(now)
        return self._drain()

    def connection_lost(self, now: float, reason: DisconnectReason = "network") -> list[Event]:
        """The connection ended. ``reason``: ``"network"`` (anything unexpected), ``"auth"`` (the
        hub closed it over the credentials, e.g. a revoked or expired token) or ``"renewal"`` (the
        transport closed it for :class:`TokenRenewalDue`). Harmless when not connected."""
        if reason not in ("network", "auth", "renewal"):
            raise HubStateError(f"unknown disconnect reason {reason!r}")
        if self._state is ConnectionState.CONNECTING:
            return self.connect_failed(now, 5 if reason == "auth" else None)
        if self._state is not ConnectionState.CONNECTED:
            return self._drain()
        self._renew_at = None
        self._events.extend(self._queue.connection_lost())
        for request, error in self._tracker.connection_lost(now):
            self._request_failed(request, error)
        self._tokens.clear()
        self._control_packets.clear()
        self._method_rids.clear()
        stable = self._connected_at is not None and now - self._connected_at >= self.stable_after
        if reason == "renewal":
            self._backoff.reset()
            self._state = ConnectionState.BACKOFF
            self._connect_at = now
        elif reason == "auth":
            self._auth_failure(now, None)
        else:
            if stable:
                self._backoff.reset()
            self._retry_later(now)
        return self._drain()

    def close(self, now: float) -> list[Event]:
        """Stop for good: no more reconnects; outstanding requests fail. The telemetry queue
        stays readable through :meth:`pending` (for a spool)."""
        if self._state in (ConnectionState.CLOSED, ConnectionState.FAILED):
            return self._drain()
        self._state = ConnectionState.CLOSED
        self._connect_at = self._renew_at = None
        self._events.extend(self._queue.connection_lost())  # in-flight QoS 1 back to pending()
        self._tokens.clear()
        self._control_packets.clear()
        self._method_rids.clear()
        for request, error in self._tracker.fail_all(HubStateError("the session was closed")):
            self._request_failed(request, error)
        return self._drain()

    def subscriptions_needed(self) -> list[tuple[str, int]]:
        """Topic filters and QoS to subscribe to on every new connection (subscribing again is
        harmless, and Azure does not promise to keep subscriptions across connections)."""
        subs: list[tuple[str, int]] = []
        if self.twin_enabled:
            subs.append((TWIN_RESPONSE_SUBSCRIBE_TOPIC, 1))
            subs.append((DESIRED_PATCH_SUBSCRIBE_TOPIC, 1))
        if self.methods_enabled:
            subs.append((METHODS_SUBSCRIBE_TOPIC, 0))
        if self.c2d_enabled and self.module_id is None:
            subs.append((c2d_subscribe_topic(self.device_id), 1))
        return subs

    def token_expiry_due(self, now: float) -> bool:
        """True when connected and the token has reached its renewal point."""
        return (
            self._state is ConnectionState.CONNECTED
            and self._renew_at is not None
            and now >= self._renew_at
        )

    # -- telemetry -------------------------------------------------------------------------

    def send_message(self, message: Message, qos: int, now: float) -> MessageTicket:
        """Accept a telemetry message into the queue; :class:`QueueFullError` if it is full and
        the policy rejects, :class:`HubParseError` if the message is invalid or over 256 KB."""
        self._check_open()
        ticket, dropped = self._queue.add(message, qos, now)
        self._events.extend(dropped)
        return ticket

    def pending(self) -> list[MessageTicket]:
        """Messages not yet done, oldest first: what a transport persists to its spool."""
        return self._queue.pending()

    def restore(
        self, messages: Iterable[Message | tuple[Message, int]], now: float
    ) -> list[MessageTicket]:
        """Re-queue spooled messages (``Message`` means QoS 1, or ``(Message, qos)``), oldest
        first, ahead of anything sent since."""
        self._check_open()
        tickets, dropped = self._queue.restore(messages, now)
        self._events.extend(dropped)
        return tickets

    def outgoing(self, now: float) -> list[OutgoingPublish]:
        """Publishes to send now (twin requests first, then telemetry within the in-flight
        window); empty unless connected."""
        self._events.extend(self._queue.expire(now))
        if self._state is not ConnectionState.CONNECTED:
            return []
        out: list[OutgoingPublish] = []
        for request in self._tracker.take(now):
            out.append(self._publish(request.topic, request.payload, CONTROL_QOS, None))
        for ticket in self._queue.take(now):
            out.append(self._publish(ticket.topic, ticket.message.payload, ticket.qos, ticket))
        return out

    def publish_sent(self, token: int, packet_id: int) -> None:
        """The transport handed the publish with ``token`` to its client as ``packet_id``.
        Tokens of an earlier connection are ignored."""
        if token not in self._tokens:
            return
        ticket = self._tokens.pop(token)
        if ticket is None:
            self._control_packets.add(packet_id)
        else:
            self._events.extend(self._queue.publish_sent(ticket, packet_id))

    def puback(self, packet_id: int) -> list[Event]:
        """The client reports ``packet_id`` done: PUBACK for QoS 1, written for QoS 0."""
        if packet_id in self._control_packets:
            self._control_packets.discard(packet_id)
        else:
            self._events.extend(self._queue.puback(packet_id))
        return self._drain()

    # -- twin and methods ------------------------------------------------------------------

    def get_twin(self, now: float) -> Request:
        """Ask for the whole twin; answered by :class:`TwinResponse` or :class:`RequestFailed`."""
        self._check_twin()
        return self._new_request("get", now)

    def patch_reported(self, patch: dict[str, Any], now: float) -> Request:
        """Send a reported-properties patch (``null`` deletes); checked against Azure's limits
        first (:class:`HubParseError`)."""
        self._check_twin()
        validate_reported_patch(patch)
        return self._new_request("patch", now, patch=patch)

    def method_response(self, rid: str, status: int, payload: bytes = b"") -> OutgoingPublish:
        """The publish answering method call ``rid`` (publish it at once). :class:`HubStateError`
        if ``rid`` is not a call received on the current connection that is still unanswered."""
        if self._state is not ConnectionState.CONNECTED or rid not in self._method_rids:
            raise HubStateError(f"no unanswered method call {rid!r} on the current connection")
        if not isinstance(payload, (bytes, bytearray)):
            raise HubParseError("a method response payload must be bytes")
        topic = method_response_topic(status, rid)
        self._method_rids.discard(rid)
        return self._publish(topic, bytes(payload), CONTROL_QOS, None)

    def receive(self, topic: str, payload: bytes, now: float) -> list[Event]:
        """Handle a message from the hub; bad input gives :class:`ReceiveError`, never raises."""
        try:
            if not isinstance(payload, (bytes, bytearray)):
                raise HubParseError("a payload must be bytes")
            parsed = parse_received_topic(topic)
            body = bytes(payload)
            if isinstance(parsed, TwinResponseTopic):
                self._on_twin_response(parsed, body, now)
            elif isinstance(parsed, DesiredPatchTopic):
                patch = decode_json_object(body)
                self._events.extend(self.twin.on_desired(parsed.version, patch))
            elif isinstance(parsed, MethodRequestTopic):
                self._method_rids.add(parsed.rid)
                self._events.append(MethodRequest(parsed.name, parsed.rid, body))
            elif isinstance(parsed, C2DTopic):
                self._events.append(C2DMessage(parsed.message.with_payload(body)))
        except HubParseError as exc:
            log.warning("ignoring a message the hub sent: %s", exc)
            self._events.append(ReceiveError(topic if isinstance(topic, str) else repr(topic), exc))
        return self._drain()

    # -- timers ----------------------------------------------------------------------------

    def on_timer(self, now: float) -> list[Event]:
        """Handle time-outs, expiries and the token renewal point."""
        self._events.extend(self._queue.expire(now))
        if self._state in (ConnectionState.CLOSED, ConnectionState.FAILED):
            return self._drain()
        for request, error in self._tracker.expire(now):
            self._request_failed(request, error)
        if self.token_expiry_due(now) and not self._renewal_signalled:
            self._renewal_signalled = True
            assert self._renew_at is not None
            log.info("SAS token reaches its renewal point: reconnect with a fresh one")
            self._events.append(TokenRenewalDue(self._renew_at))
        return self._drain()

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` (or, in back-off, a connect) is due next; None if nothing is."""
        if self._state in (ConnectionState.CLOSED, ConnectionState.FAILED):
            return None
        connected = self._state is ConnectionState.CONNECTED
        times = [
            t
            for t in (
                self._connect_at if self._state is ConnectionState.BACKOFF else None,
                self._renew_at if connected and not self._renewal_signalled else None,
                self._tracker.next_deadline(connected),
                self._queue.next_deadline(),
            )
            if t is not None
        ]
        return min(times) if times else None

    # -- internals -------------------------------------------------------------------------

    def _drain(self) -> list[Event]:
        out, self._events = self._events, []
        return out

    def _check_open(self) -> None:
        if self._state is ConnectionState.CLOSED:
            raise HubStateError("the session is closed")
        if self._state is ConnectionState.FAILED:
            raise HubStateError(f"the session failed: {self._error}")

    def _check_twin(self) -> None:
        self._check_open()
        if not self.twin_enabled:
            raise HubStateError("the twin is not enabled in this session")

    def _publish(
        self, topic: str, payload: bytes, qos: int, ticket: MessageTicket | None
    ) -> OutgoingPublish:
        self._token_counter += 1
        self._tokens[self._token_counter] = ticket
        return OutgoingPublish(topic, payload, qos, self._token_counter)

    def _new_request(
        self,
        kind: Literal["get", "patch"],
        now: float,
        *,
        patch: dict[str, Any] | None = None,
        internal: bool = False,
    ) -> Request:
        rid = self._tracker.next_rid()
        if kind == "get":
            topic, payload = twin_get_topic(rid), b""
        else:
            topic, payload = twin_patch_reported_topic(rid), encode_json(patch)
        request = Request(kind, rid, topic, payload, now, internal=internal)
        if patch is not None:
            request.patch = decode_json_object(payload)  # a private copy
        return self._tracker.add(request, now)

    def _on_twin_response(self, parsed: TwinResponseTopic, body: bytes, now: float) -> None:
        request = self._tracker.find(parsed.rid)
        if request is None:
            log.debug("ignoring twin response for unknown rid %r", parsed.rid)
            return
        status = parsed.status
        if 200 <= status < 300:
            if request.kind == "get":
                try:
                    doc = decode_json_object(body)
                except HubParseError as exc:
                    self._tracker.fail(request)
                    self._request_failed(request, exc)
                    return
                self._tracker.complete(request)
                self._events.extend(self.twin.on_twin(doc))
                if not request.internal:
                    self._events.append(TwinResponse(request, status, None, doc))
            else:
                self._tracker.complete(request)
                self.twin.on_reported_ack(request.patch, parsed.version)
                self._events.append(TwinResponse(request, status, parsed.version, None))
            return
        message = body.decode("utf-8", "replace")[:200] or "no message"
        if status == 429 or status >= 500:
            error = self._tracker.retry_or_fail(request, now, status, message)
            if error is not None:
                self._request_failed(request, error)
            return
        self._tracker.fail(request)
        self._request_failed(request, HubRequestError(status, message))

    def _request_failed(self, request: Request, error: HubError) -> None:
        if request is self._sync_request:
            self._sync_request = None
            self._events.extend(self.twin.on_sync_failed())
        self._events.append(RequestFailed(request, error))

    def _retry_later(self, now: float) -> None:
        self._state = ConnectionState.BACKOFF
        self._connect_at = now + self._backoff.next_delay()

    def _auth_failure(self, now: float, return_code: int | None) -> None:
        self._auth_failures += 1
        if self._auth_failures < self.max_auth_failures:
            self._retry_later(now)
            return
        self._state = ConnectionState.FAILED
        self._connect_at = self._renew_at = None
        detail = f"CONNACK {return_code}" if return_code is not None else "connection closed"
        self._error = HubAuthError(
            f"the hub refused the credentials {self._auth_failures} times ({detail})",
            return_code=return_code,
        )
        log.error("%s", self._error)
        self._events.extend(self._queue.connection_lost())
        for request, error in self._tracker.fail_all(self._error):
            self._request_failed(request, error)
        self._events.append(SessionFailed(self._error))
