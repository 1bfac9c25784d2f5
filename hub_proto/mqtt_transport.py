"""IoT Hub over MQTT (TLS, port 8883) on paho-mqtt 2.x: :class:`HubClient`, :class:`AsyncHubClient`.

The transport only moves bytes. Topics, the CONNECT username, telemetry queueing and replay, twin
``$rid`` correlation, SAS renewal and reconnect back-off all come from the sans-IO core
(:class:`~hub_proto.session.HubSession`); this module signs tokens, opens a fresh paho client
(clean session) per connection, subscribes, publishes what the core asks for, reports packet ids
and acknowledgements, feeds it what arrives and calls its timer.

Both clients share one driver that runs on an asyncio event loop, with paho's socket attached
to the loop by :class:`~dps_proto.paho_asyncio.AsyncioPahoAdapter`:

* :class:`AsyncHubClient` runs the driver as a task of the caller's loop: no thread of its own.
  Callbacks run on that loop.
* :class:`HubClient` runs the same driver in one background thread (its own event loop).
  **User callbacks (desired patches, methods, C2D, twin re-syncs) run on that thread**: keep them
  short; they may call ``send_message`` but not the methods that wait for the network
  (``connect``, ``wait_for``, ``get_twin``, ``patch_reported``), which raise
  :class:`~hub_proto.errors.HubStateError` there instead of dead-locking.

Opening a connection (TCP connect and TLS handshake) blocks the driver's loop for at most
:data:`CONNECT_TIMEOUT` seconds. Method handlers and callbacks given to either client may be
coroutine functions; they then run as tasks on the driver's loop.

The key, the SAS token and the password are never logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import inspect
import json
import logging
import math
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from dps_proto.errors import SasError
from dps_proto.paho_asyncio import AsyncioPahoAdapter
from dps_proto.sas import Signer
from dps_proto.transport_support import (
    CONNACK_MEANINGS,
    check_int,
    check_text,
    client_ssl_context,
    close_client_sockets,
    connack_code,
    connack_message,
    connect_error_message,
    make_signer,
    require_one,
    set_nodelay,
)

from .auth import sas_password
from .backoff import BackoffPolicy
from .errors import HubAuthError, HubError, HubParseError, HubStateError, HubTimeout
from .events import (
    C2DMessage,
    DesiredPatch,
    Event,
    MessageDone,
    MethodRequest,
    OutgoingPublish,
    RequestFailed,
    SessionFailed,
    TokenRenewalDue,
    TwinResponse,
    TwinSynced,
)
from .message import Message
from .session import ConnectionState, HubSession
from .spool import Spool, SpooledMessage
from .telemetry import MessageTicket, QueueLimits, QueueStats, TicketState

if TYPE_CHECKING:
    from dps_proto.registration import Assignment

__all__ = [
    "CONNECT_TIMEOUT",
    "DEFAULT_CLIENT_TYPE",
    "AsyncHubClient",
    "DesiredCallback",
    "HubClient",
    "MethodHandler",
]

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(__name__ + ".paho")

DEFAULT_CLIENT_TYPE = "dps-mqtt/0.1.0"
#: Upper bound on one TCP connect + TLS handshake, and on the wait for CONNACK and for SUBACK.
CONNECT_TIMEOUT = 10.0
#: Longest single sleep of the driver, a safety net only: it sleeps until the session's next
#: deadline (or a phase or stop deadline) and is woken at once by any input.
_MAX_SLEEP = 3600.0
#: How long a clean DISCONNECT may take before the socket is simply closed.
_DISCONNECT_WAIT = 1.0
#: Extra time ``close`` gives the driver beyond the flush time-out before giving up on it.
_SHUTDOWN_GRACE = 5.0

#: CONNACK meanings as this client words them (pointing at the hub credentials).
_CONNACK_MEANINGS = {
    **CONNACK_MEANINGS,
    3: "server unavailable (IoT Hub answers this to a disabled device)",
    4: "bad user name or password (check the hub name, device id and key)",
    5: "not authorized (check the hub name, device id and key)",
}

#: ``callback(patch, version)`` for a desired-properties change.
DesiredCallback = Callable[[dict[str, Any], int], object]
#: ``handler(request) -> (status, payload)`` for a direct method (or an awaitable of that).
MethodHandler = Callable[[MethodRequest], object]
_T = TypeVar("_T")
_C = TypeVar("_C", bound="_ClientBase")


class _TimedOut(Exception):
    """A wait for the driver ran out of time (mapped to a typed error by the caller)."""


# -- settings and credentials ---------------------------------------------------------------


def _make_signer(
    symmetric_key: str | None, signer: Signer | None, client_cert: str | None = None
) -> Signer | None:
    """The SAS signer: exactly one of a device key (base64), a signer or (None: X.509) a client
    certificate."""
    require_one(
        {"symmetric_key": symmetric_key, "signer": signer, "client_cert": client_cert},
        error=HubAuthError,
    )
    try:
        return make_signer(symmetric_key=symmetric_key, signer=signer, error=HubAuthError)
    except SasError as exc:
        raise HubAuthError(f"symmetric_key is not usable: {exc}") from exc


def _make_ssl_context(
    ca_file: str | None,
    ssl_context: ssl.SSLContext | None,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> ssl.SSLContext:
    """TLS 1.2+ with certificate and host name checks; ``ssl_context`` wins over ``ca_file``;
    with ``client_cert``, the X.509 client certificate (and ``client_key``) loaded."""
    return client_ssl_context(
        ca_file, ssl_context, error=HubError, client_cert=client_cert, client_key=client_key
    )


#: With X.509 there is no token to renew: the session's token lifetime is set this long.
_X509_TOKEN_TTL = 10 * 365 * 86400


@dataclass(frozen=True)
class _Settings:
    """Everything needed to open one hub connection (validated)."""

    host: str
    port: int
    #: None with X.509 (the TLS client certificate authenticates; no password).
    signer: Signer | None = dataclasses.field(repr=False)
    ssl_context: ssl.SSLContext = dataclasses.field(repr=False)
    keepalive: int
    #: Where the socket connects when it is not ``host`` (see ``address`` of the clients).
    address: str | None = None

    @property
    def target(self) -> str:
        """The name or address the socket connects to (and TLS verifies)."""
        return self.address or self.host


def _method_result(result: object) -> tuple[int, bytes]:
    """A handler's ``(status, payload)``: bytes are sent as they are, None as an empty body,
    anything else as JSON. :class:`HubParseError` for anything else."""
    if not isinstance(result, tuple) or len(result) != 2:
        raise HubParseError("a method handler must return (status, payload)")
    status, payload = result
    if isinstance(status, bool) or not isinstance(status, int):
        raise HubParseError("a method status must be an integer")
    if payload is None:
        return status, b""
    if isinstance(payload, (bytes, bytearray)):
        return status, bytes(payload)
    try:
        return status, json.dumps(payload, separators=(",", ":")).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise HubParseError(f"a method payload must be bytes or JSON-serialisable: {exc}") from exc


def _error_body(message: str) -> bytes:
    return json.dumps({"message": message}).encode("utf-8")


def _fresh(error: HubError) -> HubError:
    """A new exception like ``error`` (raising one instance again and again grows its
    traceback)."""
    if isinstance(error, HubAuthError):
        return HubAuthError(str(error), return_code=error.return_code)
    return error


def _settle(future: concurrent.futures.Future[_T], result: _T | BaseException) -> None:
    """Complete ``future`` unless it already is (e.g. cancelled by an abandoned waiter)."""
    if future.done():
        return
    try:
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


def _done_future(result: _T | BaseException) -> concurrent.futures.Future[_T]:
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()
    _settle(future, result)
    return future


# -- events from paho callbacks -------------------------------------------------------------


@dataclass(slots=True)  # not frozen: built once per packet, frozen costs more
class _Connack:
    generation: int
    return_code: int
    session_present: bool


@dataclass(slots=True)  # not frozen: built once per packet, frozen costs more
class _Suback:
    generation: int
    mid: int
    refused: bool


@dataclass(slots=True)  # not frozen: built once per packet, frozen costs more
class _Incoming:
    generation: int
    topic: str
    payload: bytes


@dataclass(slots=True)  # not frozen: built once per packet, frozen costs more
class _Published:
    generation: int
    mid: int


@dataclass(slots=True)  # not frozen: built once per packet, frozen costs more
class _Disconnect:
    generation: int
    reason: str


_Inbox = Union[_Connack, _Suback, _Incoming, _Published, _Disconnect]


# -- the driver shared by both clients -----------------------------------------------------


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _release(client: mqtt.Client | None, adapter: AsyncioPahoAdapter | None) -> None:
    """Take ``adapter`` off the event loop and close ``client``'s sockets (either may be None)."""
    if adapter is not None:
        adapter.close()
    if client is not None:
        close_client_sockets(client)


class _Driver:
    """Runs a :class:`HubSession` over paho on one asyncio loop (see the module docstring).

    ``lock`` guards the session, the spool and the waiters: user threads take it to accept
    messages and start requests; the loop thread takes it for everything else. The paho client
    is touched only on the loop thread. Connection phases: ``down`` (no client), ``connecting``
    (waiting for CONNACK), ``subscribing`` (waiting for SUBACK), ``ready`` (publishing).
    """

    def __init__(self, settings: _Settings, session: HubSession, spool: Spool | None) -> None:
        self.settings = settings
        self.session = session
        self.spool = spool
        self.lock = threading.RLock()
        self.ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.connection_count = 0
        self.last_error: str | None = None
        self.started = False
        self.finished = False
        #: Why the driver stopped on its own (an unexpected error), if it did.
        self.failure: str | None = None
        self.desired_callbacks: list[DesiredCallback] = []
        self.c2d_callbacks: list[Callable[[Message], object]] = []
        self.synced_callbacks: list[Callable[[TwinSynced], object]] = []
        self.method_handlers: dict[str | None, MethodHandler] = {}
        self._rows: dict[int, int] = {}  # ticket id -> spool row id
        self._ticket_futures: dict[int, concurrent.futures.Future[TicketState]] = {}
        self._request_futures: dict[str, concurrent.futures.Future[TwinResponse]] = {}
        self._deferred: list[Event] = []
        self._inbox: deque[_Inbox] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        #: Set (on the loop thread) when there is work; cleared at the top of each pass.
        self._woken = False
        #: What the sleeping driver awaits (a plain future: no task per sleep).
        self._waiter: asyncio.Future[None] | None = None
        #: A cross-thread wake-up is already scheduled on the loop (saves one per message).
        self._remote_wake_pending = False
        self._client: mqtt.Client | None = None
        self._adapter: AsyncioPahoAdapter | None = None
        self._generation = 0
        self._phase = "down"
        self._phase_deadline: float | None = None
        self._sub_mid: int | None = None
        self._renewal_due = False
        self._stopping = False
        self._stop_deadline = 0.0
        self._tasks: set[asyncio.Task[Any]] = set()
        if spool is not None:
            self._restore(spool.pending())

    # -- views ------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True while a connection is up and subscribed."""
        return self._phase == "ready"

    def on_loop_thread(self) -> bool:
        """True when called from the thread the driver runs on."""
        return self._loop_thread is not None and threading.get_ident() == self._loop_thread

    # -- calls from the clients (any thread) ------------------------------------------------

    def check_usable(self) -> None:
        """Raise the reason the client cannot take work: an auth failure, or closed."""
        error = self.session.error
        if error is not None:
            raise _fresh(error)
        if self._stopping or self.finished or self.session.state is ConnectionState.CLOSED:
            why = f" (its driver failed: {self.failure})" if self.failure else ""
            raise HubStateError(f"the hub client is closed{why}")

    def accept(self, message: Message, qos: int) -> MessageTicket:
        """Queue (and spool) a telemetry message; committed to the spool before returning."""
        with self.lock:
            self.check_usable()
            row = self.spool.add(message, qos, time.time()) if self.spool is not None else None
            try:
                ticket = self.session.send_message(message, qos, time.monotonic())
            except BaseException:
                if row is not None and self.spool is not None:
                    with contextlib.suppress(HubError):
                        self.spool.remove(row)
                raise
            if row is not None:
                self._rows[ticket.id] = row
            self._absorb(self.session.events())
        self.wake()
        return ticket

    def ticket_future(self, ticket: MessageTicket) -> concurrent.futures.Future[TicketState]:
        """Completed with the ticket's final state (or the reason it never will be)."""
        with self.lock:
            if ticket.done:
                return _done_future(ticket.state)
            error = self.session.error
            if error is not None:
                return _done_future(_fresh(error))
            if self.finished or self.session.state is ConnectionState.CLOSED:
                return _done_future(HubStateError("the hub client is closed"))
            future = self._ticket_futures.get(ticket.id)
            if future is None:
                future = self._ticket_futures[ticket.id] = concurrent.futures.Future()
            return future

    def twin_request(
        self, patch: Mapping[str, Any] | None
    ) -> tuple[str, concurrent.futures.Future[TwinResponse]]:
        """Start a twin GET (``patch`` None) or reported patch; its ``$rid`` and answer."""
        with self.lock:
            self.check_usable()
            now = time.monotonic()
            if patch is None:
                request = self.session.get_twin(now)
            else:
                if not isinstance(patch, Mapping):
                    raise HubParseError("a reported patch must be a mapping")
                request = self.session.patch_reported(dict(patch), now)
            future: concurrent.futures.Future[TwinResponse] = concurrent.futures.Future()
            self._request_futures[request.rid] = future
            self._absorb(self.session.events())
        self.wake()
        return request.rid, future

    def forget_request(self, rid: str) -> None:
        """The caller stopped waiting for ``rid``."""
        with self.lock:
            self._request_futures.pop(rid, None)

    def wake(self) -> None:
        """Make the driver look at its work now (thread-safe)."""
        loop = self._loop
        if loop is None:
            return
        if self.on_loop_thread():
            self._wake_now()
            return
        if self._remote_wake_pending:
            return  # the scheduled wake-up runs after this caller's work was queued
        self._remote_wake_pending = True
        try:
            loop.call_soon_threadsafe(self._remote_wake)
        except RuntimeError:  # a closed loop: the driver has finished
            self._remote_wake_pending = False

    def _remote_wake(self) -> None:
        self._remote_wake_pending = False
        self._wake_now()

    def _wake_now(self) -> None:
        """On the loop thread: there is work; end the driver's sleep."""
        self._woken = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def request_stop(self, flush_timeout: float) -> None:
        """Ask the driver to flush (at most ``flush_timeout`` s), disconnect and end."""
        with self.lock:
            if not self._stopping:
                self._stopping = True
                self._stop_deadline = time.monotonic() + max(0.0, flush_timeout)
        self.wake()

    def close_offline(self) -> None:
        """Close a driver that never ran: nothing to disconnect."""
        with self.lock:
            if self.finished:
                return
            self._stopping = True
            self._finish(time.monotonic())

    # -- the loop ---------------------------------------------------------------------------

    async def run(self) -> None:
        """Connect, reconnect, pump and dispatch until :meth:`request_stop`."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        try:
            while True:
                self._woken = False
                now = time.monotonic()
                self._drain_inbox(now)
                if self._renewal_due:
                    await self._renew(now)
                    continue
                self._check_phase_deadline(now)
                if self._stopping and self._may_stop(now):
                    break
                self._tick(now)
                if not self._stopping and self._client is None and self.session.should_connect(now):
                    self._open(now)
                self._flush()
                self._dispatch_deferred()
                if self._inbox or self._renewal_due or self._deferred:
                    continue
                await self._sleep(self._wake_at(time.monotonic()))
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("the hub client's driver failed; closing")
            raise
        finally:
            await self._shutdown()

    async def _sleep(self, until: float) -> None:
        """Sleep until ``until`` (monotonic) or a wake-up: one future and one timer handle."""
        if self._woken:
            return
        loop = self._loop
        assert loop is not None
        waiter: asyncio.Future[None] = loop.create_future()
        handle = loop.call_later(max(0.0, until - time.monotonic()), _resolve, waiter)
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None
            handle.cancel()

    def _wake_at(self, now: float) -> float:
        times = [now + _MAX_SLEEP]
        with self.lock:
            due = self.session.next_deadline()
        if due is not None:
            times.append(due)
        if self._phase in ("connecting", "subscribing") and self._phase_deadline is not None:
            times.append(self._phase_deadline)
        if self._stopping:
            times.append(self._stop_deadline)
        return min(times)

    def _may_stop(self, now: float) -> bool:
        if now >= self._stop_deadline or self._phase != "ready":
            return True
        with self.lock:
            return not self.session.pending()

    def _tick(self, now: float) -> None:
        with self.lock:
            due = self.session.next_deadline()
            if due is not None and now >= due:
                self._absorb(self.session.on_timer(now))

    # -- connections ------------------------------------------------------------------------

    def _new_client(self, generation: int, password: str | None) -> mqtt.Client:
        session = self.session
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=session.client_id,
            clean_session=True,  # the session core replays QoS 1 itself
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.enable_logger(_paho_log)
        client.tls_set_context(self.settings.ssl_context)
        client.username_pw_set(session.username, password)
        client.max_inflight_messages = 0  # the core's queue is the in-flight window
        client.connect_timeout = CONNECT_TIMEOUT
        post = self._post

        def on_connect(
            _client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any
        ) -> None:
            present = bool(getattr(flags, "session_present", False))
            post(_Connack(generation, connack_code(reason), present))

        def on_subscribe(
            _client: mqtt.Client, _userdata: Any, mid: int, reasons: list[Any], _props: Any
        ) -> None:
            refused = any(getattr(code, "is_failure", False) for code in reasons)
            post(_Suback(generation, mid, refused))

        def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            try:
                topic = message.topic
            except UnicodeDecodeError:
                log.debug("dropping a message whose topic is not UTF-8")
                return
            post(_Incoming(generation, topic, bytes(message.payload)))

        def on_publish(
            _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _props: Any
        ) -> None:
            post(_Published(generation, mid))

        def on_disconnect(
            _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
        ) -> None:
            post(_Disconnect(generation, str(reason)))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.on_publish = on_publish
        client.on_disconnect = on_disconnect
        return client

    def _post(self, event: _Inbox) -> None:
        """From paho callbacks (on the loop thread): queue an event and wake the loop."""
        self._inbox.append(event)
        if not self._woken:
            self._wake_now()

    def _open(self, now: float) -> None:
        """Start a connection attempt: fresh token, fresh client, TCP + TLS (blocking)."""
        settings, session = self.settings, self.session
        with self.lock:
            session.connect_started(now)
        password: str | None = None
        try:
            if settings.signer is not None:
                expiry = math.ceil(time.time()) + math.ceil(session.token_ttl)
                password = sas_password(
                    session.host, session.device_id, settings.signer, expiry, session.module_id
                )
        except Exception as exc:  # a signer (e.g. a TPM) may fail in its own ways
            log.error("cannot sign a SAS token for %r: %s", session.client_id, exc)
            self.last_error = f"cannot sign a SAS token: {exc}"
            self._failed_attempt(time.monotonic(), None)
            return
        self._generation += 1
        client = self._new_client(self._generation, password)
        assert self._loop is not None
        adapter = AsyncioPahoAdapter(client, self._loop)
        self._client, self._adapter = client, adapter
        log.info(
            "connecting to hub %s:%d%s as %r%s",
            settings.host,
            settings.port,
            f" via {settings.address}" if settings.address else "",
            session.client_id,
            f" (connection {self.connection_count + 1})" if self.connection_count else "",
        )
        try:
            client.connect(settings.target, settings.port, keepalive=settings.keepalive)
            set_nodelay(client)
        except (OSError, ValueError) as exc:
            self._drop_client()
            self.last_error = connect_error_message(settings.target, settings.port, exc)
            log.warning("%s", self.last_error)
            self._failed_attempt(time.monotonic(), None)
            return
        self._phase = "connecting"
        self._phase_deadline = time.monotonic() + CONNECT_TIMEOUT

    def _failed_attempt(self, now: float, return_code: int | None) -> None:
        with self.lock:
            self._absorb(self.session.connect_failed(now, return_code))
        self._log_retry()

    def _log_retry(self) -> None:
        at = self.session.next_connect_at()
        if at is not None and not self._stopping:
            log.info("reconnecting to the hub in %.1f s", max(0.0, at - time.monotonic()))

    def _detach(self) -> tuple[mqtt.Client | None, AsyncioPahoAdapter | None]:
        """Forget the current client and its adapter (their late events are ignored)."""
        client, adapter = self._client, self._adapter
        self._client = self._adapter = None
        self._generation += 1
        self._phase = "down"
        self._phase_deadline = None
        return client, adapter

    def _drop_client(self) -> None:
        """Forget the current client at once (its socket is closed, its events ignored)."""
        _release(*self._detach())

    async def _retire(self, client: mqtt.Client | None, adapter: AsyncioPahoAdapter | None) -> None:
        """DISCONNECT cleanly (bounded), then release the client."""
        try:
            if client is not None and adapter is not None and client.is_connected():
                await adapter.disconnect(_DISCONNECT_WAIT)
        except OSError:
            log.debug("no clean DISCONNECT", exc_info=True)
        finally:
            _release(client, adapter)

    async def _renew(self, now: float) -> None:
        """Replace the connection: MQTT 3.1.1 cannot re-authenticate a live one."""
        self._renewal_due = False
        client, adapter = self._detach()
        with self.lock:
            self._absorb(self.session.connection_lost(now, "renewal"))
        log.info("SAS token of %r reaches its renewal point: reconnecting", self.session.client_id)
        await self._retire(client, adapter)

    def _check_phase_deadline(self, now: float) -> None:
        if self._phase_deadline is None or now < self._phase_deadline:
            return
        phase = self._phase
        if phase == "connecting":
            self.last_error = f"no CONNACK from {self.settings.host} in {CONNECT_TIMEOUT:g} s"
            log.warning("%s", self.last_error)
            self._drop_client()
            self._failed_attempt(now, None)
        elif phase == "subscribing":
            self.last_error = f"no SUBACK from {self.settings.host} in {CONNECT_TIMEOUT:g} s"
            log.warning("%s", self.last_error)
            self._drop_client()
            with self.lock:
                self._absorb(self.session.connection_lost(now, "network"))
            self._log_retry()

    # -- paho events ------------------------------------------------------------------------

    def _drain_inbox(self, now: float) -> None:
        inbox = self._inbox
        if not inbox:
            return
        with self.lock:  # once for the whole batch (re-entrant for the handlers below)
            while inbox:
                self._handle(inbox.popleft(), now)

    def _handle(self, event: _Inbox, now: float) -> None:
        if isinstance(event, _Published):  # the common case first
            if event.generation == self._generation:
                self._absorb(self.session.puback(event.mid))
            return
        if isinstance(event, _Incoming):
            # Data is data, even from a connection being replaced.
            self._absorb(self.session.receive(event.topic, event.payload, now))
        elif event.generation != self._generation:
            return  # packet ids and state changes of an abandoned client
        elif isinstance(event, _Connack):
            self._on_connack(event, now)
        elif isinstance(event, _Suback):
            self._on_suback(event)
        else:
            self._on_disconnect(event, now)

    def _on_connack(self, event: _Connack, now: float) -> None:
        if self._phase != "connecting" or self._client is None:
            return
        session = self.session
        if event.return_code != 0:
            self.last_error = connack_message(
                event.return_code,
                service="hub",
                host=self.settings.host,
                port=self.settings.port,
                client_id=session.client_id,
                meanings=_CONNACK_MEANINGS,
            )
            log.warning("%s", self.last_error)
            self._drop_client()
            self._failed_attempt(now, event.return_code)
            return
        with self.lock:
            self._absorb(session.connection_made(now, event.session_present))
            subscriptions = session.subscriptions_needed()
        self.connection_count += 1
        log.info(
            "connected to hub %s as %r (connection %d)",
            self.settings.host,
            session.client_id,
            self.connection_count,
        )
        if not subscriptions:
            self._became_ready()
            return
        result, mid = self._client.subscribe(subscriptions)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            log.debug("subscribe failed locally (%s); waiting for the disconnect", result)
            return
        self._sub_mid = mid
        self._phase = "subscribing"
        self._phase_deadline = now + CONNECT_TIMEOUT

    def _on_suback(self, event: _Suback) -> None:
        if self._phase != "subscribing" or event.mid != self._sub_mid:
            return
        if event.refused:
            log.warning("the hub refused some of the subscriptions of %r", self.session.client_id)
        self._became_ready()

    def _became_ready(self) -> None:
        self._phase = "ready"
        self._phase_deadline = None
        self.last_error = None
        _settle(self.ready, None)

    def _on_disconnect(self, event: _Disconnect, now: float) -> None:
        phase = self._phase
        if phase == "down":
            return
        self._drop_client()
        with self.lock:
            if phase == "connecting":
                self.last_error = f"connection closed before CONNACK ({event.reason})"
                self._absorb(self.session.connect_failed(now, None))
            else:
                self.last_error = f"connection lost ({event.reason})"
                self._absorb(self.session.connection_lost(now, "network"))
        log.warning("connection of %r to the hub: %s", self.session.client_id, self.last_error)
        self._log_retry()

    # -- publishing -------------------------------------------------------------------------

    def _flush(self) -> None:
        client = self._client
        if self._phase != "ready" or client is None:
            return
        with self.lock:
            for publish in self.session.outgoing(time.monotonic()):
                self._publish(client, publish)
            self._absorb(self.session.events())

    def _publish(self, client: mqtt.Client, publish: OutgoingPublish) -> None:
        """Hand one publish to paho and tell the session its packet id (under the lock)."""
        try:
            info = client.publish(publish.topic, publish.payload, qos=publish.qos)
        except (ValueError, OSError) as exc:  # the core's checks should make this impossible
            log.error("paho refused a publish to %s: %s", publish.topic, exc)
            return
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.debug("publish to %s not written now (rc %s)", publish.topic, info.rc)
        self.session.publish_sent(publish.token, info.mid)

    # -- events: bookkeeping (under the lock) and callbacks (on the loop, outside it) --------

    def _absorb(self, events: list[Event]) -> None:
        """Settle waiters and the spool for ``events``; keep the rest for the callbacks."""
        done_rows: list[int] = []
        for event in events:
            if isinstance(event, MessageDone):
                ticket = event.ticket
                row = self._rows.pop(ticket.id, None)
                if row is not None:
                    done_rows.append(row)
                future = self._ticket_futures.pop(ticket.id, None)
                if future is not None:
                    _settle(future, ticket.state)
            elif isinstance(event, TwinResponse):
                response_future = self._request_futures.pop(event.request.rid, None)
                if response_future is not None:
                    _settle(response_future, event)
            elif isinstance(event, RequestFailed):
                failed_future = self._request_futures.pop(event.request.rid, None)
                if failed_future is not None:
                    _settle(failed_future, event.error)
                elif not event.request.internal:
                    log.debug(
                        "twin %s %s failed: %s", event.request.kind, event.request.rid, event.error
                    )
            elif isinstance(event, SessionFailed):
                _settle(self.ready, _fresh(event.error))
                futures = list(self._ticket_futures.values())
                self._ticket_futures.clear()
                for future in futures:
                    _settle(future, _fresh(event.error))
            elif isinstance(event, TokenRenewalDue):
                self._renewal_due = True
            elif isinstance(event, (DesiredPatch, C2DMessage, MethodRequest, TwinSynced)):
                self._deferred.append(event)
        if done_rows and self.spool is not None and not self.spool.closed:
            try:
                self.spool.remove(done_rows)
            except HubError as exc:
                log.error("cannot delete delivered messages from the spool: %s", exc)

    def _dispatch_deferred(self) -> None:
        with self.lock:
            events, self._deferred = self._deferred, []
            desired = list(self.desired_callbacks)
            c2d = list(self.c2d_callbacks)
            synced = list(self.synced_callbacks)
        for event in events:
            if isinstance(event, DesiredPatch):
                for callback in desired:
                    self._call_user("desired-properties", callback, event.patch, event.version)
            elif isinstance(event, C2DMessage):
                for c2d_callback in c2d:
                    self._call_user("C2D", c2d_callback, event.message)
            elif isinstance(event, TwinSynced):
                for synced_callback in synced:
                    self._call_user("twin re-sync", synced_callback, event)
            elif isinstance(event, MethodRequest):
                self._call_method(event)

    def _call_user(self, what: str, callback: Callable[..., object], *args: Any) -> None:
        try:
            result = callback(*args)
        except Exception:
            log.exception("a %s callback raised", what)
            return
        if inspect.isawaitable(result):
            self._spawn(self._await_user(what, result))

    async def _await_user(self, what: str, awaitable: Awaitable[object]) -> None:
        try:
            await awaitable
        except Exception:
            log.exception("a %s callback raised", what)

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _call_method(self, request: MethodRequest) -> None:
        with self.lock:
            handler = self.method_handlers.get(request.name, self.method_handlers.get(None))
        if handler is None:
            log.warning("no handler for method %r: answering 404", request.name)
            self._respond(request, 404, _error_body(f"no handler for method {request.name}"))
            return
        try:
            result = handler(request)
        except Exception:
            log.exception("the handler of method %r raised: answering 500", request.name)
            self._respond(request, 500, _error_body("the method handler failed"))
            return
        if inspect.isawaitable(result):
            self._spawn(self._finish_method(request, result))
        else:
            self._respond_with(request, result)

    async def _finish_method(self, request: MethodRequest, awaitable: Awaitable[object]) -> None:
        try:
            result = await awaitable
        except Exception:
            log.exception("the handler of method %r raised: answering 500", request.name)
            self._respond(request, 500, _error_body("the method handler failed"))
            return
        self._respond_with(request, result)

    def _respond_with(self, request: MethodRequest, result: object) -> None:
        try:
            status, body = _method_result(result)
        except HubParseError as exc:
            log.error("the handler of method %r returned %s: answering 500", request.name, exc)
            status, body = 500, _error_body("the method handler failed")
        self._respond(request, status, body)

    def _respond(self, request: MethodRequest, status: int, body: bytes) -> None:
        """Publish the answer to ``request`` on the connection it came on."""
        with self.lock:
            try:
                publish = self.session.method_response(request.rid, status, body)
            except HubParseError as exc:  # e.g. a status beyond 32 bits
                log.error("cannot answer method %r with status %r: %s", request.name, status, exc)
                publish = self.session.method_response(request.rid, 500, b"")
            except HubStateError:
                log.warning("method %r was not answered: its connection is gone", request.name)
                return
            if self._client is not None:
                self._publish(self._client, publish)
            self._absorb(self.session.events())

    # -- spool and shutdown -----------------------------------------------------------------

    def _restore(self, rows: list[SpooledMessage]) -> None:
        if not rows:
            return
        assert self.spool is not None
        now = time.monotonic()
        pairs: list[tuple[MessageTicket, SpooledMessage]] = []
        try:
            tickets = self.session.restore([(row.message, row.qos) for row in rows], now)
            pairs = list(zip(tickets, rows))
        except HubError:
            # One row the session will not take: restore the others one by one (each goes to
            # the front, so newest first keeps the order) and drop the unusable ones.
            bad: list[int] = []
            for row in reversed(rows):
                try:
                    ticket = self.session.restore([(row.message, row.qos)], now)[0]
                except HubError as exc:
                    log.warning("spool: dropping message %d: %s", row.row_id, exc)
                    bad.append(row.row_id)
                    continue
                pairs.append((ticket, row))
            self.spool.remove(bad)
        for ticket, row in pairs:
            self._rows[ticket.id] = row.row_id
        with self.lock:
            self._absorb(self.session.events())
        log.info("restored %d messages from the spool %s", len(pairs), self.spool.path)

    async def _shutdown(self) -> None:
        client, adapter = self._detach()
        with self.lock:
            self._stopping = True
            self._finish(time.monotonic())
        await self._retire(client, adapter)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        log.info("hub client %r closed", self.session.client_id)

    def _finish(self, now: float) -> None:
        """Under the lock: close the session, fail the waiters, keep or report what is left."""
        self._absorb(self.session.close(now))
        self._deferred.clear()
        self.finished = True
        closed = HubStateError("the hub client closed before this was done")
        for ticket_future in self._ticket_futures.values():
            _settle(ticket_future, closed)
        for request_future in self._request_futures.values():
            _settle(request_future, closed)
        self._ticket_futures.clear()
        self._request_futures.clear()
        _settle(self.ready, HubStateError("the hub client was closed"))
        left = len(self.session.pending())
        if self.spool is not None:
            if left:
                log.info("%d undelivered messages stay in the spool %s", left, self.spool.path)
            self.spool.close()
        elif left:
            log.warning("%d accepted messages were not delivered (no spool): dropped", left)


# -- the clients ------------------------------------------------------------------------------


def _as_message(
    message: Message | bytes | bytearray | str, properties: Mapping[str, str] | None
) -> Message:
    if isinstance(message, Message):
        if properties:
            return dataclasses.replace(message, properties={**message.properties, **properties})
        return message
    if isinstance(message, str):
        payload = message.encode("utf-8")
    elif isinstance(message, (bytes, bytearray)):
        payload = bytes(message)
    else:
        raise HubParseError("send_message takes a Message, bytes or str")
    return Message(payload=payload, properties=dict(properties or {}))


class _ClientBase:
    """What both clients share: arguments, registration of callbacks, views."""

    def __init__(
        self,
        host: str,
        device_id: str,
        *,
        symmetric_key: str | None = None,
        signer: Signer | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        module_id: str | None = None,
        port: int = 8883,
        ca_file: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
        token_ttl: int = 3600,
        keepalive: int = 60,
        queue: QueueLimits | None = None,
        spool_path: str | Path | None = None,
        model_id: str | None = None,
        client_type: str | None = DEFAULT_CLIENT_TYPE,
        renew_margin: float = 0.2,
        backoff: BackoffPolicy | None = None,
        max_auth_failures: int = 3,
        request_timeout: float = 30.0,
        address: str | None = None,
        twin: bool = True,
        methods: bool = True,
        c2d: bool = True,
    ) -> None:
        """``host`` is the hub's host name (it goes into the username and the SAS token's
        resource); ``address``, when given, is where the socket connects instead, and what TLS
        then verifies: the analogue of the Azure SDK's ``gateway_hostname``, e.g. an IoT Edge
        gateway or a local emulator whose hub names do not resolve (``address="127.0.0.1"``).

        Credentials: exactly one of ``symmetric_key``, ``signer`` (SAS tokens, renewed by
        reconnecting) or ``client_cert`` (X.509: a PEM file with the device certificate, then
        any intermediates; its key in ``client_key`` or the same file; the password stays empty
        and nothing needs renewing).

        ``twin``, ``methods`` and ``c2d`` (default True) choose what the client subscribes to;
        with ``twin=False`` there is no twin GET at connect (and :meth:`get_twin` /
        :meth:`patch_reported` raise :class:`HubStateError`). Telemetry-only devices save a
        subscription round trip and the twin's memory."""
        check_text("host", host, error=HubError)
        if address is not None:
            check_text("address", address, error=HubError)
        for what, value in (("device id", device_id), ("module id", module_id)):
            if isinstance(value, str) and ("+" in value or "#" in value):
                raise HubError(f"a {what} with '+' or '#' cannot be used in MQTT topics")
        check_int("port", port, 1, 65535, error=HubError)
        check_int("token_ttl", token_ttl, 1, 10 * 365 * 86400, error=HubError)
        check_int("keepalive", keepalive, 1, 65535, error=HubError)
        the_signer = _make_signer(symmetric_key, signer, client_cert)
        context = _make_ssl_context(ca_file, ssl_context, client_cert, client_key)
        session = HubSession(
            device_id,
            host=host,
            module_id=module_id,
            client_type=client_type,
            model_id=model_id,
            token_ttl=float(token_ttl if the_signer is not None else _X509_TOKEN_TTL),
            renew_margin=renew_margin,
            queue=queue,
            backoff=backoff,
            max_auth_failures=max_auth_failures,
            request_timeout=request_timeout,
            twin=twin,
            methods=methods,
            c2d=c2d,
        )
        settings = _Settings(host, port, the_signer, context, keepalive, address)
        spool = Spool(spool_path) if spool_path is not None else None
        try:
            self._driver = _Driver(settings, session, spool)
        except BaseException:
            if spool is not None:
                spool.close()
            raise
        self._closed = False
        self._close_lock = threading.Lock()

    @classmethod
    def from_assignment(
        cls: type[_C],
        assignment: Assignment,
        *,
        symmetric_key: str | None = None,
        signer: Signer | None = None,
        client_cert: str | None = None,
        client_key: str | None = None,
        **kwargs: Any,
    ) -> _C:
        """A client for the hub and device id DPS assigned (other keywords as the constructor,
        e.g. ``address="127.0.0.1"`` when the hub's name does not resolve, as with the
        emulator's several hubs).

        For a certificate DPS issued from a CSR, write :attr:`Assignment.issued_certificate_chain`
        as PEM (:func:`dps_proto.chain_pem`) and pass that file as ``client_cert`` with the CSR's
        key as ``client_key``."""
        return cls(
            assignment.assigned_hub,
            assignment.device_id,
            symmetric_key=symmetric_key,
            signer=signer,
            client_cert=client_cert,
            client_key=client_key,
            **kwargs,
        )

    # -- callbacks --------------------------------------------------------------------------

    def on_desired(self, callback: DesiredCallback) -> None:
        """Call ``callback(patch, version)`` for every desired-properties change newer than the
        twin the device has read (``$version`` removed from ``patch``)."""
        with self._driver.lock:
            self._driver.desired_callbacks.append(callback)

    def on_method(self, name: str | None, handler: MethodHandler) -> None:
        """Answer direct method ``name`` (None: every method without its own handler) with
        ``handler(request) -> (status, payload)``. ``payload`` bytes are sent as they are, None
        as an empty body, anything else as JSON. A handler that raises answers 500 (and logs);
        a method without any handler is answered 404."""
        with self._driver.lock:
            self._driver.method_handlers[name] = handler

    def on_c2d(self, callback: Callable[[Message], object]) -> None:
        """Call ``callback(message)`` for every cloud-to-device message."""
        with self._driver.lock:
            self._driver.c2d_callbacks.append(callback)

    def on_twin_synced(self, callback: Callable[[TwinSynced], object]) -> None:
        """Call ``callback(synced)`` each time the twin is re-read after a connect: desired
        changes made while the device was offline show up here, not in :meth:`on_desired`."""
        with self._driver.lock:
            self._driver.synced_callbacks.append(callback)

    # -- views ------------------------------------------------------------------------------

    @property
    def stats(self) -> QueueStats:
        """A snapshot of the telemetry counters."""
        with self._driver.lock:
            return dataclasses.replace(self._driver.session.stats)

    @property
    def state(self) -> ConnectionState:
        """The session's connection state."""
        return self._driver.session.state

    @property
    def connected(self) -> bool:
        """True while connected and subscribed."""
        return self._driver.connected

    @property
    def connection_count(self) -> int:
        """Connections made so far (each reconnect and SAS renewal adds one)."""
        return self._driver.connection_count

    @property
    def client_id(self) -> str:
        """The MQTT client id (``device`` or ``device/module``)."""
        return self._driver.session.client_id

    def _accept(
        self,
        message: Message | bytes | bytearray | str,
        qos: int,
        properties: Mapping[str, str] | None,
    ) -> MessageTicket:
        return self._driver.accept(_as_message(message, properties), qos)

    def _connect_error(self, timeout: float) -> HubError:
        settings = self._driver.settings
        detail = self._driver.last_error
        via = f" via {settings.address}" if settings.address else ""
        return HubError(
            f"could not connect to the hub {settings.host}:{settings.port}{via} within"
            f" {timeout:g} s" + (f" ({detail})" if detail else "")
        )


class HubClient(_ClientBase):
    """Blocking IoT Hub device (or module) client.

    A background thread runs the network loop and the timers, and **calls the registered
    callbacks** (see the module docstring). ``send_message`` only queues (and spools) and returns
    a :class:`MessageTicket` at once; :meth:`wait_for` waits for its acknowledgement.
    """

    _thread: threading.Thread | None = None

    def connect(self, timeout: float = 30.0) -> None:
        """Start the network thread (once) and wait until the first connection is up and
        subscribed. :class:`HubAuthError` when the hub keeps refusing the credentials,
        :class:`HubError` on time-out (the client keeps trying in the background)."""
        self._no_wait_on_loop("connect")
        driver = self._driver
        with self._close_lock:
            driver.check_usable()
            if self._thread is None:
                driver.started = True
                self._thread = threading.Thread(
                    target=self._thread_main,
                    name=f"hub-mqtt {driver.session.client_id}",
                    daemon=True,
                )
                self._thread.start()
        try:
            _wait(driver.ready, timeout)
        except _TimedOut:
            raise self._connect_error(timeout) from None
        except HubError as exc:
            raise _fresh(exc) from None

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._driver.run())
        except Exception:
            log.exception("the hub client's network thread failed")

    def _no_wait_on_loop(self, what: str) -> None:
        if self._driver.on_loop_thread():
            raise HubStateError(
                f"{what}() waits for the network thread and cannot be called from a callback"
            )

    def _require_started(self) -> None:
        if self._thread is None:
            self._driver.check_usable()
            raise HubStateError("call connect() first")

    def send_message(
        self,
        message: Message | bytes | bytearray | str,
        *,
        qos: int = 1,
        properties: Mapping[str, str] | None = None,
    ) -> MessageTicket:
        """Accept a telemetry message (a :class:`Message`, bytes, or text sent as UTF-8) into
        the bounded queue, and the spool if there is one, without waiting for the network.
        ``properties`` are application properties (merged into a Message's own).
        :class:`QueueFullError` when full, :class:`HubParseError` when invalid."""
        return self._accept(message, qos, properties)

    def wait_for(self, ticket: MessageTicket, timeout: float | None = 30.0) -> TicketState:
        """Wait until ``ticket`` reaches a final state and return it (``ACKNOWLEDGED`` for
        QoS 1, ``SENT`` for QoS 0, or a drop). :class:`HubTimeout` when ``timeout`` runs out."""
        future = self._driver.ticket_future(ticket)
        if not future.done():
            self._no_wait_on_loop("wait_for")
            self._require_started()
        try:
            return _wait(future, timeout)
        except _TimedOut:
            raise HubTimeout(f"message {ticket.id} was not done within {timeout:g} s") from None

    def get_twin(self, timeout: float = 30.0) -> dict[str, Any]:
        """Read the twin: ``{"desired": {...}, "reported": {...}}``.
        :class:`HubRequestError` (or its :class:`HubTimeout`) when it cannot be read."""
        self._no_wait_on_loop("get_twin")
        self._require_started()
        rid, future = self._driver.twin_request(None)
        response = self._twin_wait(rid, future, timeout, "get")
        return response.twin or {}

    def patch_reported(self, patch: Mapping[str, Any], timeout: float = 30.0) -> int:
        """Update reported properties (``None`` deletes a member); the new reported
        ``$version`` (-1 if the hub did not say). Errors as :meth:`get_twin`."""
        self._no_wait_on_loop("patch_reported")
        self._require_started()
        rid, future = self._driver.twin_request(patch)
        response = self._twin_wait(rid, future, timeout, "patch")
        return response.version if response.version is not None else -1

    def _twin_wait(
        self,
        rid: str,
        future: concurrent.futures.Future[TwinResponse],
        timeout: float,
        kind: str,
    ) -> TwinResponse:
        try:
            return _wait(future, timeout)
        except _TimedOut:
            self._driver.forget_request(rid)
            raise HubTimeout(f"twin {kind} {rid} got no answer within {timeout:g} s") from None

    def close(self, timeout: float = 10.0) -> None:
        """Flush (QoS 1 messages in flight and queued, for at most ``timeout`` s while
        connected), disconnect and stop the thread. Idempotent. Undelivered messages stay in
        the spool, if there is one."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
        if thread is None:
            self._driver.close_offline()
            return
        self._driver.request_stop(timeout)
        if thread is threading.current_thread():
            return  # called from a callback: the thread ends once the callback returns
        thread.join(timeout + _SHUTDOWN_GRACE)
        if thread.is_alive():
            log.warning("the hub client's network thread did not stop in time")

    def __enter__(self) -> HubClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncHubClient(_ClientBase):
    """asyncio IoT Hub device (or module) client: paho runs on the caller's event loop through
    :class:`~dps_proto.paho_asyncio.AsyncioPahoAdapter`, no thread. Callbacks run on that loop.
    Use every coroutine of one client from the loop that called :meth:`connect`."""

    _task: asyncio.Task[None] | None = None

    async def connect(self, timeout: float = 30.0) -> None:
        """Start the driver task (once) and wait until the first connection is up and
        subscribed. Errors as :meth:`HubClient.connect`."""
        driver = self._driver
        driver.check_usable()
        if self._task is None:
            driver.started = True
            self._task = asyncio.get_running_loop().create_task(driver.run())
        try:
            await _await(driver.ready, timeout)
        except _TimedOut:
            raise self._connect_error(timeout) from None
        except HubError as exc:
            raise _fresh(exc) from None

    def _require_started(self) -> None:
        if self._task is None:
            self._driver.check_usable()
            raise HubStateError("call connect() first")

    async def send_message(
        self,
        message: Message | bytes | bytearray | str,
        *,
        qos: int = 1,
        properties: Mapping[str, str] | None = None,
    ) -> MessageTicket:
        """As :meth:`HubClient.send_message` (never waits for the network)."""
        return self._accept(message, qos, properties)

    async def wait_for(self, ticket: MessageTicket, timeout: float | None = 30.0) -> TicketState:
        """As :meth:`HubClient.wait_for`."""
        future = self._driver.ticket_future(ticket)
        if not future.done():
            self._require_started()
        try:
            return await _await(future, timeout)
        except _TimedOut:
            raise HubTimeout(f"message {ticket.id} was not done within {timeout:g} s") from None

    async def get_twin(self, timeout: float = 30.0) -> dict[str, Any]:
        """As :meth:`HubClient.get_twin`."""
        self._require_started()
        rid, future = self._driver.twin_request(None)
        response = await self._twin_wait(rid, future, timeout, "get")
        return response.twin or {}

    async def patch_reported(self, patch: Mapping[str, Any], timeout: float = 30.0) -> int:
        """As :meth:`HubClient.patch_reported`."""
        self._require_started()
        rid, future = self._driver.twin_request(patch)
        response = await self._twin_wait(rid, future, timeout, "patch")
        return response.version if response.version is not None else -1

    async def _twin_wait(
        self,
        rid: str,
        future: concurrent.futures.Future[TwinResponse],
        timeout: float,
        kind: str,
    ) -> TwinResponse:
        try:
            return await _await(future, timeout)
        except _TimedOut:
            self._driver.forget_request(rid)
            raise HubTimeout(f"twin {kind} {rid} got no answer within {timeout:g} s") from None

    async def aclose(self, timeout: float = 10.0) -> None:
        """As :meth:`HubClient.close`. Idempotent."""
        if self._closed:
            return
        self._closed = True
        task = self._task
        if task is None:
            self._driver.close_offline()
            return
        self._driver.request_stop(timeout)
        if task is asyncio.current_task():
            return
        done, _ = await asyncio.wait({task}, timeout=timeout + _SHUTDOWN_GRACE)
        if not done:
            log.warning("the hub client's task did not stop in time: cancelling it")
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        elif not task.cancelled() and task.exception() is not None:
            log.error("the hub client's task failed", exc_info=task.exception())

    async def __aenter__(self) -> AsyncHubClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- waiting on the driver's futures ---------------------------------------------------------


def _wait(future: concurrent.futures.Future[_T], timeout: float | None) -> _T:
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        if future.done():
            raise
        raise _TimedOut() from None


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def _await(future: concurrent.futures.Future[_T], timeout: float | None) -> _T:
    """Await a driver future without cancelling it when the wait ends early."""
    wrapped = asyncio.wrap_future(future)
    wrapped.add_done_callback(_retrieve)
    done, _ = await asyncio.wait({wrapped}, timeout=timeout)
    if not done:
        raise _TimedOut()
    return wrapped.result()
