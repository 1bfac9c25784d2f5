"""DPS over HTTPS (port 443) on the standard library's ``http.client``: :func:`provision_https`
and :func:`provision_https_async`.

Azure accepts TPM attestation only over HTTPS (and AMQP), so this transport is the one that can
answer DPS's TPM challenge; symmetric keys (individual or group) and any :class:`Signer` work too.
As with MQTT, every protocol decision (bodies, retries, polls, back-off, the challenge) comes from
the sans-IO core (:class:`~dps_proto.registration.Registration`): this module turns its requests
into ``PUT .../register`` and ``GET .../operations/{id}`` on one keep-alive connection, feeds it
the status, ``Retry-After`` and body of each answer, sleeps until its timer, and reopens the
connection when DPS drops it.

The key, the SAS token and the TPM activation blobs are never logged.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from .attestation import TpmProvider, check_tpm_provider, decode_activation_blob, tpm_attestation
from .csr import CSR_API_VERSION, api_version_supports_csr, csr_base64
from .errors import (
    DpsConnectionError,
    DpsError,
    DpsParseError,
    DpsStateError,
    ProvisioningTimeout,
    SasError,
)
from .payloads import MAX_PAYLOAD_BYTES, RegisterRequest, build_register_payload
from .registration import Assignment, OutgoingPublish, Phase, Registration, RetryPolicy
from .sas import DPS_KEY_NAME, Signer, dps_resource_uri
from .sas import generate_sas_token as _generate_sas_token
from .topics import parse_retry_after
from .transport_support import (
    check_int,
    check_seconds,
    check_text,
    client_ssl_context,
    connect_error_message,
    is_certificate_refusal,
    make_signer,
    require_one,
)

__all__ = [
    "DEFAULT_HTTPS_API_VERSION",
    "DEFAULT_USER_AGENT",
    "MAX_RECONNECTS",
    "MAX_RESPONSE_BYTES",
    "provision_https",
    "provision_https_async",
]

log = logging.getLogger(__name__)

#: The DPS device API version sent as ``api-version`` (the newest GA one).
DEFAULT_HTTPS_API_VERSION = "2021-06-01"
DEFAULT_USER_AGENT = "dps-mqtt/0.1.0"
#: Consecutive failed connections or unanswered requests (connection dropped) before giving up.
MAX_RECONNECTS = 3
#: Wait before reconnect 1, 2, 3 (seconds), always within the caller's overall timeout.
RECONNECT_BACKOFF = (0.5, 1.0, 2.0)
#: Upper bound on one TCP connect + TLS handshake (the overall timeout may cut it shorter).
MAX_CONNECT_TIMEOUT = 10.0
#: A response body larger than this is refused (and no more than this is read).
MAX_RESPONSE_BYTES = MAX_PAYLOAD_BYTES

#: Errors that mean "the server closed the connection" when they hit a reused keep-alive one.
_STALE_ERRORS = (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


class _Cancelled(DpsError):
    """The asyncio caller was cancelled; the worker thread stops at its next chance."""


# -- settings and credentials ---------------------------------------------------------------


def _segment(value: str) -> str:
    """Percent-encode one path segment or query value."""
    return quote(value, safe="")


def _is_header_safe(text: str) -> bool:
    """Printable ASCII only: no CR/LF header injection, nothing http.client would refuse later."""
    return text.isascii() and text.isprintable()


@dataclass(frozen=True)
class _Settings:
    """Everything needed to talk to DPS over HTTPS (validated)."""

    host: str
    port: int
    id_scope: str
    registration_id: str
    signer: Signer | None = dataclasses.field(repr=False)
    tpm: TpmProvider | None = dataclasses.field(repr=False)
    ssl_context: ssl.SSLContext = dataclasses.field(repr=False)
    #: X.509: the TLS client certificate authenticates; requests carry no Authorization header.
    x509: bool
    api_version: str
    user_agent: str | None
    token_ttl: int
    timeout: float

    @property
    def _base(self) -> str:
        return f"/{_segment(self.id_scope)}/registrations/{_segment(self.registration_id)}"

    def register_path(self) -> str:
        """``PUT`` target of a register request."""
        return f"{self._base}/register?api-version={_segment(self.api_version)}"

    def poll_path(self, operation_id: str) -> str:
        """``GET`` target of an operation-status query."""
        return (
            f"{self._base}/operations/{_segment(operation_id)}"
            f"?api-version={_segment(self.api_version)}"
        )


def _settings(
    *,
    provisioning_host: str,
    id_scope: str,
    registration_id: str | None,
    symmetric_key: str | None,
    group_key: str | None,
    signer: Signer | None,
    tpm: TpmProvider | None,
    client_cert: str | None = None,
    client_key: str | None = None,
    csr: bytes | str | None = None,
    payload: Any,
    port: int,
    ca_file: str | None,
    ssl_context: ssl.SSLContext | None,
    timeout: float,
    api_version: str | None,
    user_agent: str | None,
    token_ttl: int,
    policy: RetryPolicy | None,
) -> tuple[_Settings, Registration]:
    """Check the arguments and build the settings and the registration core."""
    if api_version is None:
        api_version = DEFAULT_HTTPS_API_VERSION if csr is None else CSR_API_VERSION
    elif (
        csr is not None
        and isinstance(api_version, str)
        and not api_version_supports_csr(api_version)
    ):
        raise DpsError(f"csr needs api_version {CSR_API_VERSION} or later, not {api_version!r}")
    for name, value in (
        ("provisioning_host", provisioning_host),
        ("id_scope", id_scope),
        ("api_version", api_version),
    ):
        check_text(name, value, error=DpsError)
    if not _is_header_safe(provisioning_host) or any(c in provisioning_host for c in " /?#@"):
        raise DpsError("provisioning_host must be a host name or address")
    if user_agent is not None and (
        not isinstance(user_agent, str) or not _is_header_safe(user_agent)
    ):
        raise DpsError("user_agent must be printable ASCII text or None")
    check_int("port", port, 1, 65535, error=DpsError)
    check_seconds("timeout", timeout, error=DpsError)
    check_seconds("token_ttl", token_ttl, error=DpsError, integer=True)
    require_one(
        {
            "symmetric_key": symmetric_key,
            "group_key": group_key,
            "signer": signer,
            "client_cert": client_cert,
            "tpm": tpm,
        },
        error=SasError,
    )
    provider = check_tpm_provider(tpm) if tpm is not None else None
    if registration_id is None:
        if provider is None:
            raise DpsError("registration_id is required unless tpm is given")
        registration_id = provider.registration_id()
        if not isinstance(registration_id, str) or not registration_id:
            raise DpsError("tpm.registration_id() must return a non-empty string")
    else:
        check_text("registration_id", registration_id, error=DpsError)
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
        tpm=tpm_attestation(provider) if provider is not None else None,
        csr=None if csr is None else csr_base64(csr),
    )
    build_register_payload(request)  # a payload that is not JSON fails now, not mid-connection
    settings = _Settings(
        host=provisioning_host,
        port=port,
        id_scope=id_scope,
        registration_id=registration_id,
        signer=the_signer,
        tpm=provider,
        ssl_context=client_ssl_context(
            ca_file,
            ssl_context,
            error=DpsConnectionError,
            client_cert=client_cert,
            client_key=client_key,
        ),
        x509=client_cert is not None,
        api_version=api_version,
        user_agent=user_agent,
        token_ttl=token_ttl,
        timeout=float(timeout),
    )
    return settings, Registration(request, policy=policy)


def _read_body(response: http.client.HTTPResponse) -> bytes:
    """The response body, refusing (without reading it all) one over :data:`MAX_RESPONSE_BYTES`."""
    if response.length is not None and response.length > MAX_RESPONSE_BYTES:
        raise DpsParseError(
            f"DPS answered with a {response.length}-byte body"
            f" (more than {MAX_RESPONSE_BYTES} bytes)"
        )
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = response.read(MAX_RESPONSE_BYTES + 1 - total)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        total += len(chunk)
        if total > MAX_RESPONSE_BYTES:
            raise DpsParseError(f"DPS answered with a body over {MAX_RESPONSE_BYTES} bytes")


# -- the driver -------------------------------------------------------------------------------


class _Driver:
    """One registration over one (reopened when needed) keep-alive HTTPS connection."""

    def __init__(
        self, settings: _Settings, registration: Registration, stop: threading.Event | None
    ) -> None:
        self.settings = settings
        self.registration = registration
        self._stop = stop
        self.deadline = time.monotonic() + settings.timeout
        self.conn: http.client.HTTPSConnection | None = None
        self.connections = 0  # connections opened, for logs and tests
        self._served = 0  # responses read on the current connection
        self._ever_connected = False
        self._failures = 0  # consecutive dropped connections / failed reconnects
        self._signer = settings.signer
        self._key_name = DPS_KEY_NAME
        self._token: tuple[str, float] | None = None  # token, wall-clock time to renew it
        self._waiting_for = "the connection"

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> Assignment:
        """Register; return the assignment or raise the typed error."""
        settings, registration = self.settings, self.registration
        log.info(
            "registering %r with DPS %s:%d over HTTPS%s",
            settings.registration_id,
            settings.host,
            settings.port,
            " (TPM attestation)" if settings.tpm is not None else "",
        )
        registration.start(time.monotonic())
        while True:
            for message in registration.outgoing():
                answer = self._exchange(message)
                if answer is not None:
                    status, retry_after, body = answer
                    registration.receive_response(
                        message.rid, status, retry_after, body, time.monotonic()
                    )
            if registration.phase is Phase.CHALLENGED:
                self._answer_challenge()
                continue
            if registration.done:
                break
            self._wait_for_timer()
        assignment = registration.result()
        if settings.tpm is not None and assignment.tpm_authentication_key:
            blob = decode_activation_blob(
                assignment.tpm_authentication_key, "registrationState.tpm.authenticationKey"
            )
            log.info("importing the hub key DPS issued to the TPM (%d-byte blob)", len(blob))
            settings.tpm.import_activation_blob(blob)
        return assignment

    def _wait_for_timer(self) -> None:
        registration = self.registration
        due = registration.next_deadline()
        now = time.monotonic()
        wake = self.deadline if due is None else min(due, self.deadline)
        self._waiting_for = (
            "the next request" if registration.phase is Phase.WAITING else "DPS to answer"
        )
        if wake > now:
            self._sleep(wake - now)
        now = time.monotonic()
        if now >= self.deadline:
            raise self._timeout()
        registration.on_timer(now)

    def _answer_challenge(self) -> None:
        """Import DPS's activation blob into the TPM and register again, signed with that key."""
        challenge = self.registration.challenge
        tpm = self.settings.tpm
        if challenge is None or tpm is None:
            raise DpsStateError("a TPM challenge without a TPM")
        blob = decode_activation_blob(
            challenge.authentication_key, "the TPM challenge's authenticationKey"
        )
        log.info(
            "DPS challenged the TPM of %r; importing the activation blob (%d bytes)",
            self.settings.registration_id,
            len(blob),
        )
        self._waiting_for = "the TPM"
        tpm.import_activation_blob(blob)
        signer = tpm.signer()
        if not callable(getattr(signer, "sign", None)):
            raise SasError("tpm.signer() must return an object with a sign(bytes) method")
        self._signer = signer
        self._key_name = challenge.key_name or DPS_KEY_NAME
        self._token = None
        now = time.monotonic()
        if now >= self.deadline:
            raise self._timeout()
        self.registration.challenge_answered(now)

    # -- one request --------------------------------------------------------------------------

    def _exchange(self, message: OutgoingPublish) -> tuple[int, int | None, bytes] | None:
        """Send one request and read its answer: (status, retry-after, body).

        None when the answer did not come within the response timeout: the core's timer then
        decides what to do. Dropped connections are reopened here (a stale keep-alive one at once,
        otherwise with back-off, at most :data:`MAX_RECONNECTS` times in a row).
        """
        settings = self.settings
        if message.kind == "poll" and message.operation_id is not None:
            method, path, body = "GET", settings.poll_path(message.operation_id), None
        else:
            method, path, body = "PUT", settings.register_path(), message.payload
        retried_stale = False
        while True:
            self._check_stop()
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise self._timeout()
            if self.conn is None or self.conn.sock is None:
                try:
                    self._open(remaining)
                except (OSError, ValueError, http.client.HTTPException) as exc:
                    self._close()
                    error = DpsConnectionError(
                        connect_error_message(settings.host, settings.port, exc, service="DPS")
                    )
                    if time.monotonic() >= self.deadline:
                        raise self._timeout() from exc
                    if not self._ever_connected or is_certificate_refusal(exc):
                        raise error from exc
                    self._backoff(str(error))
                    continue
                remaining = self.deadline - time.monotonic()
            reused = self._served > 0
            self._waiting_for = "DPS to answer"
            try:
                return self._request(method, path, body, remaining)
            except DpsParseError:
                self._close()
                raise
            except (OSError, http.client.HTTPException) as exc:
                self._close()
                if settings.x509 and is_certificate_refusal(exc):
                    raise DpsConnectionError(
                        connect_error_message(settings.host, settings.port, exc)
                    ) from exc
                if time.monotonic() >= self.deadline:
                    raise self._timeout() from exc
                if isinstance(exc, (socket.timeout, TimeoutError)):
                    log.info(
                        "no answer from DPS to %s %s within %.0f s",
                        method,
                        path,
                        min(self.registration.policy.response_timeout, remaining),
                    )
                    return None
                if reused and not retried_stale and isinstance(exc, _STALE_ERRORS):
                    # The server closed the idle keep-alive connection: reopen at once, no back-off.
                    log.debug("DPS closed the keep-alive connection (%s); reopening it", exc)
                    retried_stale = True
                    continue
                self._backoff(str(exc) or type(exc).__name__)

    def _open(self, remaining: float) -> None:
        """Open a new TCP + TLS connection."""
        self._close()
        settings = self.settings
        self._waiting_for = "the connection"
        conn = http.client.HTTPSConnection(
            settings.host,
            settings.port,
            timeout=max(0.05, min(remaining, MAX_CONNECT_TIMEOUT)),
            context=settings.ssl_context,
        )
        conn.set_debuglevel(0)  # http.client's debug output would print the Authorization header
        self.conn = conn
        log.info(
            "connecting to DPS %s:%d (HTTPS) for %r%s",
            settings.host,
            settings.port,
            settings.registration_id,
            f" (reconnect {self._failures}/{MAX_RECONNECTS})" if self._failures else "",
        )
        conn.connect()
        self.connections += 1
        self._served = 0
        self._ever_connected = True

    def _request(
        self, method: str, path: str, body: bytes | None, remaining: float
    ) -> tuple[int, int | None, bytes]:
        conn = self.conn
        assert conn is not None and conn.sock is not None
        conn.sock.settimeout(max(0.05, min(self.registration.policy.response_timeout, remaining)))
        headers = {
            "Accept": "application/json",
            "Content-Type": "application/json; charset=utf-8",
        }
        if self.settings.user_agent:
            headers["User-Agent"] = self.settings.user_agent
        authorization = self._authorization()
        if authorization is not None:
            headers["Authorization"] = authorization
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        data = _read_body(response)
        self._served += 1
        self._failures = 0
        retry_after = parse_retry_after(response.getheader("Retry-After"))
        log.debug(
            "%s %s -> %d (%d bytes%s%s)",
            method,
            path,
            response.status,
            len(data),
            f", retry-after {retry_after}" if retry_after is not None else "",
            ", signed" if authorization is not None else ", unsigned",
        )
        return response.status, retry_after, data

    def _authorization(self) -> str | None:
        """The SAS token for the Authorization header (renewed at half its lifetime), or None."""
        if self._signer is None:
            return None
        wall = time.time()
        if self._token is None or wall >= self._token[1]:
            ttl = self.settings.token_ttl
            token = _generate_sas_token(
                dps_resource_uri(self.settings.id_scope, self.settings.registration_id),
                self._signer,
                expiry=int(wall) + ttl,
                key_name=self._key_name,
            )
            self._token = (token, wall + ttl / 2)
        return self._token[0]

    # -- connection upkeep --------------------------------------------------------------------

    def _backoff(self, why: str) -> None:
        """Wait before reopening a dropped connection, or give up after too many in a row."""
        settings = self.settings
        if self._failures >= MAX_RECONNECTS:
            raise DpsConnectionError(
                f"connection to DPS {settings.host}:{settings.port} lost ({why});"
                f" gave up after {MAX_RECONNECTS} reconnects"
            )
        delay = RECONNECT_BACKOFF[min(self._failures, len(RECONNECT_BACKOFF) - 1)]
        self._failures += 1
        log.warning(
            "connection to DPS lost for %r (%s); reconnecting in %.1f s (%d/%d)",
            settings.registration_id,
            why,
            delay,
            self._failures,
            MAX_RECONNECTS,
        )
        self._waiting_for = "a reconnect"
        self._sleep(max(0.0, min(delay, self.deadline - time.monotonic())))

    def _sleep(self, seconds: float) -> None:
        if self._stop is None:
            time.sleep(seconds)
        elif self._stop.wait(seconds):
            raise _Cancelled("provisioning was cancelled")

    def _check_stop(self) -> None:
        if self._stop is not None and self._stop.is_set():
            raise _Cancelled("provisioning was cancelled")

    def _close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        """Close the connection, if any."""
        self._close()

    def _timeout(self) -> ProvisioningTimeout:
        return ProvisioningTimeout(
            f"provisioning of {self.settings.registration_id!r} at {self.settings.host}"
            f" did not finish within {self.settings.timeout:g} s"
            f" (waiting for {self._waiting_for})"
        )


# -- public API ----------------------------------------------------------------------------


def _provision(stop: threading.Event | None, **kwargs: Any) -> Assignment:
    settings, registration = _settings(**kwargs)
    driver = _Driver(settings, registration, stop)
    try:
        return driver.run()
    finally:
        driver.close()


def provision_https(
    *,
    provisioning_host: str,
    id_scope: str,
    registration_id: str | None = None,
    symmetric_key: str | None = None,
    group_key: str | None = None,
    signer: Signer | None = None,
    tpm: TpmProvider | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    csr: bytes | str | None = None,
    payload: Any = None,
    port: int = 443,
    ca_file: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    api_version: str | None = None,
    user_agent: str | None = DEFAULT_USER_AGENT,
    token_ttl: int = 3600,
    policy: RetryPolicy | None = None,
) -> Assignment:
    """Register a device with DPS over HTTPS and return its :class:`Assignment` (blocking).

    Exactly one of ``symmetric_key`` (individual enrollment, base64), ``group_key`` (group
    enrollment; the device key is derived from it), ``signer``, ``client_cert`` (X.509: a PEM
    file with the device certificate first, then any intermediates; its key in ``client_key`` or
    the same file; no Authorization header is sent and ``registration_id``, required, must be
    the certificate's CN) or ``tpm`` gives the credential. ``csr`` (PKCS#10, DER or PEM) asks DPS
    to issue a client certificate (:attr:`Assignment.issued_certificate_chain`); it needs
    api-version 2025-07-01-preview, then the default ``api_version``.
    With ``tpm``, ``registration_id`` defaults to the TPM's, the first register goes out unsigned
    with the EK and SRK, DPS's challenge blob is imported and later requests are signed by the
    TPM; the hub key in the final answer is imported too before this returns. ``payload`` is the
    custom allocation payload. TLS is always on; ``ca_file`` (or the system trust store) or
    ``ssl_context`` decide what server certificate is trusted.

    Raises :class:`~dps_proto.errors.ProvisioningTimeout` after ``timeout`` seconds,
    :class:`~dps_proto.errors.DpsConnectionError` when DPS cannot be reached,
    :class:`~dps_proto.errors.DpsParseError` for an unreadable answer, the registration's own
    typed errors (``DpsServiceError``, ``RegistrationFailed``, ``RegistrationDisabled``) for what
    DPS answered, and the TPM provider's own errors unchanged.
    """
    return _provision(
        None,
        provisioning_host=provisioning_host,
        id_scope=id_scope,
        registration_id=registration_id,
        symmetric_key=symmetric_key,
        group_key=group_key,
        signer=signer,
        tpm=tpm,
        client_cert=client_cert,
        client_key=client_key,
        csr=csr,
        payload=payload,
        port=port,
        ca_file=ca_file,
        ssl_context=ssl_context,
        timeout=timeout,
        api_version=api_version,
        user_agent=user_agent,
        token_ttl=token_ttl,
        policy=policy,
    )


async def provision_https_async(
    *,
    provisioning_host: str,
    id_scope: str,
    registration_id: str | None = None,
    symmetric_key: str | None = None,
    group_key: str | None = None,
    signer: Signer | None = None,
    tpm: TpmProvider | None = None,
    client_cert: str | None = None,
    client_key: str | None = None,
    csr: bytes | str | None = None,
    payload: Any = None,
    port: int = 443,
    ca_file: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = 60.0,
    api_version: str | None = None,
    user_agent: str | None = DEFAULT_USER_AGENT,
    token_ttl: int = 3600,
    policy: RetryPolicy | None = None,
) -> Assignment:
    """:func:`provision_https` for asyncio: the blocking client runs in a worker thread.

    Same arguments, result and errors. If the awaiting task is cancelled, the worker stops at
    its next wait (a request already on the wire finishes or times out first).
    """
    stop = threading.Event()
    try:
        return await asyncio.to_thread(
            _provision,
            stop,
            provisioning_host=provisioning_host,
            id_scope=id_scope,
            registration_id=registration_id,
            symmetric_key=symmetric_key,
            group_key=group_key,
            signer=signer,
            tpm=tpm,
            client_cert=client_cert,
            client_key=client_key,
            csr=csr,
            payload=payload,
            port=port,
            ca_file=ca_file,
            ssl_context=ssl_context,
            timeout=timeout,
            api_version=api_version,
            user_agent=user_agent,
            token_ttl=token_ttl,
            policy=policy,
        )
    finally:
        stop.set()
