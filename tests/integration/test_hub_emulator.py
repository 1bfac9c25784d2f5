"""The emulated IoT Hub with real peers: a mosquitto broker for telemetry routing, plain paho
device clients behaving like Microsoft's Python SDK (clean_session=0, subscribe once), a restart
of the emulator on its state directory, and the ``dps-mqtt`` hub verbs."""

from __future__ import annotations

import json
import os
import queue
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from dps_mqtt.cli import main as cli_main
from dps_proto import KeySigner
from emulator.config import EmulatorConfig
from emulator.dps_service import DpsConfig
from emulator.mqtt_codec import PubAck, Publish
from emulator.server import Emulator, EmulatorThread
from emulator.service_client import ServiceClient
from hub_proto.auth import sas_password
from hub_proto.topics import parse_c2d_topic, parse_method_request_topic
from tests.conftest import ID_SCOPE, start_emulator
from tests.emulator.test_hub_server import (
    DESIRED,
    METHODS,
    TWIN_RES,
    Device,
    c2d_filter,
    hub_connect,
    provision_device,
    publish,
    reported,
    subscribe,
    twin_get,
    wait_for,
)

IO_TIMEOUT = 10.0
MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def mosquitto_port(tmp_path: Path) -> Iterator[int]:
    """A plain mosquitto on a free loopback port, stopped after the test."""
    if MOSQUITTO is None:
        if os.environ.get("CI"):
            pytest.fail("CI must have mosquitto (make test installs it)")
        pytest.skip("mosquitto is not installed")
    port = _free_port()
    config = tmp_path / "mosquitto.conf"
    lines = [
        f"listener {port} 127.0.0.1",
        "allow_anonymous true",
        "set_tcp_nodelay true",
        "persistence false",
    ]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.insert(0, "user root")
    config.write_text("\n".join(lines) + "\n")
    process = subprocess.Popen(
        [MOSQUITTO, "-c", str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + IO_TIMEOUT
        while True:
            if process.poll() is not None:
                assert process.stderr is not None
                pytest.fail(f"mosquitto exited: {process.stderr.read().decode(errors='replace')}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "mosquitto did not start listening"
                time.sleep(0.05)
        yield port
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)


def routed_emulator(route_to: str) -> EmulatorThread:
    config = EmulatorConfig(
        mqtt_port=0, api_port=0, https_port=0, id_scope=ID_SCOPE, route_to=route_to
    )
    thread = EmulatorThread(config, dps_config=DpsConfig(id_scope=ID_SCOPE, retry_after=0))
    thread.start()
    return thread


class PahoPeer:
    """A paho client on a background loop whose messages land in a queue."""

    def __init__(self, client_id: str, *, clean_session: bool = True) -> None:
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connected = threading.Event()
        self.subscribed = threading.Event()
        self.session_present: bool | None = None
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda c, u, message: self.messages.put(message)
        self.client.on_subscribe = lambda c, u, mid, codes, props: self.subscribed.set()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            self.session_present = bool(flags.session_present)
            self.connected.set()

    def start(self, host: str, port: int) -> None:
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(IO_TIMEOUT), "paho did not connect"

    def subscribe(self, *filters: str) -> None:
        self.subscribed.clear()
        self.client.subscribe([(f, 1) for f in filters])
        assert self.subscribed.wait(IO_TIMEOUT), "no SUBACK"

    def next(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=IO_TIMEOUT)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def paho_device(emulator: Emulator, device: Device, *, clean_session: bool) -> PahoPeer:
    """A device on plain paho over TLS, as the Python SDK connects."""
    peer = PahoPeer(device.device_id, clean_session=clean_session)
    password = sas_password(
        device.hub, device.device_id, KeySigner.from_base64(device.key), int(time.time()) + 3600
    )
    peer.client.username_pw_set(
        f"{device.hub}/{device.device_id}/?api-version=2019-10-01", password
    )
    peer.client.tls_set(ca_certs=str(emulator.ca_file))
    peer.start("localhost", emulator.mqtt_port)
    return peer


# -- telemetry routing --------------------------------------------------------------------------


def test_telemetry_is_routed_to_mosquitto(mosquitto_port: int) -> None:
    thread = routed_emulator(f"mqtt://127.0.0.1:{mosquitto_port}")
    subscriber = PahoPeer("route-watcher")
    try:
        emulator = thread.emulator
        assert emulator is not None
        service = ServiceClient(emulator.api_url)
        wait_for(lambda: bool(service.info()["telemetryRoute"]["connected"]))
        subscriber.start("127.0.0.1", mosquitto_port)
        subscriber.subscribe("devices/+/messages/events")
        device = provision_device(emulator, service, "dev-routed")
        client, _ = hub_connect(emulator, device)
        try:
            topic = (
                "devices/dev-routed/messages/events/"
                "%24.mid=m-1&%24.ct=application%2Fjson&zone=a%20b"
            )
            packet_id = client.packet_id()
            client.send(Publish(topic, b'{"t": 20.5}', 1, packet_id))
            client.read_until(lambda p: p == PubAck(packet_id))
        finally:
            client.close()

        message = subscriber.next()
        assert message.topic == "devices/dev-routed/messages/events"
        envelope = json.loads(message.payload)
        assert envelope["deviceId"] == "dev-routed"
        assert envelope["properties"] == {"zone": "a b"}
        assert envelope["systemProperties"]["message-id"] == "m-1"
        assert envelope["systemProperties"]["content-type"] == "application/json"
        assert envelope["body"] == '{"t": 20.5}' and envelope["bodyEncoding"] == "utf-8"
        assert envelope["enqueuedTime"].endswith("Z")
        wait_for(lambda: service.info()["telemetryRoute"]["forwarded"] == 1)
        stats = service.info()["telemetryRoute"]
        assert stats["failed"] == stats["dropped"] == 0
    finally:
        subscriber.stop()
        thread.stop()


def test_an_absent_broker_never_blocks_the_hub() -> None:
    thread = routed_emulator(f"mqtt://127.0.0.1:{_free_port()}")
    try:
        emulator = thread.emulator
        assert emulator is not None
        service = ServiceClient(emulator.api_url)
        wait_for(lambda: service.info()["telemetryRoute"]["connectFailures"] >= 1)
        device = provision_device(emulator, service, "dev-unrouted")
        client, _ = hub_connect(emulator, device)
        try:
            for i in range(3):
                packet_id = client.packet_id()
                client.send(
                    Publish("devices/dev-unrouted/messages/events/", b"%d" % i, 1, packet_id)
                )
                client.read_until(lambda p, i=packet_id: p == PubAck(i))
        finally:
            client.close()
        assert [m["body"] for m in service.telemetry("dev-unrouted")] == ["0", "1", "2"]
        stats = service.info()["telemetryRoute"]
        assert stats["connected"] is False and stats["queued"] == 3 and stats["forwarded"] == 0
    finally:
        thread.stop()


# -- an SDK-like device on plain paho -----------------------------------------------------------


def test_paho_device_with_persistent_session(emulator: Emulator, service: ServiceClient) -> None:
    device = provision_device(emulator, service, "dev-paho")
    peer = paho_device(emulator, device, clean_session=False)
    try:
        assert peer.session_present is False
        peer.subscribe(TWIN_RES, DESIRED, METHODS, c2d_filter("dev-paho"))
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(service.invoke_method, "dev-paho", "blink", {"times": 2}, timeout=10)
            request = peer.next()
            parsed = parse_method_request_topic(request.topic)
            assert parsed.name == "blink" and json.loads(request.payload) == {"times": 2}
            peer.client.publish(
                f"$iothub/methods/res/200/?$rid={parsed.rid}", b'{"done": true}', qos=1
            )
            assert call.result(IO_TIMEOUT) == {"status": 200, "payload": {"done": True}}
    finally:
        peer.stop()
    wait_for(lambda: service.get_device("dev-paho")["connectionState"] == "Disconnected")

    again = paho_device(emulator, device, clean_session=False)
    try:
        assert again.session_present is True
        service.send_c2d("dev-paho", "after reconnect", properties={"k": "v"})
        message = again.next()
        assert message.payload == b"after reconnect"
        assert parse_c2d_topic(message.topic).message.properties == {"k": "v"}
        service.update_twin("dev-paho", desired={"led": "on"})
        desired = again.next()
        assert json.loads(desired.payload) == {"led": "on", "$version": 2}
        wait_for(lambda: service.get_device("dev-paho")["cloudToDeviceMessageCount"] == 0)
    finally:
        again.stop()


# -- restart ------------------------------------------------------------------------------------


def test_state_survives_an_emulator_restart(tmp_path: Path) -> None:
    state = tmp_path / "state"
    thread = start_emulator(state)
    try:
        emulator = thread.emulator
        assert emulator is not None
        service = ServiceClient(emulator.api_url)
        device = provision_device(emulator, service, "dev-restart")
        client, _ = hub_connect(emulator, device, clean_session=False)
        try:
            assert subscribe(client, TWIN_RES, c2d_filter("dev-restart")) == (1, 1)
            assert reported(client, {"fw": "2.0"})[:2] == (204, 2)
            publish(client, "devices/dev-restart/messages/events/", b"kept", qos=1)
            client.read_until(lambda p: isinstance(p, PubAck))
        finally:
            client.close()
        wait_for(lambda: service.get_device("dev-restart")["connectionState"] == "Disconnected")
        service.send_c2d("dev-restart", "sent while offline")
        service.update_twin("dev-restart", desired={"mode": "eco"})
    finally:
        thread.stop()

    thread = start_emulator(state)
    try:
        emulator = thread.emulator
        assert emulator is not None
        service = ServiceClient(emulator.api_url)
        assert service.get_device("dev-restart")["cloudToDeviceMessageCount"] == 1
        client, connack = hub_connect(emulator, device, clean_session=False)
        try:
            assert connack.session_present is True
            message = client.publishes()
            assert message.payload == b"sent while offline"
            twin, _ = twin_get(client)
            assert twin == {
                "desired": {"mode": "eco", "$version": 2},
                "reported": {"fw": "2.0", "$version": 2},
            }
        finally:
            client.close()
        wait_for(lambda: service.get_device("dev-restart")["cloudToDeviceMessageCount"] == 0)
        assert [m["body"] for m in service.telemetry("dev-restart")] == ["kept"]
    finally:
        thread.stop()


# -- command line -------------------------------------------------------------------------------


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_hub_verbs(
    emulator: Emulator,
    service: ServiceClient,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    api = ("--api", emulator.api_url)
    device = provision_device(emulator, service, "dev-cli", initial_twin={"tags": {"a": 1}})

    code, out, _ = _run(capsys, "device", "list", *api)
    assert code == 0 and [d["deviceId"] for d in json.loads(out)] == ["dev-cli"]
    code, out, _ = _run(capsys, "device", "show", "dev-cli", *api)
    assert code == 0 and json.loads(out)["status"] == "enabled"
    code, out, _ = _run(capsys, "twin", "show", "dev-cli", *api)
    assert code == 0 and json.loads(out)["tags"] == {"a": 1}
    code, out, _ = _run(
        capsys, "twin", "update", "dev-cli", "--desired", '{"rate": 3}', "--tags", '{"b": 2}', *api
    )
    twin = json.loads(out)
    assert code == 0 and twin["properties"]["desired"] == {"rate": 3, "$version": 2}
    assert twin["tags"] == {"a": 1, "b": 2}
    code, _, err = _run(capsys, "twin", "update", "dev-cli", *api)
    assert code == 1 and "--desired" in err
    code, _, err = _run(capsys, "method", "invoke", "dev-cli", "reboot", "--timeout", "1", *api)
    assert code == 1 and "404" in err

    client, _ = hub_connect(emulator, device)
    try:
        assert subscribe(client, METHODS, c2d_filter("dev-cli")) == (1, 1)
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(
                _run,
                capsys,
                "method",
                "invoke",
                "dev-cli",
                "reboot",
                "--payload",
                '{"in": 5}',
                *api,
            )
            request = client.publishes()
            rid = parse_method_request_topic(request.topic).rid
            assert json.loads(request.payload) == {"in": 5}
            publish(client, f"$iothub/methods/res/200/?$rid={rid}", b'{"out": 6}')
            code, out, _ = call.result(IO_TIMEOUT)
        assert code == 0 and json.loads(out) == {"status": 200, "payload": {"out": 6}}

        code, out, _ = _run(
            capsys, "c2d", "send", "dev-cli", "hello", "--property", "k=v", "--property", "x=", *api
        )
        assert code == 0 and json.loads(out) == {"deviceId": "dev-cli", "queued": True}
        message = client.publishes()
        assert message.payload == b"hello"
        assert parse_c2d_topic(message.topic).message.properties == {"k": "v", "x": ""}

        for body in (b"one", b"two"):
            publish(client, "devices/dev-cli/messages/events/", body, qos=1)
            client.read_until(lambda p: isinstance(p, PubAck))
    finally:
        client.close()

    code, out, _ = _run(capsys, "telemetry", "tail", "dev-cli", *api)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [m["body"] for m in lines] == ["one", "two"]
    code, out, _ = _run(
        capsys, "telemetry", "tail", "dev-cli", "--since", str(lines[0]["seq"]), *api
    )
    assert [json.loads(line)["body"] for line in out.splitlines()] == ["two"]

    polls: list[float] = []

    def sleep(seconds: float) -> None:
        polls.append(seconds)
        if len(polls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("dps_mqtt.cli.time.sleep", sleep)
    code, out, _ = _run(capsys, "telemetry", "tail", "dev-cli", "--follow", *api)
    assert code == 130 and polls == [0.5, 0.5]
    assert [json.loads(line)["body"] for line in out.splitlines()] == ["one", "two"]
