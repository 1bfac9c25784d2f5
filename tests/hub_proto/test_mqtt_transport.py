"""The IoT Hub MQTT transport (HubClient, AsyncHubClient) against a real mosquitto with TLS.

The device side is the real client over TLS; the hub side is a test paho client on the broker's
plain listener (tests/support/fake_hub.py) that answers with the hub's topics. mosquitto accepts
any password, so CONNACK refusals come from a scripted TLS server and SAS tokens are checked by
spying on the transport's signing call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import hub_proto
from dps_proto import Assignment
from hub_proto import (
    AsyncHubClient,
    BackoffPolicy,
    ConnectionState,
    HubAuthError,
    HubClient,
    HubError,
    HubParseError,
    HubRequestError,
    HubStateError,
    HubTimeout,
    KeySigner,
    Message,
    MethodRequest,
    TicketState,
    hub_resource_uri,
    mqtt_transport,
    parse_sas_token,
    parse_telemetry_topic,
    verify_sas_token,
)
from tests.support.fake_hub import Client, FakeHub, make_client
from tests.support.mosquitto import Mosquitto, Pki, free_port, make_pki
from tests.support.scripted import RefusingServer

DEVICE_KEY = base64.b64encode(b"hub-device-key-0123456789abcdef!").decode()
FAST = BackoffPolicy(0.05, 0.2, 0.0)
KINDS = ["blocking", "async"]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """A broker shared by the tests that do not stop it."""
    with Mosquitto(pki, tmp_path_factory.mktemp("mosquitto")) as running:
        yield running


@pytest.fixture
def own_broker(pki: Pki, tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of the test's own (to be stopped and restarted), keeping persistent sessions."""
    with Mosquitto(pki, tmp_path, persistence=True) as running:
        yield running


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def clients(pki: Pki) -> Iterator[Callable[..., Client]]:
    """Make clients (blocking or async facade) against a port; all are closed afterwards."""
    made: list[Client] = []

    def make(kind: str, port: int, device_id: str, **kwargs: Any) -> Client:
        kwargs.setdefault("symmetric_key", DEVICE_KEY)
        kwargs.setdefault("ca_file", pki.ca_file)
        kwargs.setdefault("backoff", FAST)
        client = make_client(kind, "localhost", device_id, port=port, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _secrets_absent(text: str) -> None:
    for secret in (DEVICE_KEY, "SharedAccessSignature", "sig="):
        assert secret not in text


# -- arguments and packaging (no network) ----------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"symmetric_key": None}, HubAuthError),
        ({"signer": KeySigner(b"k" * 32)}, HubAuthError),
        ({"symmetric_key": "not base64!"}, HubAuthError),
        ({"port": 0}, HubError),
        ({"token_ttl": 0}, HubError),
        ({"keepalive": True}, HubError),
        ({"ca_file": "/nonexistent/ca.pem"}, HubError),
        ({"device_id": "bad id"}, HubParseError),
        ({"device_id": "dev#1"}, HubError),
        ({"host": ""}, HubError),
    ],
)
def test_bad_arguments_raise_typed_errors(
    overrides: dict[str, Any], error: type[Exception]
) -> None:
    args: dict[str, Any] = {"host": "localhost", "device_id": "dev-1", "symmetric_key": DEVICE_KEY}
    args.update(overrides)
    for cls in (HubClient, AsyncHubClient):
        with pytest.raises(error):
            cls(**args)


def test_tls_defaults() -> None:
    context = mqtt_transport._make_ssl_context(None, None)
    assert context.protocol is ssl.PROTOCOL_TLS_CLIENT
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    assert context.check_hostname
    assert context.verify_mode is ssl.CERT_REQUIRED


def test_clients_are_lazy_exports() -> None:
    assert hub_proto.HubClient is mqtt_transport.HubClient
    assert hub_proto.AsyncHubClient is mqtt_transport.AsyncHubClient


def test_from_assignment_and_module_identity(broker: Mosquitto, pki: Pki) -> None:
    assignment = Assignment("reg-1", assigned_hub="localhost", device_id="dev-assigned")
    with HubClient.from_assignment(
        assignment, symmetric_key=DEVICE_KEY, port=broker.tls_port, ca_file=pki.ca_file
    ) as client:
        assert client.client_id == "dev-assigned"
        client.connect(10)
        assert client.connected
    module = AsyncHubClient("localhost", "dev-m", module_id="mod-1", symmetric_key=DEVICE_KEY)
    assert module.client_id == "dev-m/mod-1"


def test_use_before_connect_and_after_close(broker: Mosquitto, pki: Pki) -> None:
    client = HubClient("localhost", "dev-life", symmetric_key=DEVICE_KEY, port=broker.tls_port)
    ticket = client.send_message(b"queued before connect")  # accepted offline
    with pytest.raises(HubStateError, match="connect"):
        client.get_twin(1)
    client.close()
    client.close()  # idempotent
    assert ticket.state is TicketState.QUEUED
    with pytest.raises(HubStateError):
        client.send_message(b"late")
    with pytest.raises(HubStateError):
        client.connect(1)


# -- telemetry, twin, methods, C2D ------------------------------------------------------------


def test_telemetry_qos0_and_qos1_with_properties(
    kind: str, broker: Mosquitto, clients: Callable[..., Client]
) -> None:
    with FakeHub(broker.plain_port) as hub:
        client = clients(kind, broker.tls_port, f"dev-tel-{kind}")
        client.connect()
        m1 = Message(
            b'{"t":21.5}',
            properties={"alert": "high temp", "k&=": "v/?%#+"},
            message_id="mid-1",
            content_type="application/json",
            content_encoding="utf-8",
        )
        t1 = client.send_message(m1, qos=1)
        t0 = client.send_message(b"zero", qos=0, properties={"n": "0"})
        assert client.wait_for(t1) is TicketState.ACKNOWLEDGED
        assert client.wait_for(t0) is TicketState.SENT
        assert hub.wait(lambda: len(hub.telemetry) >= 2)
    by_payload = {body: (topic, qos) for topic, body, qos in hub.telemetry}
    topic, qos = by_payload[b'{"t":21.5}']
    assert qos == 1
    assert topic.startswith(f"devices/dev-tel-{kind}/messages/events/")
    parsed = parse_telemetry_topic(topic)
    assert parsed.device_id == f"dev-tel-{kind}"
    assert parsed.message == m1.with_payload(b"")
    topic0, qos0 = by_payload[b"zero"]
    assert qos0 == 0
    assert parse_telemetry_topic(topic0).message.properties == {"n": "0"}
    stats = client.stats
    assert (stats.accepted, stats.acknowledged, stats.delivered_qos0) == (2, 1, 1)


def test_close_flushes_accepted_messages(
    kind: str, broker: Mosquitto, clients: Callable[..., Client]
) -> None:
    with FakeHub(broker.plain_port) as hub:
        client = clients(kind, broker.tls_port, f"dev-flush-{kind}")
        client.connect()
        tickets = [client.send_message(Message(b"m", message_id=f"f{i}")) for i in range(50)]
        client.close(timeout=10)
        client.close()  # idempotent
        assert all(ticket.state is TicketState.ACKNOWLEDGED for ticket in tickets)
        assert hub.wait(lambda: len(hub.telemetry) >= 50)
    assert [m.message_id for m in hub.messages()] == [f"f{i}" for i in range(50)]


def test_module_telemetry_topic(broker: Mosquitto, clients: Callable[..., Client]) -> None:
    with FakeHub(broker.plain_port) as hub:
        client = clients("blocking", broker.tls_port, "dev-mod", module_id="mod-a")
        client.connect()
        assert client.wait_for(client.send_message(b"m")) is TicketState.ACKNOWLEDGED
        assert hub.wait(lambda: len(hub.telemetry) >= 1)
    assert hub.telemetry[0][0] == "devices/dev-mod/modules/mod-a/messages/events/"


def test_twin_get_and_reported_patch(
    kind: str, broker: Mosquitto, clients: Callable[..., Client]
) -> None:
    with FakeHub(broker.plain_port) as hub:
        hub.twin = {"desired": {"fan": 1, "$version": 3}, "reported": {"$version": 7}}
        client = clients(kind, broker.tls_port, f"dev-twin-{kind}")
        client.connect()
        twin = client.get_twin()
        assert twin["desired"] == {"fan": 1, "$version": 3}
        version = client.patch_reported({"temp": 21.5, "status": {"ok": True}})
        assert version == 8
        assert client.patch_reported({"temp": None}) == 9
    assert hub.twin["reported"] == {"status": {"ok": True}, "$version": 9}
    patches = [json.loads(body) for kind_, _, body in hub.twin_requests if kind_ != "get"]
    assert patches == [{"temp": 21.5, "status": {"ok": True}}, {"temp": None}]


def test_desired_patches_reach_the_callback(
    kind: str, broker: Mosquitto, clients: Callable[..., Client]
) -> None:
    received: list[tuple[dict[str, Any], int]] = []
    synced: list[int | None] = []
    arrived = threading.Event()
    with FakeHub(broker.plain_port) as hub:
        hub.twin = {"desired": {"fan": 1, "$version": 3}, "reported": {"$version": 1}}
        client = clients(kind, broker.tls_port, f"dev-desired-{kind}")

        def on_desired(patch: dict[str, Any], version: int) -> None:
            received.append((patch, version))
            if version == 6:
                arrived.set()

        client.on_desired(on_desired)
        client.on_twin_synced(lambda event: synced.append(event.desired_version))
        client.connect()
        assert hub.wait(lambda: hub.twin_gets() >= 1)
        hub.push_desired({"fan": 2}, 5)
        hub.push_desired({"fan": 0}, 2)  # older than the twin the device read: dropped
        hub.push_desired({"fan": 3, "mode": None}, 6)
        assert arrived.wait(10)
    assert received == [({"fan": 2}, 5), ({"fan": 3, "mode": None}, 6)]
    assert synced == [3]


def test_method_requests_are_answered(
    kind: str, broker: Mosquitto, clients: Callable[..., Client], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hub_proto")

    def reboot(request: MethodRequest) -> tuple[int, Any]:
        return 200, {"delay": json.loads(request.payload)["delay"]}

    def broken(request: MethodRequest) -> tuple[int, Any]:
        raise RuntimeError("handler bug")

    async def slow(request: MethodRequest) -> tuple[int, Any]:
        await asyncio.sleep(0.01)
        return 202, b"raw bytes"

    with FakeHub(broker.plain_port) as hub:
        client = clients(kind, broker.tls_port, f"dev-method-{kind}")
        client.on_method("reboot", reboot)
        client.on_method("broken", broken)
        client.on_method("comp*slow", slow)
        client.connect()
        assert hub.invoke("reboot", b'{"delay": 3}') == (200, b'{"delay":3}')
        assert hub.invoke("broken")[0] == 500
        assert hub.invoke("comp*slow") == (202, b"raw bytes")
        assert hub.invoke("unknown")[0] == 404
        client.on_method(None, lambda request: (299, None))
        assert hub.invoke("unknown") == (299, b"")
    assert "the handler of method 'broken' raised" in caplog.text
    assert "handler bug" in caplog.text  # the traceback is logged


def test_c2d_messages_reach_the_callback(
    kind: str, broker: Mosquitto, clients: Callable[..., Client]
) -> None:
    got: list[Message] = []
    arrived = threading.Event()
    with FakeHub(broker.plain_port) as hub:
        client = clients(kind, broker.tls_port, f"dev-c2d-{kind}")
        client.on_c2d(lambda message: (got.append(message), arrived.set()))
        client.connect()
        sent = Message(b"hi", properties={"cmd": "x y&z"}, message_id="c2d-1")
        hub.send_c2d(f"dev-c2d-{kind}", sent)
        assert arrived.wait(10)
    assert got == [sent]


def test_waiting_inside_a_callback_is_refused(
    broker: Mosquitto, clients: Callable[..., Client]
) -> None:
    errors: list[BaseException] = []
    done = threading.Event()
    with FakeHub(broker.plain_port) as hub:
        client = clients("blocking", broker.tls_port, "dev-callback")

        def on_c2d(message: Message) -> None:
            try:
                client.get_twin(1)
            except HubStateError as exc:
                errors.append(exc)
            client.send_message(b"sending from a callback is fine")
            done.set()

        client.on_c2d(on_c2d)
        client.connect()
        hub.send_c2d("dev-callback", Message(b"x"))
        assert done.wait(10)
        assert hub.wait(lambda: len(hub.telemetry) >= 1)
    assert len(errors) == 1


# -- failures: broker restart, outage, renewal, refusal, TLS ---------------------------------


def test_broker_restart_loses_no_qos1_message(
    kind: str, own_broker: Mosquitto, clients: Callable[..., Client]
) -> None:
    count = 60
    with FakeHub(own_broker.plain_port, persistent=True) as hub:
        client = clients(kind, own_broker.tls_port, f"dev-restart-{kind}")
        client.connect()
        tickets = []
        for i in range(count):
            message = Message(f"payload {i}".encode(), message_id=f"m{i}")
            tickets.append(client.send_message(message, qos=1))
            if i == 20:
                own_broker.stop()  # with messages in flight
            elif i == 40:
                own_broker.start()  # same ports
        for ticket in tickets:
            assert client.wait_for(ticket, 20) is TicketState.ACKNOWLEDGED
        expected = {f"m{i}" for i in range(count)}
        assert hub.wait(lambda: {m.message_id for m in hub.messages()} >= expected, 20)
    ids = [m.message_id for m in hub.messages()]
    stats = client.stats
    assert set(ids) == expected
    # At least once: duplicates may come from our resends (counted in stats.resent) or from the
    # broker redelivering to its persistent subscriber after the restart, so none are bounded here.
    assert stats.acknowledged == count
    assert client.connection_count >= 2
    assert own_broker.starts == 2


def test_twin_request_during_an_outage_fails_in_bounded_time(
    kind: str, own_broker: Mosquitto, clients: Callable[..., Client]
) -> None:
    with FakeHub(own_broker.plain_port):
        client = clients(kind, own_broker.tls_port, f"dev-outage-{kind}", request_timeout=1.0)
        client.connect()
        own_broker.stop()
        for _ in range(100):  # bounded: until the client noticed
            if not client.connected:
                break
            time.sleep(0.05)
        with pytest.raises(HubRequestError) as info:
            client.get_twin(timeout=20)
        assert isinstance(info.value, HubTimeout)  # the core's request time-out, not ours


def test_unanswered_twin_request_times_out(
    kind: str, broker: Mosquitto, clients: Callable[..., Client]
) -> None:
    with FakeHub(broker.plain_port, answer_twin=False):
        client = clients(kind, broker.tls_port, f"dev-silent-{kind}", request_timeout=0.5)
        client.connect()
        with pytest.raises(HubTimeout):
            client.patch_reported({"a": 1}, timeout=20)
        with pytest.raises(HubTimeout):  # the caller's own time-out works too
            client.get_twin(timeout=0.2)


def test_sas_renewal_reconnects_with_a_fresh_token(
    kind: str,
    broker: Mosquitto,
    clients: Callable[..., Client],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    passwords: list[str] = []
    real = mqtt_transport.sas_password

    def spy(*args: Any, **kwargs: Any) -> str:
        password = real(*args, **kwargs)
        passwords.append(password)
        return password

    monkeypatch.setattr(mqtt_transport, "sas_password", spy)
    device_id = f"dev-renew-{kind}"
    with FakeHub(broker.plain_port) as hub:
        client = clients(kind, broker.tls_port, device_id, token_ttl=4)  # renewal at 80 %
        client.connect()
        tickets = []
        for i in range(300):  # bounded: 30 s at most
            if client.connection_count >= 2 and len(tickets) > 5:
                break
            tickets.append(client.send_message(Message(b"tick", message_id=f"r{i}")))
            time.sleep(0.1)
        for ticket in tickets:
            assert client.wait_for(ticket) is TicketState.ACKNOWLEDGED
        expected = {f"r{i}" for i in range(len(tickets))}
        assert hub.wait(lambda: {m.message_id for m in hub.messages()} >= expected)
    assert client.connection_count >= 2
    assert len(set(passwords)) >= 2
    resource = hub_resource_uri("localhost", device_id)
    for password in passwords:
        token = parse_sas_token(password)
        verify_sas_token(token, KeySigner.from_base64(DEVICE_KEY), resource, time.time() - 10)
    assert "renewal point" in caplog.text
    assert "Sending CONNECT" in caplog.text  # paho's own debug log was captured too
    _secrets_absent(caplog.text)
    for password in passwords:
        assert password not in caplog.text


@pytest.mark.parametrize("return_code", [4, 5])
def test_connack_refusal_raises_auth_error_without_endless_retries(
    kind: str,
    return_code: int,
    pki: Pki,
    clients: Callable[..., Client],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with RefusingServer(pki, return_code) as server:
        client = clients(kind, server.port, f"dev-refused-{kind}", max_auth_failures=3)
        with pytest.raises(HubAuthError) as info:
            client.connect(timeout=15)
        assert info.value.return_code == return_code
        assert server.attempts == 3
        assert client.state is ConnectionState.FAILED
        with pytest.raises(HubAuthError):  # the next call says so too
            client.send_message(b"x")
        with pytest.raises(HubAuthError):
            client.get_twin(1)
        time.sleep(0.3)
        assert server.attempts == 3  # no retry after giving up
    assert f"CONNACK return code {return_code}" in caplog.text
    _secrets_absent(caplog.text)
    user, password = server.connects[0][1:]
    assert user is not None and user.startswith(f"localhost/dev-refused-{kind}/?api-version=")
    assert password is not None and password.startswith("SharedAccessSignature sr=")


def test_untrusted_server_certificate(
    kind: str, broker: Mosquitto, pki: Pki, clients: Callable[..., Client]
) -> None:
    client = clients(kind, broker.tls_port, f"dev-wrong-ca-{kind}", ca_file=pki.wrong_ca_file)
    with pytest.raises(HubError, match="certificate verification failed"):
        client.connect(timeout=1.0)


def test_nothing_listening_times_out_and_keeps_trying(
    kind: str, clients: Callable[..., Client]
) -> None:
    client = clients(kind, free_port(), f"dev-nowhere-{kind}")
    with pytest.raises(HubError, match="refused"):
        client.connect(timeout=0.5)
    assert client.state in (ConnectionState.BACKOFF, ConnectionState.CONNECTING)
    assert client.send_message(b"still accepted").state is TicketState.QUEUED


# -- the asyncio client needs no thread -------------------------------------------------------


def test_async_client_runs_on_the_callers_loop(broker: Mosquitto, pki: Pki) -> None:
    async def main() -> None:
        before = set(threading.enumerate())
        async with AsyncHubClient(
            "localhost",
            "dev-loop",
            symmetric_key=DEVICE_KEY,
            port=broker.tls_port,
            ca_file=pki.ca_file,
        ) as client:
            await client.connect(10)
            ticket = await client.send_message(b"x")
            assert await client.wait_for(ticket, 10) is TicketState.ACKNOWLEDGED
            assert (await client.get_twin(10))["reported"] == {"$version": 1}
            assert set(threading.enumerate()) - before == set()
        await client.aclose()  # idempotent

    with FakeHub(broker.plain_port):
        asyncio.run(main())


def test_short_keepalive_keeps_an_idle_connection_up(broker: Mosquitto, pki: Pki) -> None:
    """The adapter's keep-alive timer sends PINGREQs in time: mosquitto drops a client silent for
    1.5 keep-alive periods, so a 1 s keep-alive over ~4 s would fail without them."""

    async def main() -> None:
        async with AsyncHubClient(
            "localhost",
            "dev-keepalive",
            symmetric_key=DEVICE_KEY,
            port=broker.tls_port,
            ca_file=pki.ca_file,
            keepalive=1,
            twin=False,
        ) as client:
            await client.connect(10)
            await asyncio.sleep(4.0)
            assert client.connected and client.connection_count == 1
            ticket = await client.send_message(b"after idling")
            assert await client.wait_for(ticket, 10) is TicketState.ACKNOWLEDGED
            assert client.connection_count == 1

    asyncio.run(main())


def test_idle_driver_sleeps_until_its_next_deadline(broker: Mosquitto, pki: Pki) -> None:
    async def main() -> None:
        async with AsyncHubClient(
            "localhost",
            "dev-idle",
            symmetric_key=DEVICE_KEY,
            port=broker.tls_port,
            ca_file=pki.ca_file,
            twin=False,
            methods=False,
            c2d=False,
        ) as client:
            await client.connect(10)
            driver = client._driver
            sleeps = 0
            original = driver._sleep

            async def counting(until: float) -> None:
                nonlocal sleeps
                sleeps += 1
                await original(until)

            driver._sleep = counting  # type: ignore[method-assign]
            await asyncio.sleep(2.5)
            assert sleeps <= 1  # no per-second wake-ups while idle
            ticket = await client.send_message(b"x")
            assert await client.wait_for(ticket, 10) is TicketState.ACKNOWLEDGED

    asyncio.run(main())


def test_twin_methods_c2d_options(broker: Mosquitto, pki: Pki) -> None:
    assignment = Assignment("reg", assigned_hub="localhost", device_id="dev-options")
    client = HubClient.from_assignment(
        assignment,
        symmetric_key=DEVICE_KEY,
        port=broker.tls_port,
        ca_file=pki.ca_file,
        twin=False,
        methods=False,
        c2d=False,
    )
    with client:
        session = client._driver.session
        assert not (session.twin_enabled or session.methods_enabled or session.c2d_enabled)
        assert session.subscriptions_needed() == []
        client.connect(10)  # no FakeHub: a twin GET would go unanswered, none is sent
        with pytest.raises(HubStateError):
            client.get_twin(1)
        ticket = client.send_message(b"x", qos=0)
        assert client.wait_for(ticket, 10) is TicketState.SENT
    default = AsyncHubClient(
        "localhost", "dev-defaults", symmetric_key=DEVICE_KEY, ca_file=pki.ca_file
    )
    session = default._driver.session
    assert session.twin_enabled and session.methods_enabled and session.c2d_enabled
