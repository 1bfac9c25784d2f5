"""The DPS HTTPS transport against a fake DPS: ``http.server`` behind TLS on a loopback port.

The fake checks every Authorization header (a SAS token verified against the key it knows) and
answers with the core's own encoders, so the transport is tested end to end: TLS, keep-alive,
Retry-After, reconnects, time-outs and the TPM challenge with a software TPM provider.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import http.client
import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

import dps_proto
from dps_proto import (
    DpsConnectionError,
    DpsError,
    DpsParseError,
    DpsServiceError,
    ErrorBody,
    KeySigner,
    OperationStatus,
    ProvisioningTimeout,
    RegistrationState,
    RetryPolicy,
    SasError,
    TpmProvider,
    derive_device_key,
    encode_json,
    https_transport,
    parse_register_payload,
    parse_sas_token,
    verify_sas_token,
)
from dps_proto.payloads import MAX_PAYLOAD_BYTES
from tests.support.pki import Pki, make_pki

ID_SCOPE = "0ne00TEST02"
DEVICE_KEY = base64.b64encode(b"device-key-0123456789abcdef-32by").decode()
GROUP_KEY = base64.b64encode(b"group-key-0123456789abcdef-32byt").decode()
HUB = "hub-1.localhost"
API_VERSION = "2021-06-01"
FAST = RetryPolicy(backoff_base=0.05, backoff_cap=0.2)


# -- TLS material (tests/support/pki.py) -------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("https-pki"), "dps-mqtt https test CA")


# -- a software TPM provider --------------------------------------------------------------------


class FakeTpmError(Exception):
    """What the fake TPM raises for a blob it cannot import (the real one raises tpm errors)."""


class FakeTpm:
    """Stands in for tpm.TpmDevice: the "activation blob" is simply ``b"KEY:" + raw key``."""

    def __init__(self) -> None:
        self.ek = b"\x01\x3a" + b"fake-ek-public-area" * 4
        self.srk = b"\x01\x18" + b"fake-srk-public-area" * 4
        self.imported: list[bytes] = []
        self._key: bytes | None = None

    def endorsement_key(self) -> bytes:
        return self.ek

    def storage_root_key(self) -> bytes:
        return self.srk

    def registration_id(self) -> str:
        digest = hashlib.sha256(self.ek).digest()
        return base64.b32encode(digest).decode().lower().rstrip("=")

    def import_activation_blob(self, blob: bytes) -> None:
        if not blob.startswith(b"KEY:") or len(blob) < 5:
            raise FakeTpmError("the TPM refused the activation blob")
        self.imported.append(blob)
        self._key = blob[4:]

    def signer(self) -> KeySigner:
        if self._key is None:
            raise FakeTpmError("no identity key imported")
        return KeySigner(self._key)


def tpm_blob(key: bytes) -> str:
    return base64.b64encode(b"KEY:" + key).decode()


# -- the fake DPS -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    kind: str  # "register" or "poll"
    registration_id: str
    operation_id: str | None
    api_version: list[str]
    headers: dict[str, str]
    body: bytes
    connection: int


@dataclass
class FakeDps:
    """Scripted DPS behaviour.

    ``mode``: ``assign`` (202 assigning, then 200 assigned on the poll), ``deny`` (401 error
    body), ``throttle-first`` (the first register gets 429 with Retry-After: 1),
    ``unavailable-first`` (503 without Retry-After), ``drop-first-register`` / ``drop-first-poll``
    / ``drop-always`` (close the connection without answering), ``stall`` (never answer),
    ``huge`` / ``huge-chunked`` (a body over 96 KB), ``tpm-challenge-twice`` (answer the signed
    TPM register with another challenge), ``tpm-bad-blob`` / ``tpm-not-base64`` (a challenge the
    TPM cannot import / that is not base64).
    """

    mode: str = "assign"
    retry_after: int | None = 0
    key_name: str | None = "registration"
    keys: dict[str, bytes] = field(default_factory=dict)  # registration id -> device key
    requests: list[Request] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)  # why an Authorization was refused
    hub_keys: dict[str, bytes] = field(default_factory=dict)
    challenges: dict[str, bytes] = field(default_factory=dict)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    payloads: dict[str, Any] = field(default_factory=dict)
    connections: int = 0

    def count(self, kind: str) -> int:
        return sum(1 for request in self.requests if request.kind == kind)

    def authorized(self, request: Request) -> bool:
        header = request.headers.get("authorization")
        key = self.keys.get(request.registration_id)
        if header is None or key is None:
            self.rejected.append("no token" if header is None else "unknown device")
            return False
        try:
            token = parse_sas_token(header)
            resource = f"{ID_SCOPE}/registrations/{request.registration_id}"
            verify_sas_token(token, KeySigner(key), resource, time.time())
        except SasError as exc:
            self.rejected.append(str(exc))
            return False
        expected_skn = self.key_name or "registration"
        if token.key_name != expected_skn:
            self.rejected.append(f"skn {token.key_name!r}")
            return False
        return True


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: DpsServer

    def setup(self) -> None:
        super().setup()
        with self.server.dps.lock:
            self.server.dps.connections += 1
            self.connection_number = self.server.dps.connections

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_PUT(self) -> None:
        self._handle()

    def do_GET(self) -> None:
        self._handle()

    def _send(
        self,
        status: int,
        body: bytes,
        retry_after: int | None = None,
        chunked: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        if retry_after is not None:
            self.send_header("Retry-After", str(retry_after))
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for start in range(0, len(body), 8192):
                chunk = body[start : start + 8192]
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.write(b"0\r\n\r\n")
        else:
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    def _drop(self) -> None:
        self.close_connection = True

    def _handle(self) -> None:
        dps = self.server.dps
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = urlsplit(self.path)
        segments = [unquote(part) for part in url.path.split("/")]
        kind = "register" if segments[-1] == "register" else "poll"
        if kind == "register":
            assert len(segments) == 5 and segments[:3] == ["", ID_SCOPE, "registrations"]
        else:
            assert len(segments) == 6 and segments[4] == "operations"
        assert self.command == ("PUT" if kind == "register" else "GET")
        request = Request(
            method=self.command,
            kind=kind,
            registration_id=segments[3],
            operation_id=segments[5] if kind == "poll" else None,
            api_version=parse_qs(url.query).get("api-version", []),
            headers={name.lower(): value for name, value in self.headers.items()},
            body=body,
            connection=self.connection_number,
        )
        with dps.lock:
            dps.requests.append(request)
        self._respond(dps, request)

    def _challenge(self, dps: FakeDps, request: Request) -> None:
        key = os.urandom(32)
        dps.keys[request.registration_id] = key
        blob = tpm_blob(key)
        if dps.mode == "tpm-bad-blob":
            blob = base64.b64encode(b"garbage").decode()
        elif dps.mode == "tpm-not-base64":
            blob = "*** not base64 ***"
        dps.challenges[request.registration_id] = key
        answer: dict[str, Any] = {"authenticationKey": blob}
        if dps.key_name is not None:
            answer["keyName"] = dps.key_name
        self._send(401, json.dumps(answer).encode())

    def _respond(self, dps: FakeDps, request: Request) -> None:
        mode, kind = dps.mode, request.kind
        if mode == "stall":
            dps.release.wait(10)
            return self._drop()
        if (
            mode == "drop-always"
            or (mode == "drop-first-register" and kind == "register" and dps.count(kind) == 1)
            or (mode == "drop-first-poll" and kind == "poll" and dps.count(kind) == 1)
        ):
            return self._drop()
        if mode in ("huge", "huge-chunked"):
            filler = b" " * (MAX_PAYLOAD_BYTES + 10)
            return self._send(200, filler, chunked=mode == "huge-chunked")
        registration = parse_register_payload(request.body) if kind == "register" else None
        if registration is not None:
            assert registration.registration_id == request.registration_id
            if registration.tpm is not None and "authorization" not in request.headers:
                return self._challenge(dps, request)
        if not dps.authorized(request):
            error = ErrorBody(401002, "Unauthorized: bad SAS token.", tracking_id="track-auth")
            return self._send(401, encode_json(error))
        if mode == "deny":
            error = ErrorBody(401002, "Invalid certificate.", tracking_id="track-1")
            return self._send(401, encode_json(error))
        if mode == "tpm-challenge-twice" and kind == "register":
            return self._challenge(dps, request)
        if mode == "throttle-first" and kind == "register" and dps.count(kind) == 1:
            error = ErrorBody(429001, "Throttled.", tracking_id="track-429")
            return self._send(429, encode_json(error), retry_after=1)
        if mode == "unavailable-first" and kind == "register" and dps.count(kind) == 1:
            return self._send(503, encode_json(ErrorBody(503000, "Service unavailable.")))
        registration_id = request.registration_id
        if registration is not None:
            dps.payloads[registration_id] = registration.payload
            status = OperationStatus(f"op:{registration_id}", "assigning")
            return self._send(202, encode_json(status), retry_after=dps.retry_after)
        assert request.operation_id == f"op:{registration_id}"
        hub_key: str | None = None
        if registration_id in dps.challenges:
            dps.hub_keys[registration_id] = os.urandom(32)
            hub_key = tpm_blob(dps.hub_keys[registration_id])
        state = RegistrationState(
            registration_id=registration_id,
            status="assigned",
            assigned_hub=HUB,
            device_id=registration_id,
            substatus="initialAssignment",
            payload=dps.payloads.get(registration_id),
            tpm_authentication_key=hub_key,
        )
        self._send(200, encode_json(OperationStatus(request.operation_id, "assigned", state)))


class DpsServer(ThreadingHTTPServer):
    """Threads per connection; TLS is set up in the connection's thread."""

    daemon_threads = False  # server_close() joins every handler thread
    block_on_close = True

    def __init__(self, context: ssl.SSLContext, dps: FakeDps) -> None:
        self.context = context
        self.dps = dps
        self.errors: list[BaseException] = []
        super().__init__(("127.0.0.1", 0), Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)
        with self.context.wrap_socket(request, server_side=True) as tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        self.errors.append(sys.exc_info()[1] or RuntimeError("unknown"))


@dataclass
class Running:
    dps: FakeDps
    server: DpsServer
    port: int

    def args(self, pki: Pki, device: str | None, **overrides: Any) -> dict[str, Any]:
        """Arguments for ``device`` with the device key (and the fake knowing it); with None,
        the test gives the registration id (if any) and the credential itself."""
        args: dict[str, Any] = {
            "provisioning_host": "localhost",
            "port": self.port,
            "id_scope": ID_SCOPE,
            "registration_id": device,
            "ca_file": pki.ca_file,
            "timeout": 15.0,
            "policy": FAST,
        }
        if device is not None:
            args["symmetric_key"] = DEVICE_KEY
            self.dps.keys[device] = base64.b64decode(DEVICE_KEY)
        args.update(overrides)
        return args


@pytest.fixture
def fake(pki: Pki) -> Iterator[Running]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki.server_cert, pki.server_key)
    dps = FakeDps()
    server = DpsServer(context, dps)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield Running(dps, server, server.server_address[1])
    finally:
        dps.release.set()
        server.shutdown()
        thread.join(10)
        server.server_close()
    # TLS handshakes a client aborts and closed connections are expected; a failed assertion
    # in the fake (a malformed request) is not.
    unexpected = [error for error in server.errors if not isinstance(error, OSError)]
    assert unexpected == []


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# -- arguments and requests (no network) ------------------------------------------------------


def _settings(registration_id: str | None = "device-x", **overrides: Any) -> Any:
    args: dict[str, Any] = {
        "provisioning_host": "localhost",
        "id_scope": ID_SCOPE,
        "registration_id": registration_id,
        "symmetric_key": DEVICE_KEY,
        "group_key": None,
        "signer": None,
        "tpm": None,
        "payload": None,
        "port": 443,
        "ca_file": None,
        "ssl_context": None,
        "timeout": 60.0,
        "api_version": API_VERSION,
        "user_agent": "dps-mqtt/0.1.0",
        "token_ttl": 3600,
        "policy": None,
    }
    args.update(overrides)
    return https_transport._settings(**args)


class Incomplete:
    def endorsement_key(self) -> bytes:
        return b"ek"


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"symmetric_key": None}, SasError),
        ({"group_key": GROUP_KEY}, SasError),
        ({"tpm": FakeTpm()}, SasError),
        ({"symmetric_key": None, "signer": object()}, SasError),
        ({"symmetric_key": "not base64!"}, SasError),
        ({"symmetric_key": None, "tpm": Incomplete()}, DpsError),
        ({"registration_id": None}, DpsError),
        ({"registration_id": ""}, DpsError),
        ({"payload": {"bad": object()}}, DpsParseError),
        ({"timeout": 0}, DpsError),
        ({"timeout": float("nan")}, DpsError),
        ({"token_ttl": 0}, DpsError),
        ({"port": 0}, DpsError),
        ({"port": True}, DpsError),
        ({"id_scope": ""}, DpsError),
        ({"api_version": ""}, DpsError),
        ({"provisioning_host": "dps.example.com/evil"}, DpsError),
        ({"provisioning_host": "dps\r\n.example.com"}, DpsError),
        ({"user_agent": "agent\r\nX-Injected: 1"}, DpsError),
        ({"ca_file": "/nonexistent/ca.pem"}, DpsConnectionError),
    ],
)
def test_bad_arguments_raise_typed_errors(
    overrides: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        _settings(**overrides)


def test_tpm_provider_errors_at_setup_propagate_unchanged() -> None:
    class Broken(FakeTpm):
        def endorsement_key(self) -> bytes:
            raise FakeTpmError("no EK")

    with pytest.raises(FakeTpmError, match="no EK"):
        _settings(None, symmetric_key=None, tpm=Broken())


def test_tpm_defaults_the_registration_id_and_sends_ek_and_srk() -> None:
    tpm = FakeTpm()
    assert isinstance(tpm, TpmProvider)
    settings, registration = _settings(None, symmetric_key=None, tpm=tpm)
    assert settings.registration_id == tpm.registration_id()
    assert len(settings.registration_id) == 52
    assert settings.signer is None  # nothing to sign with until the challenge is answered
    assert registration.request.tpm.endorsement_key == base64.b64encode(tpm.ek).decode()
    assert registration.request.tpm.storage_root_key == base64.b64encode(tpm.srk).decode()
    explicit, _ = _settings("chosen-id", symmetric_key=None, tpm=tpm)
    assert explicit.registration_id == "chosen-id"


def test_paths_are_percent_encoded() -> None:
    settings, _ = _settings("dev 1/ä?x", id_scope="0ne/00", api_version="2021-06-01&x=1")
    assert settings.register_path() == (
        "/0ne%2F00/registrations/dev%201%2F%C3%A4%3Fx/register?api-version=2021-06-01%26x%3D1"
    )
    assert settings.poll_path("4.ab+c/d") == (
        "/0ne%2F00/registrations/dev%201%2F%C3%A4%3Fx/operations/4.ab%2Bc%2Fd"
        "?api-version=2021-06-01%26x%3D1"
    )


def test_transport_is_lazy_and_exported() -> None:
    code = (
        "import sys, dps_proto; "
        "assert not {'http.client', 'ssl', 'paho'} & set(sys.modules), sys.modules.keys(); "
        "print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.stdout.strip() == "ok", out.stderr
    assert dps_proto.provision_https is https_transport.provision_https
    assert dps_proto.provision_https_async is https_transport.provision_https_async


# -- symmetric keys against the fake DPS -------------------------------------------------------


def test_register_retry_after_poll_assigned(
    fake: Running, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="dps_proto")
    fake.dps.retry_after = 1
    assignment = dps_proto.provision_https(**fake.args(pki, "dev-sym"))
    assert (assignment.assigned_hub, assignment.device_id) == (HUB, "dev-sym")
    assert assignment.substatus == "initialAssignment"
    requests = fake.dps.requests
    assert [(r.method, r.kind) for r in requests] == [("PUT", "register"), ("GET", "poll")]
    assert requests[1].operation_id == "op:dev-sym"
    assert {r.connection for r in requests} == {1}  # one keep-alive connection
    assert fake.dps.connections == 1
    assert fake.dps.rejected == []
    register, poll = requests
    assert register.api_version == poll.api_version == [API_VERSION]
    assert register.headers["content-type"] == "application/json; charset=utf-8"
    assert register.headers["accept"] == poll.headers["accept"] == "application/json"
    assert register.headers["user-agent"] == "dps-mqtt/0.1.0"
    assert "authorization" in poll.headers
    assert json.loads(register.body) == {"registrationId": "dev-sym"}
    assert "retry-after 1" in caplog.text  # the header reached the core


def test_group_key_derives_the_device_key(fake: Running, pki: Pki) -> None:
    fake.dps.keys["dev-group-7"] = base64.b64decode(derive_device_key(GROUP_KEY, "dev-group-7"))
    args = fake.args(pki, None, registration_id="dev-group-7", group_key=GROUP_KEY)
    assignment = dps_proto.provision_https(**args)
    assert assignment.device_id == "dev-group-7"
    assert fake.dps.rejected == []


def test_custom_signer_and_no_user_agent(fake: Running, pki: Pki) -> None:
    fake.dps.keys["dev-signer"] = b"k" * 32
    args = fake.args(
        pki, None, registration_id="dev-signer", signer=KeySigner(b"k" * 32), user_agent=None
    )
    assert dps_proto.provision_https(**args).device_id == "dev-signer"
    assert all("user-agent" not in request.headers for request in fake.dps.requests)


def test_wrong_key_is_refused_by_the_service(fake: Running, pki: Pki) -> None:
    args = fake.args(pki, "dev-wrong-key")
    fake.dps.keys["dev-wrong-key"] = b"another key entirely"
    with pytest.raises(DpsServiceError) as info:
        dps_proto.provision_https(**args)
    assert (info.value.status, info.value.error_code) == (401, 401002)
    assert info.value.tracking_id == "track-auth"
    assert fake.dps.rejected == ["the token signature does not match the key"]


def test_custom_payload_round_trip(fake: Running, pki: Pki) -> None:
    payload = {"modelId": "dtmi:test;1", "nested": {"list": [1, 2.5, None, "ü"]}}
    assignment = dps_proto.provision_https(**fake.args(pki, "dev-payload", payload=payload))
    assert assignment.payload == payload
    assert json.loads(fake.dps.requests[0].body)["payload"] == payload


def test_service_error_is_raised_with_what_dps_said(fake: Running, pki: Pki) -> None:
    fake.dps.mode = "deny"
    with pytest.raises(DpsServiceError) as info:
        dps_proto.provision_https(**fake.args(pki, "dev-denied"))
    assert (info.value.status, info.value.error_code) == (401, 401002)
    assert info.value.tracking_id == "track-1"
    assert info.value.service_message == "Invalid certificate."


@pytest.mark.parametrize("mode", ["throttle-first", "unavailable-first"])
def test_transient_status_then_success(fake: Running, pki: Pki, mode: str) -> None:
    fake.dps.mode = mode
    assignment = dps_proto.provision_https(**fake.args(pki, "dev-transient"))
    assert assignment.device_id == "dev-transient"
    kinds = [request.kind for request in fake.dps.requests]
    assert kinds == ["register", "register", "poll"]
    assert {request.connection for request in fake.dps.requests} == {1}


@pytest.mark.parametrize("mode", ["drop-first-register", "drop-first-poll"])
def test_dropped_connection_is_reopened(
    fake: Running,
    pki: Pki,
    mode: str,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(https_transport, "RECONNECT_BACKOFF", (0.01, 0.01, 0.01))
    caplog.set_level(logging.DEBUG, logger="dps_proto")
    fake.dps.mode = mode
    assignment = dps_proto.provision_https(**fake.args(pki, "dev-dropped"))
    assert assignment.device_id == "dev-dropped"
    requests = fake.dps.requests
    if mode == "drop-first-register":
        assert [(r.kind, r.connection) for r in requests] == [
            ("register", 1),
            ("register", 2),
            ("poll", 2),
        ]
        assert "reconnecting" in caplog.text  # a fresh connection failed: counted, backed off
    else:
        assert [(r.kind, r.connection) for r in requests] == [
            ("register", 1),
            ("poll", 1),
            ("poll", 2),
        ]
        assert "closed the keep-alive connection" in caplog.text  # stale: reopened at once
    assert fake.dps.connections == 2


def test_gives_up_after_three_reconnects(
    fake: Running, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(https_transport, "RECONNECT_BACKOFF", (0.01, 0.01, 0.01))
    fake.dps.mode = "drop-always"
    with pytest.raises(DpsConnectionError, match="gave up after 3 reconnects"):
        dps_proto.provision_https(**fake.args(pki, "dev-dropped-often"))
    assert [request.kind for request in fake.dps.requests] == ["register"] * 4


@pytest.mark.parametrize("use_async", [False, True])
def test_nothing_listening(pki: Pki, use_async: bool) -> None:
    args: dict[str, Any] = {
        "provisioning_host": "127.0.0.1",
        "port": _free_port(),
        "id_scope": ID_SCOPE,
        "registration_id": "dev-nowhere",
        "symmetric_key": DEVICE_KEY,
        "ca_file": pki.ca_file,
        "timeout": 5.0,
    }
    with pytest.raises(DpsConnectionError, match="refused"):
        if use_async:
            asyncio.run(dps_proto.provision_https_async(**args))
        else:
            dps_proto.provision_https(**args)


@pytest.mark.parametrize("use_async", [False, True])
def test_untrusted_server_certificate(fake: Running, pki: Pki, use_async: bool) -> None:
    args = fake.args(pki, "dev-wrong-ca", ca_file=pki.wrong_ca_file)
    with pytest.raises(DpsConnectionError, match="certificate verification failed"):
        if use_async:
            asyncio.run(dps_proto.provision_https_async(**args))
        else:
            dps_proto.provision_https(**args)
    assert fake.dps.requests == []


@pytest.mark.parametrize("use_async", [False, True])
def test_no_answer_times_out(fake: Running, pki: Pki, use_async: bool) -> None:
    fake.dps.mode = "stall"
    args = fake.args(pki, "dev-silent", timeout=1.0)
    with pytest.raises(ProvisioningTimeout, match="dev-silent"):
        if use_async:
            asyncio.run(dps_proto.provision_https_async(**args))
        else:
            dps_proto.provision_https(**args)
    assert [request.kind for request in fake.dps.requests] == ["register"]


@pytest.mark.parametrize("mode", ["huge", "huge-chunked"])
def test_oversized_body_is_refused(fake: Running, pki: Pki, mode: str) -> None:
    fake.dps.mode = mode
    with pytest.raises(DpsParseError, match="bytes"):
        dps_proto.provision_https(**fake.args(pki, "dev-huge"))


def test_async_returns_the_assignment(fake: Running, pki: Pki) -> None:
    assignment = asyncio.run(dps_proto.provision_https_async(**fake.args(pki, "dev-async")))
    assert assignment.device_id == "dev-async"
    assert [request.kind for request in fake.dps.requests] == ["register", "poll"]


def test_async_cancellation_stops_the_worker(fake: Running, pki: Pki) -> None:
    fake.dps.retry_after = 2

    async def main() -> None:
        task = asyncio.ensure_future(
            dps_proto.provision_https_async(**fake.args(pki, "dev-cancel"))
        )
        for _ in range(500):
            if fake.dps.requests:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the 202 arrives; the worker now waits for Retry-After
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())  # returns once the worker thread has stopped
    assert [request.kind for request in fake.dps.requests] == ["register"]


# -- TPM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key_name", ["registration", None])
def test_tpm_challenge_flow(fake: Running, pki: Pki, key_name: str | None) -> None:
    fake.dps.key_name = key_name
    tpm = FakeTpm()
    assignment = dps_proto.provision_https(**fake.args(pki, None, tpm=tpm))
    registration_id = tpm.registration_id()
    assert assignment.device_id == registration_id
    first, second, poll = fake.dps.requests
    assert (first.kind, second.kind, poll.kind) == ("register", "register", "poll")
    assert "authorization" not in first.headers
    assert json.loads(first.body) == {
        "registrationId": registration_id,
        "tpm": {
            "endorsementKey": base64.b64encode(tpm.ek).decode(),
            "storageRootKey": base64.b64encode(tpm.srk).decode(),
        },
    }
    assert second.body == first.body
    assert "authorization" in second.headers and "authorization" in poll.headers
    assert parse_sas_token(second.headers["authorization"]).key_name == "registration"
    assert fake.dps.rejected == []  # every signed request verified against the challenge key
    challenge_key = fake.dps.challenges[registration_id]
    hub_key = fake.dps.hub_keys[registration_id]
    assert tpm.imported == [b"KEY:" + challenge_key, b"KEY:" + hub_key]
    assert assignment.tpm_authentication_key == tpm_blob(hub_key)
    assert {request.connection for request in fake.dps.requests} == {1}


def test_tpm_challenge_flow_async(fake: Running, pki: Pki) -> None:
    tpm = FakeTpm()
    assignment = asyncio.run(dps_proto.provision_https_async(**fake.args(pki, None, tpm=tpm)))
    assert assignment.device_id == tpm.registration_id()
    assert len(tpm.imported) == 2


def test_tpm_second_challenge_is_a_service_error(fake: Running, pki: Pki) -> None:
    fake.dps.mode = "tpm-challenge-twice"
    tpm = FakeTpm()
    with pytest.raises(DpsServiceError) as info:
        dps_proto.provision_https(**fake.args(pki, None, tpm=tpm))
    assert info.value.status == 401
    assert len(tpm.imported) == 1
    assert [request.kind for request in fake.dps.requests] == ["register", "register"]


def test_tpm_provider_error_propagates_unchanged(fake: Running, pki: Pki) -> None:
    fake.dps.mode = "tpm-bad-blob"
    with pytest.raises(FakeTpmError, match="refused the activation blob"):
        dps_proto.provision_https(**fake.args(pki, None, tpm=FakeTpm()))


def test_tpm_challenge_that_is_not_base64(fake: Running, pki: Pki) -> None:
    fake.dps.mode = "tpm-not-base64"
    tpm = FakeTpm()
    with pytest.raises(DpsParseError, match="authenticationKey"):
        dps_proto.provision_https(**fake.args(pki, None, tpm=tpm))
    assert tpm.imported == []


# -- secrets never reach the log ----------------------------------------------------------------


def test_no_secret_in_the_log(
    fake: Running,
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="dps_proto")
    # Even if someone switched http.client's debug output on globally, the transport turns it off
    # for its connections (it would print the Authorization header to stdout).
    monkeypatch.setattr(http.client.HTTPConnection, "debuglevel", 1)
    fake.dps.keys["dev-log"] = base64.b64decode(derive_device_key(GROUP_KEY, "dev-log"))
    dps_proto.provision_https(
        **fake.args(pki, None, registration_id="dev-log", group_key=GROUP_KEY)
    )
    tpm = FakeTpm()
    dps_proto.provision_https(**fake.args(pki, None, tpm=tpm))
    fake.dps.mode = "deny"
    with pytest.raises(DpsServiceError):
        dps_proto.provision_https(**fake.args(pki, "dev-log-denied"))
    printed = capsys.readouterr()
    text = caplog.text + printed.out + printed.err
    assert "dev-log" in caplog.text
    assert "GET /" in caplog.text  # the request log lines were captured
    derived = derive_device_key(GROUP_KEY, "dev-log")
    registration_id = tpm.registration_id()
    secrets = [
        DEVICE_KEY,
        GROUP_KEY,
        derived,
        "SharedAccessSignature",
        "sig=",
        tpm_blob(fake.dps.challenges[registration_id]),
        tpm_blob(fake.dps.hub_keys[registration_id]),
        base64.b64encode(fake.dps.challenges[registration_id]).decode(),
    ]
    for secret in secrets:
        assert secret not in text
    assert all(secret not in repr(record.args) for record in caplog.records for secret in secrets)
    assert "send:" not in printed.out and "reply:" not in printed.out
