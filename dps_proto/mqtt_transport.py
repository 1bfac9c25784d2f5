"""DPS over MQTT (TLS, port 8883) on paho-mqtt 2.x: :func:`provision` and :func:`provision_async`.

The transport only moves bytes. Topics, payloads, the SAS password and every retry or poll
decision come from the sans-IO core (:class:`~dps_proto.registration.Registration`); this module
connects, subscribes, publishes what the core asks for, feeds it what arrives, calls its timer,
and reconnects (with a fresh SAS token) when the connection drops mid-registration.

The key, the SAS token and the password are never logged.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from .csr import CSR_API_VERSION, api_version_supports_csr, csr_base64
from .errors import DpsConnectionError, DpsError, ProvisioningTimeout, SasError
from .payloads import RegisterRequest, build_register_payload
from .registration import Assignment, Registration, RetryPolicy
from .sas import DPS_KEY_NAME, Signer, dps_resource_uri
from .sas import generate_sas_token as _generate_sas_token
from .topics import DEFAULT_API_VERSION, RESPONSE_SUBSCRIBE_TOPIC, username
from .transport_support import (
    CONNACK_MEANINGS,
    check_int,
    check_seconds,
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

if TYPE_CHECKING:
    from .paho_asyncio import AsyncioPahoAdapter

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

#: CONNACK meanings as this transport words them (pointing at the DPS credentials).
_CONNACK_MEANINGS = {
    **CONNACK_MEANINGS,
    2: "client identifier (registration id) rejected",
    4: "bad user name or password: check the id scope, registration id and key (bad credentials)",
    5: "not authorized: check the id scope, registration id and key (bad credentials)",
}
#: The same for X.509 devices (the certificate is the credential).
_X509_CONNACK_MEANINGS = {
    **_CONNACK_MEANINGS,
    5: "not authorized: the client certificate was refused (not enrolled, expired, or its CN"
    " is not the registration id)",
}


# -- settings and credentials ---------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """Everything needed to open one DPS connection (validated)."""

    host: str
    port: int
    id_scope: str
    registration_id: str
    #: None with X.509: the TLS client certificate authenticates, the password stays empty.
    signer: Signer | None = dataclasses.field(repr=False)
    ssl_context: ssl.SSLContext = dataclasses.field(repr=False)
    username: str
    token_ttl: int
    keepalive: int
    timeout: float

    def credentials(self, wall_now: float) -> tuple[str, str | None]:
        """CONNECT username and password (a SAS token valid ``token_ttl`` s from ``wall_now``;
        None with X.509)."""
        if self.signer is None:
            return self.username, None
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
    client_cert: str | None = None,
    client_key: str | None = None,
    csr: bytes | str | None = None,
    payload: Any,
    port: int,
    ca_file: str | None,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
    api_version: str | None,
    client_version: str | None,
    token_ttl: int,
    policy: RetryPolicy | None,
    keepalive: int,
) -> tuple[_Settings, Registration]:
    """Check the arguments and build the connection settings and the registration core."""
    version = _api_version(api_version, csr)
    for name, value in (
        ("provisioning_host", provisioning_host),
        ("id_scope", id_scope),
        ("registration_id", registration_id),
        ("api_version", version),
    ):
        check_text(name, value, error=DpsError)
    check_int("port", port, 1, 65535, error=DpsError)
    check_seconds("timeout", timeout, error=DpsError)
    check_seconds("token_ttl", token_ttl, error=DpsError, integer=True)
    check_int("keepalive", keepalive, 1, 65535, error=DpsError)
    require_one(
        {
            "symmetric_key": symmetric_key,
            "group_key": group_key,
            "signer": signer,
            "client_cert": client_cert,
        },
        error=SasError,
    )
    the_signer = make_signer(
        symmetric_key=symmetric_key,
        group_key=group_key,
        registration_id=registration_id,
        signer=signer,
        error=SasError,
    )
    request = RegisterRequest(
        registration_id=registration_id,
        payload=payload,
        csr=None if csr is None else csr_base64(csr),
    )
    build_register_payload(request)  # a payload that is not JSON fails now, not mid-connection
    context = client_ssl_context(
        ca_file,
        ssl_context,
        error=DpsConnectionError,
        client_cert=client_cert,
        client_key=client_key,
    )
    settings = _Settings(
        host=provisioning_host,
        port=port,
        id_scope=id_scope,
        registration_id=registration_id,
        signer=the_signer,
        ssl_context=context,
        username=username(id_scope, registration_id, version, client_version),
        token_ttl=token_ttl,
        keepalive=keepalive,
        timeout=float(timeout),
    )
    return settings, Registration(request, policy=policy)


def _api_version(api_version: str | None, csr: object) -> str:
    """The api-version to use: the caller's, else the default (the CSR preview with ``csr``)."""
    if api_version is None:
        return DEFAULT_API_VERSION if csr is None else CSR_API_VERSION
    if (
        csr is not None
        and isinstance(api_version, str)
        and not api_version_supports_csr(api_version)
    ):
        raise DpsError(f"csr needs api_version {CSR_API_VERSION} or later, not {api_version!r}")
    return api_version


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
            sink(_Connack(generation, connack_code(reason)))

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
            set_nodelay(client)
        except (OSError, ValueError) as exc:
            error = DpsConnectionError(
                connect_error_message(settings.host, settings.port, exc, service="DPS")
            )
            if time.monotonic() >= self.deadline:
                raise self._timeout() from exc
            if not self._ever_connected:
                raise error from exc
            log.warning("%s", error)
            self._schedule_reconnect(time.monotonic(), str(error))

    def _drop_client(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            close_client_sockets(client)

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
            message = connack_message(
                return_code,
                service="DPS",
                host=self.settings.host,
                port=self.settings.port,
                client_id=self.settings.registration_id,
                meanings=_CONNACK_MEANINGS
                if self.settings.signer is not None
                else _X509_CONNACK_MEANINGS,
            )
            raise DpsConnectionError(message, return_code=return_code)
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
            hint = "; was the client certificate refused?" if self.settings.signer is None else ""
            raise DpsConnectionError(
                f"DPS {self.settings.host}:{self.settings.port} closed the connection of"
                f" {self.settings.registration_id!r} before CONNACK ({reason}{hint})"
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
    client_cert: str | None = None,
    client_key: str | None = None,
    csr: bytes | str | None = None,
    payload: Any = None,
    port: int = 8883,
    ca_file: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    api_version: str | None = None,
    client_version: str | None = DEFAULT_CLIENT_VERSION,
    token_ttl: int = 3600,
    policy: RetryPolicy | None = None,
    keepalive: int = 60,
) -> Assignment:
    """Register a device with DPS over MQTT and return its :class:`Assignment` (blocking).

    Exactly one credential: ``symmetric_key`` (individual enrollment, base64), ``group_key``
    (group enrollment; the device key is derived from it) or ``signer`` for SAS tokens, or
    ``client_cert`` for X.509 (a PEM file: the device certificate, then any intermediates, with
    the key in ``client_key`` or in the same file; the password stays empty and the certificate's
    CN must be ``registration_id``). ``payload`` is sent as the custom allocation payload.
    ``csr`` (a PKCS#10 request, DER or PEM; see :mod:`dps_proto.csr`) asks DPS to issue a client
    certificate, returned in :attr:`Assignment.issued_certificate_chain`; it needs api-version
    2025-07-01-preview, the default ``api_version`` then. TLS is always on; ``ca_file`` (or the
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
        client_cert=client_cert,
        client_key=client_key,
        csr=csr,
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
        close_client_sockets(client)


async def provision_async(
    *,
    provisioning_host: str,
    id_scope: str,
    registration_id: str,
    symmetric_key: str | None = None,
    group_key: str | None = None,
    signer: Signer | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    csr: bytes | str | None = None,
    payload: Any = None,
    port: int = 8883,
    ca_file: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    api_version: str | None = None,
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
        client_cert=client_cert,
        client_key=client_key,
        csr=csr,
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
    import asyncio  # only the asyncio path pays for it (the blocking path never loads it)

    from .paho_asyncio import AsyncioPahoAdapter

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
            close_client_sockets(client)
