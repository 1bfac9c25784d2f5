"""Tests of dps_proto.transport_support: the TLS context, paho socket hygiene, CONNACK codes and
messages, connect-error messages, credential choice and argument checks."""

from __future__ import annotations

import base64
import contextlib
import math
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion, ConnackCode

from dps_proto import KeySigner, SasError, derive_device_key
from dps_proto.errors import DpsConnectionError, DpsError
from dps_proto.transport_support import (
    CONNACK_MEANINGS,
    ClosingSSLSocket,
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
)
from tests.support.mosquitto import Pki, make_pki

SETTINGS = settings(max_examples=150, deadline=None)
KEY = base64.b64encode(b"k" * 32).decode()


class OwnError(Exception):
    """The error type a calling transport asks for."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# -- TLS --------------------------------------------------------------------------------------


def test_default_context_is_strict() -> None:
    context = client_ssl_context(None, None, error=OwnError)
    assert context.protocol is ssl.PROTOCOL_TLS_CLIENT
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.check_hostname
    assert context.verify_mode is ssl.CERT_REQUIRED
    assert context.sslsocket_class is ClosingSSLSocket


def test_given_context_wins(pki: Pki) -> None:
    given_context = ssl.create_default_context()
    assert client_ssl_context(pki.ca_file, given_context, error=OwnError) is given_context


def test_ca_file_is_trusted(pki: Pki) -> None:
    context = client_ssl_context(pki.ca_file, None, error=OwnError)
    (ca,) = context.get_ca_certs()
    assert "dps-mqtt test CA" in str(ca["subject"])


@pytest.mark.parametrize("error", [OwnError, DpsConnectionError])
def test_unreadable_ca_file_raises_the_callers_error(
    tmp_path: Path, error: type[Exception]
) -> None:
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(error, match="cannot load CA certificates from") as info:
        client_ssl_context(missing, None, error=error)
    assert isinstance(info.value.__cause__, OSError)
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(error, match=r"not\.pem"):
        client_ssl_context(str(not_pem), None, error=error)


@pytest.fixture
def tls_pair(pki: Pki) -> Iterator[tuple[socket.socket, threading.Thread]]:
    """A connected socket pair whose far end runs a TLS server handshake in a thread."""
    client, server = socket.socketpair()
    client.settimeout(10)
    server.settimeout(10)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(pki.server_cert, pki.server_key)

    def serve() -> None:
        try:
            with server_context.wrap_socket(server, server_side=True):
                pass
        except (OSError, ssl.SSLError):
            pass  # the client gives up on the handshake
        finally:
            server.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield client, thread
    finally:
        client.close()
        thread.join(10)
        assert not thread.is_alive()


def test_failed_handshake_closes_the_socket(
    pki: Pki, tls_pair: tuple[socket.socket, threading.Thread]
) -> None:
    client, _ = tls_pair
    context = client_ssl_context(pki.wrong_ca_file, None, error=OwnError)
    tls = context.wrap_socket(client, server_hostname="localhost", do_handshake_on_connect=False)
    assert isinstance(tls, ClosingSSLSocket)
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        tls.do_handshake()
    assert tls.fileno() == -1
    message = connect_error_message("localhost", 8883, info.value)
    assert message.startswith("TLS certificate verification failed for localhost:8883: ")


def test_good_handshake_keeps_the_socket(
    pki: Pki, tls_pair: tuple[socket.socket, threading.Thread]
) -> None:
    client, thread = tls_pair
    context = client_ssl_context(pki.ca_file, None, error=OwnError)
    with context.wrap_socket(client, server_hostname="localhost") as tls:
        assert tls.fileno() != -1
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        thread.join(10)


# -- paho sockets -----------------------------------------------------------------------------


class FakeClient:
    def __init__(self, fail: bool = False) -> None:
        self.resets = 0
        self.fail = fail

    def _reset_sockets(self) -> None:
        self.resets += 1
        if self.fail:
            raise OSError("already closed")


def test_close_client_sockets_resets_and_swallows_os_errors() -> None:
    for fail in (False, True):
        client: Any = FakeClient(fail)
        close_client_sockets(client)
        assert client.resets == 1
    close_client_sockets(object())  # type: ignore[arg-type]  # nothing to close: no error


def test_close_client_sockets_on_a_real_client() -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2)
    close_client_sockets(client)
    assert client.socket() is None


# -- CONNACK ----------------------------------------------------------------------------------


@pytest.mark.parametrize("code", range(6))
def test_connack_code_of_pahos_reason_codes(code: int) -> None:
    reason = mqtt.convert_connack_rc_to_reason_code(ConnackCode(code))
    assert connack_code(reason) == code


class Reason:
    def __init__(self, name: str, is_failure: bool = True) -> None:
        self.name = name
        self.is_failure = is_failure

    def getName(self) -> str:
        return self.name


def test_connack_code_of_odd_reasons() -> None:
    assert connack_code(None) == 0
    assert connack_code(Reason("Bad user name or password", is_failure=False)) == 0
    assert connack_code(Reason("Something new")) == 255
    assert connack_code(Reason("Not authorized")) == 5


def test_connack_message() -> None:
    message = connack_message(4, service="hub", host="h.example", port=8883, client_id="dev-1")
    assert message == (
        "hub h.example:8883 refused the connection of 'dev-1': bad user name or password"
        " (CONNACK return code 4)"
    )
    meanings = {**CONNACK_MEANINGS, 4: "bad credentials"}
    assert "'dev-1': bad credentials (CONNACK" in connack_message(
        4, service="DPS", host="h", port=1, client_id="dev-1", meanings=meanings
    )
    unknown = connack_message(99, service="DPS", host="h", port=1, client_id="d")
    assert "unknown reason (CONNACK return code 99)" in unknown


@given(st.integers(min_value=0, max_value=255))
@SETTINGS
def test_connack_message_names_the_code(code: int) -> None:
    message = connack_message(code, service="DPS", host="h", port=8883, client_id="d")
    assert message.startswith("DPS h:8883 refused the connection of 'd': ")
    assert message.endswith(f"(CONNACK return code {code})")


# -- connect errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ssl.SSLError(1, "bad record"), "TLS handshake with h:1 failed: "),
        (ConnectionRefusedError(111, "refused"), "connection to h:1 refused"),
        (socket.gaierror(-2, "Name or service not known"), "cannot resolve 'h': "),
        (TimeoutError(), "timed out connecting to h:1"),
        (socket.timeout("timed out"), "timed out connecting to h:1"),
        (OSError(113, "No route to host"), "cannot connect to h:1: "),
        (ValueError("bad host"), "cannot connect to h:1: bad host"),
    ],
)
def test_connect_error_message(exc: BaseException, expected: str) -> None:
    assert connect_error_message("h", 1, exc).startswith(expected)


def test_refused_names_the_service() -> None:
    refused = ConnectionRefusedError(111, "refused")
    assert connect_error_message("h", 1, refused) == "connection to h:1 refused"
    assert connect_error_message("h", 1, refused, service="DPS") == (
        "connection to h:1 refused (is DPS listening there?)"
    )


def test_real_refused_connection() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    with pytest.raises(ConnectionRefusedError) as info:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    assert "refused" in connect_error_message("127.0.0.1", port, info.value)


# -- credentials ------------------------------------------------------------------------------


def test_require_one() -> None:
    assert require_one({"a": None, "b": 0, "c": None}, error=OwnError) == "b"
    with pytest.raises(OwnError) as info:
        require_one({"a": None, "b": None, "c": None}, error=OwnError)
    assert str(info.value) == "give exactly one of a, b or c"
    with pytest.raises(SasError) as sas_info:
        require_one({"a": 1, "b": None, "c": ""}, error=SasError)
    assert str(sas_info.value) == "give exactly one of a, b or c (got a, c)"
    with pytest.raises(OwnError, match=r"^give exactly one of only$"):
        require_one({"only": None}, error=OwnError)


@given(st.lists(st.booleans(), min_size=2, max_size=5))
@SETTINGS
def test_require_one_raises_only_the_callers_error(present: list[bool]) -> None:
    names = [f"arg{i}" for i in range(len(present))]
    options = {name: (i if here else None) for i, (name, here) in enumerate(zip(names, present))}
    if sum(present) == 1:
        assert require_one(options, error=OwnError) == names[present.index(True)]
        return
    with pytest.raises(OwnError) as info:
        require_one(options, error=OwnError)
    given_names = [name for name, here in zip(names, present) if here]
    expected = f"give exactly one of {', '.join(names[:-1])} or {names[-1]}"
    if given_names:
        expected += f" (got {', '.join(given_names)})"
    assert str(info.value) == expected


def test_make_signer_from_each_credential() -> None:
    signer = KeySigner(b"s" * 32)
    assert make_signer(signer=signer, error=OwnError) is signer
    from_key = make_signer(symmetric_key=KEY, error=OwnError)
    assert from_key == KeySigner(b"k" * 32)
    from_group = make_signer(group_key=KEY, registration_id="dev-1", error=OwnError)
    assert from_group == KeySigner.from_base64(derive_device_key(KEY, "dev-1"))
    assert make_signer(error=OwnError) is None


def test_make_signer_errors() -> None:
    with pytest.raises(OwnError, match="sign"):
        make_signer(signer=object(), error=OwnError)  # type: ignore[arg-type]
    with pytest.raises(OwnError, match="registration_id"):
        make_signer(group_key=KEY, error=OwnError)
    for bad in ("not base64!", ""):
        with pytest.raises(SasError):
            make_signer(symmetric_key=bad, error=OwnError)
        with pytest.raises(SasError):
            make_signer(group_key=bad, registration_id="dev-1", error=OwnError)


@given(st.text(max_size=60))
@SETTINGS
def test_make_signer_with_arbitrary_keys_raises_only_sas_errors(key: str) -> None:
    try:
        signer = make_signer(symmetric_key=key, error=OwnError)
    except SasError:
        return
    assert signer is not None
    assert len(signer.sign(b"data")) == 32


# -- argument checks --------------------------------------------------------------------------


def test_check_text() -> None:
    check_text("host", "h", error=OwnError)
    for bad in ("", None, 5, b"h"):
        with pytest.raises(OwnError, match=r"^host must be a non-empty string$"):
            check_text("host", bad, error=OwnError)


def test_check_int() -> None:
    for good in (1, 8883, 65535):
        check_int("port", good, 1, 65535, error=OwnError)
    for bad in (0, 65536, -1, True, 1.0, "1", None):
        with pytest.raises(OwnError, match=r"^port must be an integer in 1\.\.65535$"):
            check_int("port", bad, 1, 65535, error=OwnError)


def test_check_seconds() -> None:
    for good in (0.01, 1, 60.0, 10**6):
        check_seconds("timeout", good, error=OwnError)
    for bad in (0, -1, 0.0, math.inf, math.nan, True, "1", None):
        with pytest.raises(OwnError, match=r"^timeout must be a positive number of seconds$"):
            check_seconds("timeout", bad, error=OwnError)
    check_seconds("token_ttl", 10**30, error=DpsError, integer=True)
    for bad in (0, 1.5, 3600.0, True, -5):
        with pytest.raises(DpsError, match=r"^token_ttl must be a positive number of seconds$"):
            check_seconds("token_ttl", bad, error=DpsError, integer=True)


@given(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=5), st.binary()
    )
)
@SETTINGS
def test_checks_raise_only_the_callers_error(value: object) -> None:
    checks: list[Callable[[], None]] = [
        lambda: check_text("x", value, error=OwnError),
        lambda: check_int("x", value, 1, 65535, error=OwnError),
        lambda: check_seconds("x", value, error=OwnError),
        lambda: check_seconds("x", value, error=OwnError, integer=True),
    ]
    for check in checks:
        with contextlib.suppress(OwnError):
            check()


# -- packaging --------------------------------------------------------------------------------


def test_no_paho_without_mqtt() -> None:
    """The HTTPS transport uses this module, and must not load paho."""
    code = (
        "import sys, dps_proto.transport_support, dps_proto.https_transport; "
        "assert 'paho' not in sys.modules; print('ok')"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_set_nodelay_turns_nagle_off_on_the_client_socket() -> None:
    import socket

    from dps_proto.transport_support import set_nodelay

    class FakeClient:
        def __init__(self, sock: object) -> None:
            self._sock = sock

        def socket(self) -> object:
            return self._sock

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 0
        set_nodelay(FakeClient(sock))  # type: ignore[arg-type]
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    set_nodelay(FakeClient(None))  # type: ignore[arg-type]  # not connected: nothing to do


def test_the_blocking_dps_transport_does_not_load_asyncio() -> None:
    """`from dps_proto import provision` is the embedded path: asyncio costs ~17 ms and 3.7 MB."""
    import subprocess
    import sys

    code = "import sys; from dps_proto import provision; print('asyncio' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "False"
