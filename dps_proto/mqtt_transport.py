"""DPS over MQTT (TLS, port 8883) on paho-mqtt 2.x: :func:`provision` and :func:`provision_async`.

The transport only moves bytes. Topics, payloads, the SAS password and every retry or poll
decision come from the sans-IO core (:class:`~dps_proto.registration.Registration`); this module
connects, subscribes, publishes what the core asks for, feeds it what arrives, calls its timer,
and reconnects (with a fresh SAS token) when the connection drops mid-registration.

The key, the SAS token and the password are never logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import queue
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .errors import DpsConnectionError, DpsError, ProvisioningTimeout, SasError
from .paho_asyncio import AsyncioPahoAdapter
from .payloads import RegisterRequest, build_register_payload
from .registration import Assignment, Registration, RetryPolicy
from .sas import DPS_KEY_NAME, KeySigner, Signer, derive_device_key, dps_resource_uri
from .sas import generate_sas_token as _generate_sas_token
from .topics import DEFAULT_API_VERSION, RESPONSE_SUBSCRIBE_TOPIC, username

__all__ = ["DEFAULT_CLIENT_VERSION", "MAX_RECONNECTS", "provision", "provision_async"]

log = logging.getLogger(__name__)
_paho_log = logging.getLogger(__name__ + ".paho")

DEFAULT_CLIENT_VERSION = "dps-mqtt/0.1.0"
#: Reconnects allowed after the connection drops mid-registration (each with a fresh SAS token).
MAX_RECONNECTS = 3
#: Wait before reconnect 1, 2, 3 (seconds), always within the caller's overall timeout.
RECONNECT_BACKOFF = (0.5, 1.0, 2.0)
#: Upper bound on one TCP connect + TLS handshake (the overall timeout may cut it shorter).
MAX_CONNECT_TIMEOUT = 10.0
#: Longest single wait in the network loop, so paho's keep-alive bookkeeping keeps running.
_MAX_POLL = 1.0
#: How long a clean DISCONNECT may take before the socket is simply closed.
_DISCONNECT_WAIT = 1.0

#: MQTT 3.1.1 CONNACK return codes, by the name paho 2.x gives them as reason codes.
_CONNACK_CODES = {
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}
_CONNACK_MEANINGS = {
    1: "unacceptable protocol version",
    2: "client identifier (registration id) rejected",
    3: "server unavailable",
    4: "bad user name or password: check the id scope, registration id and key (bad credentials)",
    5: "not authorized: check the id scope, registration id and key (bad credentials)",
}


# -- settings and credentials ---------------------------------------------------------------


def _make_signer(
    registration_id: str,
    symmetric_key: str | None,
    group_key: str | None,
    signer: Signer | None,
) -> Signer:
    """The signer for the SAS password: exactly one of an individual key, a group key, a signer."""
    given = [
        name
        for name, value in (
            ("symmetric_key", symmetric_key),
            ("group_key", group_key),
            ("signer", signer),
        )
        if value is not None
    ]
    if len(given) != 1:
        raise SasError(
            "give exactly one of symmetric_key, group_key or signer"
            + (f" (got {', '.join(given)})" if given else "")
        )
    if signer is not None:
        if not callable(getattr(signer, "sign", None)):
            raise SasError("signer must have a sign(bytes) -> bytes method")
        return signer
    if group_key is not None:
        return KeySigner.from_base64(derive_device_key(group_key, registration_id))
    assert symmetric_key is not None
    return KeySigner.from_base64(symmetric_key)


class _ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho 2.x does not close the socket when ``do_handshake`` raises (a wrong CA, a host name
    mismatch), leaving it to the garbage collector; this closes it at once.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def _make_ssl_context(ca_file: str | None, ssl_context: ssl.SSLContext | None) -> ssl.SSLContext:
    """TLS 1.2+ with certificate and host name checks; ``ssl_context`` wins over ``ca_file``."""
    if ssl_context is not None:
        return ssl_context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.sslsocket_class = _ClosingSSLSocket
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise DpsConnectionError(f"cannot load CA certificates from {ca_file!r}: {exc}") from exc
    return context


@dataclass(frozen=True)
class _Settings:
    """Everything needed to open one DPS connection (validated)."""

    host: str
    port: int
    id_scope: str
    registration_id: str
    signer: Signer = dataclasses.field(repr=False)
    ssl_context: ssl.SSLContext = dataclasses.field(repr=False)
    username: str
    token_ttl: int
    keepalive: int
    timeout: float

    def credentials(self, wall_now: float) -> tuple[str, str]:
        """CONNECT username and password (a SAS token valid ``token_ttl`` s from ``wall_now``)."""
        password = _generate_sas_token(
            dps_resource_uri(self.id_scope, self.registration_id),
            self.signer,
            expiry=int(wall_now) + self.token_ttl,
            key_name=DPS_KEY_NAME,
        )
        return self.username, password


def _settings(
    *,
    provisioning_host: str,
    id_scope: str,
    registration_id: str,
    symmetric_key: str | None,
    group_key: str | None,
    signer: Signer | None,
    payload: Any,
    port: int,
    ca_file: str | None,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
    api_version: str,
    client_version: str | None,
    token_ttl: int,
    policy: RetryPolicy | None,
    keepalive: int,
) -> tuple[_Settings, Registration]:
    """Check the arguments and build the connection settings and the registration core."""
    for name, value in (
        ("provisioning_host", provisioning_host),
        ("id_scope", id_scope),
        ("registration_id", registration_id),
        ("api_version", api_version),
    ):
        if not isinstance(value, str) or not value:
            raise DpsError(f"{name} must be a non-empty string")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
        raise DpsError("port must be an integer in 1..65535")
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, (int, float))
        or not (timeout > 0 and math.isfinite(timeout))
    ):
        raise DpsError("timeout must be a positive number of seconds")
    if isinstance(token_ttl, bool) or not isinstance(token_ttl, int) or token_ttl <= 0:
        raise DpsError("token_ttl must be a positive number of seconds")
    if isinstance(keepalive, bool) or not isinstance(keepalive, int) or not 0 < keepalive < 65536:
        raise DpsError("keepalive must be an integer in 1..65535")
    the_signer = _make_signer(registration_id, symmetric_key, group_key, signer)
    request = RegisterRequest(registration_id=registration_id, payload=payload)
    build_register_payload(request)  # a payload that is not JSON fails now, not mid-connection
    settings = _Settings(
        host=provisioning_host,
        port=port,
        id_scope=id_scope,
        registration_id=registration_id,
        signer=the_signer,
        ssl_context=_make_ssl_context(ca_file, ssl_context),
        username=username(id_scope, registration_id, api_version, client_version),
        token_ttl=token_ttl,
        keepalive=keepalive,
        timeout=float(timeout),
    )
    return settings, Registration(request, policy=policy)


# -- events from paho callbacks -------------------------------------------------------------


@dataclass(frozen=True)
class _Connack:
    generation: int
    return_code: int  # MQTT 3.1.1 CONNACK return code; 0 is accepted


@dataclass(frozen=True)
class _Suback:
    generation: int
    mid: int
    refused: bool


@dataclass(frozen=True)
class _Message:
    generation: int
    topic: str
    payload: bytes


@dataclass(frozen=True)
class _Disconnect:
    generation: int
    reason: str


_Event = Union[_Connack, _Suback, _Message, _Disconnect]


def _connack_code(reason: Any) -> int:
    """The MQTT 3.1.1 return code behind paho 2.x's CONNACK reason code."""
    if not getattr(reason, "is_failure", False):
        return 0
    name = reason.getName() if hasattr(reason, "getName") else str(reason)
    return _CONNACK_CODES.get(str(name), 255)


def _connect_error(settings: _Settings, exc: BaseException) -> DpsConnectionError:
    """A :class:`DpsConnectionError` saying why the TCP/TLS connection could not be opened."""
    where = f"{settings.host}:{settings.port}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        detail = exc.verify_message or str(exc)
        message = f"TLS certificate verification failed for {where}: {detail}"
    elif isinstance(exc, ssl.SSLError):
        message = f"TLS handshake with {where} failed: {exc}"
    elif isinstance(exc, ConnectionRefusedError):
        message = f"connection to {where} refused (is DPS listening there?)"
    elif isinstance(exc, socket.gaierror):
        message = f"cannot resolve {settings.host!r}: {exc}"
    elif isinstance(exc, TimeoutError):
        message = f"timed out connecting to {where}"
    else:
        message = f"cannot connect to {where}: {exc}"
    return DpsConnectionError(message)


def _close_client_sockets(client: mqtt.Client) -> None:
    """Close whatever sockets the client still holds, now rather than at garbage collection.

    ``Client.loop()`` opens a wake-up socket pair that paho closes only in ``__del__``; its
    ``_reset_sockets`` closes the network socket and that pair (and is what ``__del__`` calls).
    """
    reset = getattr(client, "_reset_sockets", None)
    if callable(reset):
        try:
            reset()
        except OSError:
            log.debug("error closing the MQTT sockets", exc_info=True)


# -- the driver shared by the blocking and the asyncio transport ------------------------------


class _Driver:
    """Connection handling around a :class:`Registration`; the caller runs the network loop.

    Phases: ``connecting`` (waiting for CONNACK), ``subscribing`` (waiting for SUBACK),
    ``running`` (the registration is talking to DPS), ``backoff`` (waiting to reconnect).
    """

    def __init__(
        self,
        settings: _Settings,
        registration: Registration,
        sink: Callable[[_Event], None],
        attach: Callable[[mqtt.Client], None] | None = None,
    ) -> None:
        self.settings = settings
        self.registration = registration
        self._sink = sink
        self._attach = attach
        self.deadline = time.monotonic() + settings.timeout
        self.client: mqtt.Client | None = None
        self.phase = "idle"
        self.generation = 0
        self.reconnects = 0
        self.reconnect_at: float | None = None
        self._sub_mid: int | None = None
        self._started = False
        self._ever_connected = False

    # -- connection ---------------------------------------------------------------------------

    def _new_client(self, generation: int) -> mqtt.Client:
        settings = self.settings
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.registration_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.enable_logger(_paho_log)
        client.tls_set_context(settings.ssl_context)
        user, password = settings.credentials(time.time())
        client.username_pw_set(user, password)
        sink = self._sink

        def on_connect(
            _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
        ) -> None:
            sink(_Connack(generation, _connack_code(reason)))

        def on_subscribe(
            _client: mqtt.Client, _userdata: Any, mid: int, reasons: list[Any], _props: Any
        ) -> None:
            refused = any(getattr(code, "is_failure", False) for code in reasons)
            sink(_Suback(generation, mid, refused))

        def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
            try:
                topic = message.topic
            except UnicodeDecodeError:
                log.debug("dropping a message whose topic is not UTF-8")
                return
            sink(_Message(generation, topic, bytes(message.payload)))

        def on_disconnect(
            _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any
        ) -> None:
            sink(_Disconnect(generation, str(reason)))

        client.on_connect = on_connect
        client.on_subscribe = on_subscribe
        client.on_message = on_message
        client.on_disconnect = on_disconnect
        return client

    def connect(self) -> None:
        """Open a new connection (blocking TCP + TLS handshake) with a fresh SAS token."""
        self._drop_client()
        now = time.monotonic()
        remaining = self.deadline - now
        if remaining <= 0:
            raise self._timeout()
        self.generation += 1
        client = self._new_client(self.generation)
        client.connect_timeout = max(0.05, min(remaining, MAX_CONNECT_TIMEOUT))
        if self._attach is not None:
            self._attach(client)
        self.client = client
        self.phase = "connecting"
        self.reconnect_at = None
        settings = self.settings
        log.info(
            "connecting to DPS %s:%d as %r%s",
            settings.host,
            settings.port,
            settings.registration_id,
            f" (reconnect {self.reconnects}/{MAX_RECONNECTS})" if self.reconnects else "",
        )
        try:
            client.connect(settings.host, settings.port, keepalive=settings.keepalive)
        except (OSError, ValueError) as exc:
            error = _connect_error(settings, exc)
            if time.monotonic() >= self.deadline:
                raise self._timeout() from exc
            if not self._ever_connected:
                raise error from exc
            log.warning("%s", error)
            self._schedule_reconnect(time.monotonic(), str(error))

    def _drop_client(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            _close_client_sockets(client)

    def _schedule_reconnect(self, now: float, why: str) -> None:
        if self.reconnects >= MAX_RECONNECTS:
            raise DpsConnectionError(
                f"connection to DPS {self.settings.host}:{self.settings.port} lost ({why});"
                f" gave up after {MAX_RECONNECTS} reconnects"
            )
        delay = RECONNECT_BACKOFF[min(self.reconnects, len(RECONNECT_BACKOFF) - 1)]
        self.reconnects += 1
        self.phase = "backoff"
        self.reconnect_at = now + delay
        log.warning(
            "connection to DPS lost for %r (%s); reconnecting in %.1f s (%d/%d)",
            self.settings.registration_id,
            why,
            delay,
            self.reconnects,
            MAX_RECONNECTS,
        )

    # -- events and timers ---------------------------------------------------------------------

    def handle(self, event: _Event, now: float) -> None:
        """Act on one paho event; raises the final error when the connection cannot go on."""
        if event.generation != self.generation or self.client is None:
            return  # from a connection already given up
        if isinstance(event, _Connack):
            self._on_connack(event.return_code)
        elif isinstance(event, _Suback):
            self._on_suback(event, now)
        elif isinstance(event, _Message):
            if self.phase == "running" and self.registration.receive(
                event.topic, event.payload, now
            ):
                self._flush()
        else:
            self._on_disconnect(event.reason, now)

    def _on_connack(self, return_code: int) -> None:
        if self.phase != "connecting":
            return
        if return_code != 0:
            meaning = _CONNACK_MEANINGS.get(return_code, "unknown reason")
            raise DpsConnectionError(
                f"DPS {self.settings.host}:{self.settings.port} refused the connection of"
                f" {self.settings.registration_id!r}: {meaning}"
                f" (CONNACK return code {return_code})",
                return_code=return_code,
            )
        assert self.client is not None
        self._ever_connected = True
        result, mid = self.client.subscribe(RESPONSE_SUBSCRIBE_TOPIC, qos=1)
        if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
            log.debug("subscribe failed locally (%s); waiting for the disconnect", result)
            return
        self._sub_mid = mid
        self.phase = "subscribing"
        log.debug("connected; subscribing to %s", RESPONSE_SUBSCRIBE_TOPIC)

    def _on_suback(self, event: _Suback, now: float) -> None:
        if self.phase != "subscribing" or event.mid != self._sub_mid:
            return
        if event.refused:
            raise DpsConnectionError(
                f"DPS refused the subscription to {RESPONSE_SUBSCRIBE_TOPIC}"
                f" for {self.settings.registration_id!r}"
            )
        self.phase = "running"
        if not self._started:
            self._started = True
            self.registration.start(now)
        elif not self.registration.done:
            self.registration.retry_now(now)
        self._flush()

    def _on_disconnect(self, reason: str, now: float) -> None:
        if self.registration.done:
            return
        phase = self.phase
        if phase == "backoff":
            return
        self._drop_client()
        if phase == "connecting" and not self._ever_connected:
            raise DpsConnectionError(
                f"DPS {self.settings.host}:{self.settings.port} closed the connection of"
                f" {self.settings.registration_id!r} before CONNACK ({reason})"
            )
        self._schedule_reconnect(now, reason)

    def tick(self, now: float) -> None:
        """Handle what is due at ``now``: the overall timeout, a reconnect, the core's timer."""
        if now >= self.deadline:
            raise self._timeout()
        if self.phase == "backoff":
            if self.reconnect_at is not None and now >= self.reconnect_at:
                self.connect()
            return
        if self.phase != "running":
            return
        due = self.registration.next_deadline()
        if due is not None and now >= due:
            self.registration.on_timer(now)
            self._flush()

    def wake_at(self) -> float:
        """When :meth:`tick` must run next (monotonic)."""
        when = self.deadline
        if self.phase == "backoff" and self.reconnect_at is not None:
            when = min(when, self.reconnect_at)
        elif self.phase == "running":
            due = self.registration.next_deadline()
            if due is not None:
                when = min(when, due)
        return when

    def _flush(self) -> None:
        client = self.client
        for message in self.registration.outgoing():
            if client is None:
                continue
            info = client.publish(message.topic, message.payload, qos=1)
            log.debug(
                "published %s (%d bytes, rc %s)", message.topic, len(message.payload), info.rc
            )

    @property
    def done(self) -> bool:
        """True once the registration has an assignment or a final error."""
        return self.registration.done

    def result(self) -> Assignment:
        """The assignment, or the registration's typed error."""
        return self.registration.result()

    def _timeout(self) -> ProvisioningTimeout:
        waiting_for = {
            "idle": "the connection",
            "connecting": "CONNACK",
            "subscribing": "SUBACK",
            "running": "DPS to answer",
            "backoff": "a reconnect",
        }.get(self.phase, self.phase)
        return ProvisioningTimeout(
            f"provisioning of {self.settings.registration_id!r} at {self.settings.host}"
            f" did not finish within {self.settings.timeout:g} s (waiting for {waiting_for})"
        )


# -- public API ----------------------------------------------------------------------------


def provision(
    *,
    provisioning_host: str,
    id_scope: str,
    registration_id: str,
    symmetric_key: str | None = None,
    group_key: str | None = None,
    signer: Signer | None = None,
    payload: Any = None,
    port: int = 8883,
    ca_file: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    api_version: str = DEFAULT_API_VERSION,
    client_version: str | None = DEFAULT_CLIENT_VERSION,
    token_ttl: int = 3600,
    policy: RetryPolicy | None = None,
    keepalive: int = 60,
) -> Assignment:
    """Register a device with DPS over MQTT and return its :class:`Assignment` (blocking).

    Exactly one of ``symmetric_key`` (individual enrollment, base64), ``group_key`` (group
    enrollment; the device key is derived from it) or ``signer`` gives the SAS credential.
    ``payload`` is sent as the custom allocation payload. TLS is always on; ``ca_file`` (or the
    system trust store) or ``ssl_context`` decide what server certificate is trusted.

    Raises :class:`~dps_proto.errors.ProvisioningTimeout` after ``timeout`` seconds,
    :class:`~dps_proto.errors.DpsConnectionError` when DPS cannot be reached or refuses the
    connection, and the registration's own typed errors (``DpsServiceError``,
    ``RegistrationFailed``, ``RegistrationDisabled``) for what DPS answered.
    """
    settings, registration = _settings(
        provisioning_host=provisioning_host,
        id_scope=id_scope,
        registration_id=registration_id,
        symmetric_key=symmetric_key,
        group_key=group_key,
        signer=signer,
        payload=payload,
        port=port,
        ca_file=ca_file,
        ssl_context=ssl_context,
        timeout=timeout,
        api_version=api_version,
        client_version=client_version,
        token_ttl=token_ttl,
        policy=policy,
        keepalive=keepalive,
    )
    events: queue.SimpleQueue[_Event] = queue.SimpleQueue()
    driver = _Driver(settings, registration, events.put)
    try:
        driver.connect()
        while True:
            while True:
                try:
                    event = events.get_nowait()
                except queue.Empty:
                    break
                driver.handle(event, time.monotonic())
                if driver.done:
                    return driver.result()
            driver.tick(time.monotonic())
            if driver.done:
                return driver.result()
            wait = min(_MAX_POLL, max(0.0, driver.wake_at() - time.monotonic()))
            client = driver.client
            if client is not None and client.socket() is not None:
                client.loop(timeout=wait)
            elif events.empty():
                time.sleep(wait)
    finally:
        _shutdown_blocking(driver)


def _shutdown_blocking(driver: _Driver) -> None:
    client, driver.client = driver.client, None
    if client is None:
        return
    try:
        if client.socket() is not None and client.is_connected():
            # Without a loop thread or socket callbacks, paho writes the DISCONNECT at once.
            client.disconnect()
    except OSError:
        log.debug("error sending DISCONNECT", exc_info=True)
    finally:
        _close_client_sockets(client)


async def provision_async(
    *,
    provisioning_host: str,
    id_scope: str,
    registration_id: str,
    symmetric_key: str | None = None,
    group_key: str | None = None,
    signer: Signer | None = None,
    payload: Any = None,
    port: int = 8883,
    ca_file: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    api_version: str = DEFAULT_API_VERSION,
    client_version: str | None = DEFAULT_CLIENT_VERSION,
    token_ttl: int = 3600,
    policy: RetryPolicy | None = None,
    keepalive: int = 60,
) -> Assignment:
    """:func:`provision` for asyncio: paho is driven by the running event loop, no thread.

    Same arguments, result and errors as :func:`provision`. The TCP connect and TLS handshake
    are blocking (at most ``min(timeout, 10 s)``); everything after runs on the event loop.
    """
    settings, registration = _settings(
        provisioning_host=provisioning_host,
        id_scope=id_scope,
        registration_id=registration_id,
        symmetric_key=symmetric_key,
        group_key=group_key,
        signer=signer,
        payload=payload,
        port=port,
        ca_file=ca_file,
        ssl_context=ssl_context,
        timeout=timeout,
        api_version=api_version,
        client_version=client_version,
        token_ttl=token_ttl,
        policy=policy,
        keepalive=keepalive,
    )
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[_Event] = asyncio.Queue()
    adapters: list[AsyncioPahoAdapter] = []

    def attach(client: mqtt.Client) -> None:
        for old in adapters:
            old.close()
        adapters[:] = [AsyncioPahoAdapter(client, loop)]

    driver = _Driver(settings, registration, events.put_nowait, attach)
    try:
        driver.connect()
        while True:
            while not events.empty():
                driver.handle(events.get_nowait(), time.monotonic())
                if driver.done:
                    return driver.result()
            driver.tick(time.monotonic())
            if driver.done:
                return driver.result()
            if not events.empty():
                continue
            wait = max(0.0, driver.wake_at() - time.monotonic())
            try:
                event = await asyncio.wait_for(events.get(), wait)
            except asyncio.TimeoutError:
                continue
            driver.handle(event, time.monotonic())
            if driver.done:
                return driver.result()
    finally:
        await _shutdown_async(driver, adapters)


async def _shutdown_async(driver: _Driver, adapters: list[AsyncioPahoAdapter]) -> None:
    client, driver.client = driver.client, None
    try:
        if client is not None and adapters and client.is_connected():
            await adapters[-1].disconnect(_DISCONNECT_WAIT)
    except OSError:
        log.debug("no clean DISCONNECT", exc_info=True)
    finally:
        for adapter in adapters:
            adapter.close()
        if client is not None:
            _close_client_sockets(client)
