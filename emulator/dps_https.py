"""DPS's HTTPS runtime API (the path Azure offers for TPM attestation), in front of DpsService.

``PUT /{idScope}/registrations/{id}/register`` and ``GET /{idScope}/registrations/{id}/operations/
{operationId}``, TLS with the emulator's certificate. Requests are handed to the DPS service on the
emulator's event loop, so MQTT and HTTPS devices share one consistent state.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from .client_trust import peer_chain as tls_peer_chain
from .dps_service import (
    MAX_DPS_PAYLOAD,
    Answer,
    ConnectRefused,
    DpsIdentity,
    DpsService,
)
from .models import utc_now_iso

log = logging.getLogger(__name__)

ERROR_UNAUTHORIZED = 401002
#: What Azure's DPS says when it refuses an X.509 device's certificate (errorCode 401002).
INVALID_CERTIFICATE = "Invalid certificate."
ERROR_NOT_FOUND = 404001
ERROR_BAD_REQUEST = 400004
#: Idle or slow clients are dropped after this many seconds.
SOCKET_TIMEOUT = 10.0


class DpsHttpsServer:
    """A threaded HTTPS server for the DPS device API."""

    def __init__(
        self,
        service: DpsService,
        ssl_context: ssl.SSLContext,
        run_on_loop: Callable[[Callable[[], Answer]], Answer],
        clock: Callable[[], float],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        handler = _make_handler(service, run_on_loop, clock)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._server.socket = ssl_context.wrap_socket(
            self._server.socket, server_side=True, do_handshake_on_connect=False
        )
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="dps-https", daemon=True
        )

    @property
    def port(self) -> int:
        """The port it listens on."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5.0)


def _make_handler(
    service: DpsService,
    run_on_loop: Callable[[Callable[[], Answer]], Answer],
    clock: Callable[[], float],
) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        """One request of the DPS runtime API."""

        server_version = "dps-mqtt-emulator"
        protocol_version = "HTTP/1.1"
        # Headers and body are separate writes: without this each answer waits ~40 ms (Nagle).
        disable_nagle_algorithm = True
        timeout = SOCKET_TIMEOUT

        #: The TLS client certificate chain (DER, leaf first) of this connection, if any.
        peer_chain: tuple[bytes, ...] = ()

        #: False when the TLS handshake failed (e.g. a client certificate from an unknown CA).
        tls_ok = True

        def setup(self) -> None:
            super().setup()
            sock = self.request
            if isinstance(sock, ssl.SSLSocket):
                try:
                    sock.do_handshake()
                except (ssl.SSLError, OSError) as exc:
                    log.info("%s: TLS handshake failed: %s", self.address_string(), exc)
                    self.tls_ok = False
                    return
                self.peer_chain = tls_peer_chain(sock)

        def handle(self) -> None:
            if self.tls_ok:
                super().handle()

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("%s %s", self.address_string(), format % args)

        def do_PUT(self) -> None:
            self._dispatch("PUT")

        def do_GET(self) -> None:
            self._dispatch("GET")

        def _dispatch(self, method: str) -> None:
            try:
                answer = self._route(method)
            except Exception:
                log.exception("DPS HTTPS request failed")
                answer = _error(500, 500000, "internal error", clock())
            self._send(answer)

        def _route(self, method: str) -> Answer:
            now = clock()
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.split("/") if p]
            api_version = (parse_qs(url.query).get("api-version") or ["2021-06-01"])[0]
            body = self._read_body()
            if body is None:
                return _error(413, 413001, "request body too large", now)
            if (
                method == "PUT"
                and len(parts) == 4
                and parts[1] == "registrations"
                and parts[3] == "register"
            ):
                scope, registration_id = parts[0], parts[2]
                token = self.headers.get("Authorization")
                if not token and self.peer_chain:
                    return self._with_certificate(
                        scope,
                        registration_id,
                        api_version,
                        now,
                        lambda identity: service.register(identity, body, now, transport="https"),
                    )
                if not token:
                    return run_on_loop(
                        lambda: service.register_tpm_challenge(scope, registration_id, body, now)
                    )
                return self._authenticated(
                    scope,
                    registration_id,
                    token,
                    api_version,
                    now,
                    lambda identity: service.register(identity, body, now, transport="https"),
                )
            if (
                method == "GET"
                and len(parts) == 5
                and parts[1] == "registrations"
                and parts[3] == "operations"
            ):
                scope, registration_id, operation_id = parts[0], parts[2], parts[4]
                token = self.headers.get("Authorization")
                if not token and self.peer_chain:
                    return self._with_certificate(
                        scope,
                        registration_id,
                        api_version,
                        now,
                        lambda identity: service.poll(identity, operation_id, now),
                    )
                if not token:
                    return _error(401, ERROR_UNAUTHORIZED, "no Authorization header", now)
                return self._authenticated(
                    scope,
                    registration_id,
                    token,
                    api_version,
                    now,
                    lambda identity: service.poll(identity, operation_id, now),
                )
            return _error(404, ERROR_NOT_FOUND, f"no such resource: {method} {self.path}", now)

        def _authenticated(
            self,
            scope: str,
            registration_id: str,
            token: str,
            api_version: str,
            now: float,
            action: Callable[[Any], Answer],
        ) -> Answer:
            def run() -> Answer:
                try:
                    identity = service.verify_token(scope, registration_id, token, api_version, now)
                except ConnectRefused as exc:
                    log.info("HTTPS register of %s refused: %s", registration_id, exc.reason)
                    return _error(401, ERROR_UNAUTHORIZED, "unauthorized", now)
                return action(identity)

            return run_on_loop(run)

        def _with_certificate(
            self,
            scope: str,
            registration_id: str,
            api_version: str,
            now: float,
            action: Callable[[DpsIdentity], Answer],
        ) -> Answer:
            """Authenticate by the TLS client certificate (X.509), then run ``action``."""
            chain = self.peer_chain

            def run() -> Answer:
                try:
                    identity = service.verify_certificate(
                        scope, registration_id, chain, api_version, now
                    )
                except ConnectRefused as exc:
                    log.info("HTTPS request of %s refused: %s", registration_id, exc.reason)
                    return _error(
                        401, ERROR_UNAUTHORIZED, INVALID_CERTIFICATE, now, {"reason": exc.reason}
                    )
                return action(identity)

            return run_on_loop(run)

        def _read_body(self) -> bytes | None:
            length_text = self.headers.get("Content-Length", "0") or "0"
            try:
                length = int(length_text)
            except ValueError:
                length = -1
            if length < 0 or length > MAX_DPS_PAYLOAD:
                self.close_connection = True
                return None
            return self.rfile.read(length) if length else b""

        def _send(self, answer: Answer) -> None:
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(answer.body)))
            if answer.retry_after is not None:
                self.send_header("Retry-After", str(answer.retry_after))
            self.end_headers()
            self.wfile.write(answer.body)

    return Handler


def _error(
    status: int, code: int, message: str, now: float, info: dict[str, str] | None = None
) -> Answer:
    body: dict[str, Any] = {
        "errorCode": code,
        "trackingId": str(uuid.uuid4()),
        "message": message,
        "timestampUtc": utc_now_iso(now),
    }
    if info:
        body["info"] = info
    return Answer(status, json.dumps(body).encode("utf-8"))
