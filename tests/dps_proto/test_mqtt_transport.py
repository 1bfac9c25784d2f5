"""The DPS MQTT transport against a real local mosquitto (TLS) and a fake DPS responder.

mosquitto accepts any password, so the CONNECT credentials are checked through the transport's
own helpers; everything else (TLS, subscribe, QoS 1 publishes, polls, reconnects) goes over
loopback sockets.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

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
    SasError,
    derive_device_key,
    encode_json,
    mqtt_transport,
    parse_register_payload,
    parse_request_topic,
    parse_sas_token,
    response_topic,
    username,
    verify_sas_token,
)
from tests.support.mosquitto import Mosquitto as Broker
from tests.support.mosquitto import Pki, make_pki
from tests.support.mosquitto import free_port as _free_port
from tests.support.scripted import ScriptedTlsServer, packet, read_packet

ID_SCOPE = "0ne00TEST01"
DEVICE_KEY = base64.b64encode(b"device-key-0123456789abcdef-32by").decode()
GROUP_KEY = base64.b64encode(b"group-key-0123456789abcdef-32byt").decode()
HUB = "hub-1.localhost"


# -- TLS material and mosquitto (tests/support/mosquitto.py) ---------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def broker(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    with Broker(pki, tmp_path_factory.mktemp("mosquitto")) as running:
        yield running


# -- fake DPS ---------------------------------------------------------------------------------


class FakeDps:
    """A paho client on the plain listener answering DPS requests the way the service does.

    ``mode``: ``assign`` (202 assigning with retry-after=1, then 200 assigned on the poll),
    ``deny`` (401 with an error body), ``kick`` (the first register makes mosquitto drop the
    device by taking over its client id; later requests are answered as in ``assign``),
    ``kick-always`` (every register does).
    """

    def __init__(self, port: int, mode: str = "assign") -> None:
        self.port = port
        self.mode = mode
        self.requests: list[tuple[str, str | None, Any]] = []  # kind, operation id, payload
        self.kicked = threading.Event()
        self._payloads: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="fake-dps"
        )
        self._client.on_message = self._on_message
        self._subscribed = threading.Event()
        self._client.on_subscribe = lambda *args: self._subscribed.set()

    def __enter__(self) -> FakeDps:
        self._client.connect("127.0.0.1", self.port)
        self._client.subscribe([("$dps/registrations/PUT/#", 1), ("$dps/registrations/GET/#", 1)])
        self._client.loop_start()
        assert self._subscribed.wait(5), "the fake DPS could not subscribe"
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def _answer(self, status: int, rid: str, body: bytes, retry_after: int | None = None) -> None:
        self._client.publish(response_topic(status, rid, retry_after), body, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        request = parse_request_topic(message.topic)
        if request.kind == "register":
            body = parse_register_payload(bytes(message.payload))
            registration_id = body.registration_id
            payload = body.payload
        else:
            assert request.operation_id is not None
            registration_id = request.operation_id.split(":", 1)[1]
            payload = None
        with self._lock:
            self.requests.append((request.kind, request.operation_id, payload))
            first = len(self.requests) == 1
        if self.mode == "deny":
            error = ErrorBody(401002, "Invalid certificate.", tracking_id="track-1")
            self._answer(401, request.rid, encode_json(error))
        elif (self.mode == "kick" and first) or self.mode == "kick-always":
            threading.Thread(target=self._kick, args=(registration_id,), daemon=True).start()
        elif request.kind == "register":
            self._payloads[registration_id] = payload
            status = OperationStatus(f"op:{registration_id}", "assigning")
            self._answer(202, request.rid, encode_json(status), retry_after=1)
        else:
            state = RegistrationState(
                registration_id=registration_id,
                status="assigned",
                assigned_hub=HUB,
                device_id=registration_id,
                substatus="initialAssignment",
                payload=self._payloads.get(registration_id),
            )
            status = OperationStatus(request.operation_id, "assigned", state)
            self._answer(200, request.rid, encode_json(status))

    def _kick(self, registration_id: str) -> None:
        """Connect with the device's client id: mosquitto then drops the device's connection."""
        kicker = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=registration_id
        )
        connected = threading.Event()
        kicker.on_connect = lambda *args: connected.set()
        kicker.connect("127.0.0.1", self.port)
        kicker.loop_start()
        connected.wait(5)
        self.kicked.set()
        kicker.disconnect()
        kicker.loop_stop()


def _args(broker: Broker, pki: Pki, registration_id: str, **overrides: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "provisioning_host": "localhost",
        "port": broker.tls_port,
        "id_scope": ID_SCOPE,
        "registration_id": registration_id,
        "symmetric_key": DEVICE_KEY,
        "ca_file": pki.ca_file,
        "timeout": 15.0,
    }
    args.update(overrides)
    return args


# -- credentials and arguments (no network) ---------------------------------------------------


def _settings(registration_id: str, **overrides: Any) -> mqtt_transport._Settings:
    args: dict[str, Any] = {
        "provisioning_host": "localhost",
        "id_scope": ID_SCOPE,
        "registration_id": registration_id,
        "symmetric_key": DEVICE_KEY,
        "group_key": None,
        "signer": None,
        "payload": None,
        "port": 8883,
        "ca_file": None,
        "ssl_context": None,
        "timeout": 60.0,
        "api_version": "2019-03-31",
        "client_version": "dps-mqtt/0.1.0",
        "token_ttl": 3600,
        "policy": None,
        "keepalive": 60,
    }
    args.update(overrides)
    settings, _ = mqtt_transport._settings(**args)
    return settings


def test_connect_credentials_are_the_documented_username_and_sas_token() -> None:
    settings = _settings("device-1")
    user, password = settings.credentials(1_700_000_000.5)
    assert user == username(ID_SCOPE, "device-1", "2019-03-31", "dps-mqtt/0.1.0")
    token = parse_sas_token(password)
    assert token.resource == f"{ID_SCOPE}/registrations/device-1"
    assert token.key_name == "registration"
    assert token.expiry == 1_700_000_000 + 3600
    verify_sas_token(
        token, KeySigner.from_base64(DEVICE_KEY), f"{ID_SCOPE}/registrations/device-1", 1.7e9
    )


def test_group_key_derives_the_device_key() -> None:
    settings = _settings("group-device-7", symmetric_key=None, group_key=GROUP_KEY)
    derived = KeySigner.from_base64(derive_device_key(GROUP_KEY, "group-device-7"))
    assert settings.signer == derived
    token = parse_sas_token(settings.credentials(1.7e9)[1])
    resource = f"{ID_SCOPE}/registrations/group-device-7"
    verify_sas_token(token, derived, resource, 1.7e9)
    with pytest.raises(SasError):
        verify_sas_token(token, KeySigner.from_base64(GROUP_KEY), resource, 1.7e9)


def test_custom_signer_is_used_as_given() -> None:
    signer = KeySigner(b"k" * 32)
    assert _settings("device-s", symmetric_key=None, signer=signer).signer is signer


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"symmetric_key": None}, SasError),
        ({"group_key": GROUP_KEY}, SasError),
        ({"symmetric_key": "not base64!"}, SasError),
        ({"payload": {"bad": object()}}, DpsParseError),
        ({"timeout": 0}, DpsError),
        ({"port": 0}, DpsError),
        ({"id_scope": ""}, DpsError),
        ({"ca_file": "/nonexistent/ca.pem"}, DpsConnectionError),
    ],
)
def test_bad_arguments_raise_typed_errors(
    overrides: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        _settings("device-x", **overrides)


def test_transport_is_lazy_and_exported() -> None:
    code = "import sys, dps_proto; assert 'paho' not in sys.modules; print('ok')"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.stdout.strip() == "ok", out.stderr
    assert dps_proto.provision is mqtt_transport.provision
    assert dps_proto.provision_async is mqtt_transport.provision_async


# -- against mosquitto ------------------------------------------------------------------------


def test_provision_blocking_returns_the_assignment(broker: Broker, pki: Pki) -> None:
    with FakeDps(broker.plain_port) as dps:
        assignment = dps_proto.provision(
            **_args(broker, pki, "dev-sync", payload={"modelId": "dtmi:test;1"})
        )
    assert assignment.assigned_hub == HUB
    assert assignment.device_id == "dev-sync"
    assert assignment.substatus == "initialAssignment"
    assert assignment.payload == {"modelId": "dtmi:test;1"}
    assert [kind for kind, _, _ in dps.requests] == ["register", "poll"]
    assert dps.requests[1][1] == "op:dev-sync"


def test_provision_async_returns_the_assignment(broker: Broker, pki: Pki) -> None:
    threads_before = set(threading.enumerate())

    async def main() -> Any:
        result = await dps_proto.provision_async(**_args(broker, pki, "dev-async"))
        # Driven by the event loop: no thread of the transport's own is left (or was needed).
        assert set(threading.enumerate()) - threads_before == set()
        return result

    with FakeDps(broker.plain_port) as dps:
        threads_before = set(threading.enumerate())
        assignment = asyncio.run(main())
    assert assignment.assigned_hub == HUB
    assert assignment.device_id == "dev-async"
    assert [kind for kind, _, _ in dps.requests] == ["register", "poll"]


def test_service_error_is_raised_with_what_dps_said(broker: Broker, pki: Pki) -> None:
    with FakeDps(broker.plain_port, mode="deny"), pytest.raises(DpsServiceError) as info:
        dps_proto.provision(**_args(broker, pki, "dev-denied"))
    assert info.value.status == 401
    assert info.value.error_code == 401002
    assert info.value.tracking_id == "track-1"


def test_service_error_async(broker: Broker, pki: Pki) -> None:
    with FakeDps(broker.plain_port, mode="deny"), pytest.raises(DpsServiceError) as info:
        asyncio.run(dps_proto.provision_async(**_args(broker, pki, "dev-denied-a")))
    assert info.value.error_code == 401002


def test_no_answer_times_out(broker: Broker, pki: Pki) -> None:
    with pytest.raises(ProvisioningTimeout):
        dps_proto.provision(**_args(broker, pki, "dev-silent", timeout=2.0))


def test_no_answer_times_out_async(broker: Broker, pki: Pki) -> None:
    with pytest.raises(ProvisioningTimeout):
        asyncio.run(dps_proto.provision_async(**_args(broker, pki, "dev-silent-a", timeout=1.5)))


def test_reconnects_when_the_connection_drops(
    broker: Broker, pki: Pki, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.INFO, logger="dps_proto")
    tokens: list[str] = []
    original = mqtt_transport._Settings.credentials

    def credentials(self: mqtt_transport._Settings, wall_now: float) -> tuple[str, str]:
        user, password = original(self, wall_now)
        tokens.append(password)
        return user, password

    monkeypatch.setattr(mqtt_transport._Settings, "credentials", credentials)
    with FakeDps(broker.plain_port, mode="kick") as dps:
        assignment = dps_proto.provision(**_args(broker, pki, "dev-kicked"))
    assert dps.kicked.is_set()
    assert assignment.device_id == "dev-kicked"
    assert [kind for kind, _, _ in dps.requests] == ["register", "register", "poll"]
    assert "reconnecting" in caplog.text
    assert len(tokens) == 2  # a fresh SAS token for the new connection


def test_gives_up_after_three_reconnects(broker: Broker, pki: Pki) -> None:
    with (
        FakeDps(broker.plain_port, mode="kick-always") as dps,
        pytest.raises(DpsConnectionError, match="gave up after 3 reconnects"),
    ):
        dps_proto.provision(**_args(broker, pki, "dev-kicked-often"))
    assert [kind for kind, _, _ in dps.requests] == ["register"] * 4


def test_reconnects_when_the_connection_drops_async(broker: Broker, pki: Pki) -> None:
    with FakeDps(broker.plain_port, mode="kick") as dps:
        assignment = asyncio.run(dps_proto.provision_async(**_args(broker, pki, "dev-kicked-a")))
    assert dps.kicked.is_set()
    assert assignment.device_id == "dev-kicked-a"


@pytest.mark.parametrize("use_async", [False, True])
def test_untrusted_server_certificate(broker: Broker, pki: Pki, use_async: bool) -> None:
    args = _args(broker, pki, "dev-wrong-ca", ca_file=pki.wrong_ca_file)
    with pytest.raises(DpsConnectionError, match="certificate"):
        if use_async:
            asyncio.run(dps_proto.provision_async(**args))
        else:
            dps_proto.provision(**args)


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
            asyncio.run(dps_proto.provision_async(**args))
        else:
            dps_proto.provision(**args)


# -- a scripted TLS MQTT server: CONNACK refusals, coalesced packets ---------------------------


class ScriptedServer(ScriptedTlsServer):
    """Accepts one TLS connection and plays a fixed script.

    With ``return_code`` it answers CONNECT with that CONNACK return code. Otherwise it accepts,
    grants the subscription and answers the register request with PUBACK *and* a 200 assigned
    response in a single TLS record, so a client must read bytes already decrypted inside the
    SSL object (the selector sees nothing more on the socket).
    """

    io_timeout = 10.0

    def __init__(self, pki: Pki, return_code: int | None = None) -> None:
        super().__init__(pki, connections=1)
        self.return_code = return_code

    def script(self, conn: ssl.SSLSocket) -> None:
        first, _ = read_packet(conn)
        assert first == 0x10  # CONNECT
        conn.sendall(packet(0x20, bytes([0, self.return_code or 0])))
        if self.return_code:
            conn.recv(1)  # wait for the client to close
            return
        first, body = read_packet(conn)
        assert first == 0x82  # SUBSCRIBE
        conn.sendall(packet(0x90, body[:2] + b"\x01"))
        first, body = read_packet(conn)
        assert first & 0xF6 == 0x32  # PUBLISH, QoS 1
        topic_length = int.from_bytes(body[:2], "big")
        request = parse_request_topic(body[2 : 2 + topic_length].decode())
        packet_id = body[2 + topic_length : 4 + topic_length]
        state = RegistrationState(
            registration_id="dev-coalesced",
            status="assigned",
            assigned_hub=HUB,
            device_id="dev-coalesced",
        )
        topic = response_topic(200, request.rid).encode()
        answer = encode_json(OperationStatus("op-1", "assigned", state))
        conn.sendall(
            packet(0x40, packet_id)  # PUBACK
            + packet(0x30, len(topic).to_bytes(2, "big") + topic + answer)  # PUBLISH QoS 0
        )
        while True:
            read_packet(conn)  # until DISCONNECT or close


@pytest.mark.parametrize("use_async", [False, True])
def test_packets_sharing_a_tls_record_are_all_read(pki: Pki, use_async: bool) -> None:
    with ScriptedServer(pki) as server:
        args: dict[str, Any] = {
            "provisioning_host": "localhost",
            "port": server.port,
            "id_scope": ID_SCOPE,
            "registration_id": "dev-coalesced",
            "symmetric_key": DEVICE_KEY,
            "ca_file": pki.ca_file,
            "timeout": 5.0,
        }
        if use_async:
            assignment = asyncio.run(dps_proto.provision_async(**args))
        else:
            assignment = dps_proto.provision(**args)
    assert assignment.device_id == "dev-coalesced"


@pytest.mark.parametrize(("return_code", "use_async"), [(4, False), (5, True), (3, False)])
def test_connack_refused(pki: Pki, return_code: int, use_async: bool) -> None:
    with ScriptedServer(pki, return_code) as server:
        args: dict[str, Any] = {
            "provisioning_host": "localhost",
            "port": server.port,
            "id_scope": ID_SCOPE,
            "registration_id": "dev-refused",
            "symmetric_key": DEVICE_KEY,
            "ca_file": pki.ca_file,
            "timeout": 10.0,
        }
        with pytest.raises(DpsConnectionError) as info:
            if use_async:
                asyncio.run(dps_proto.provision_async(**args))
            else:
                dps_proto.provision(**args)
    assert info.value.return_code == return_code
    assert f"return code {return_code}" in str(info.value)
    if return_code in (4, 5):
        assert "bad credentials" in str(info.value)


# -- secrets never reach the log ----------------------------------------------------------------


def test_no_secret_in_the_log(broker: Broker, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("dps_proto", "dps_proto.mqtt_transport.paho"):
        caplog.set_level(logging.DEBUG, logger=name)
    with FakeDps(broker.plain_port):
        dps_proto.provision(
            **_args(broker, pki, "dev-log", group_key=GROUP_KEY, symmetric_key=None)
        )
    with ScriptedServer(pki, 4) as server, pytest.raises(DpsConnectionError):
        dps_proto.provision(**_args(broker, pki, "dev-log", port=server.port, timeout=10.0))
    text = caplog.text
    assert "dev-log" in text
    assert "Sending CONNECT" in text  # paho's own debug log was captured too
    derived = derive_device_key(GROUP_KEY, "dev-log")
    for secret in (DEVICE_KEY, GROUP_KEY, derived, "SharedAccessSignature", "sig="):
        assert secret not in text
    assert all(
        secret not in repr(record.args)
        for record in caplog.records
        for secret in (DEVICE_KEY, GROUP_KEY, derived, "SharedAccessSignature")
    )
