"""The emulated IoT Hub over real loopback TLS, driven by a raw MQTT client (the emulator's codec).

Devices are provisioned through the emulator's DPS with ``dps_proto.provision`` and connect to the
assigned hub with a ``hub_proto.auth.sas_password`` token. Every read is bounded; "nothing else
arrived" is checked by ordering (a later answer arrives first), never by waiting.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dps_proto import KeySigner, provision
from emulator.hub_service import HubConfig
from emulator.hub_store import HubStore
from emulator.mqtt_codec import (
    ConnAck,
    Connect,
    MqttProtocolError,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    Publish,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    encode,
)
from emulator.server import Emulator, EmulatorThread
from emulator.service_client import ServiceApiError, ServiceClient
from hub_proto.auth import sas_password
from hub_proto.topics import parse_c2d_topic, parse_method_request_topic, parse_twin_response_topic
from tests.conftest import ID_SCOPE, start_emulator
from tests.support.raw_mqtt import (
    IO_TIMEOUT,
    RawClient,
    is_closed,
    open_tls,
    qos2_publish,
    wait_for,
)

TWIN_RES = "$iothub/twin/res/#"
DESIRED = "$iothub/twin/PATCH/properties/desired/#"
METHODS = "$iothub/methods/POST/#"


def c2d_filter(device_id: str) -> str:
    return f"devices/{device_id}/messages/devicebound/#"


# -- helpers ------------------------------------------------------------------------------------


class HubClient(RawClient):
    """A raw client (acknowledging QoS 1 deliveries only while ``auto_ack`` is set) that can
    wait for the next PUBLISH."""

    def publishes(self, timeout: float = IO_TIMEOUT) -> Publish:
        packet, _ = self.read_until(lambda p: isinstance(p, Publish), timeout)
        assert isinstance(packet, Publish)
        return packet


@dataclass(frozen=True)
class Device:
    hub: str
    device_id: str
    key: str


def provision_device(
    emulator: Emulator, service: ServiceClient, registration_id: str, **enrollment: Any
) -> Device:
    """Create an enrollment and register through the emulator's DPS over MQTT."""
    created = service.create_enrollment(registration_id, **enrollment)
    key = created["attestation"]["symmetricKey"]["primaryKey"]
    assignment = provision(
        provisioning_host="localhost",
        port=emulator.mqtt_port,
        ca_file=str(emulator.ca_file),
        id_scope=ID_SCOPE,
        registration_id=registration_id,
        symmetric_key=key,
        timeout=30.0,
    )
    return Device(assignment.assigned_hub, assignment.device_id, key)


def hub_connect_packet(
    device: Device,
    *,
    clean_session: bool = True,
    expiry: int | None = None,
    key: str | None = None,
    client_id: str | None = None,
    username: str | None = None,
) -> Connect:
    expiry = int(time.time()) + 3600 if expiry is None else expiry
    password = sas_password(
        device.hub, device.device_id, KeySigner.from_base64(key or device.key), expiry
    )
    return Connect(
        client_id=device.device_id if client_id is None else client_id,
        username=username or f"{device.hub}/{device.device_id}/?api-version=2021-04-12",
        password=password.encode(),
        clean_session=clean_session,
        keep_alive=60,
    )


def open_client(emulator: Emulator) -> HubClient:
    return HubClient(open_tls(emulator).sock)


def hub_connect(
    emulator: Emulator, device: Device, *, auto_ack: bool = True, **kw: Any
) -> tuple[HubClient, ConnAck]:
    """Open TLS, send CONNECT, require an accepting CONNACK."""
    client = open_client(emulator)
    client.auto_ack = auto_ack
    try:
        client.send(hub_connect_packet(device, **kw))
        connack, _ = client.read_until(lambda p: isinstance(p, ConnAck))
        assert isinstance(connack, ConnAck) and connack.return_code == 0, connack
    except BaseException:
        client.close()
        raise
    return client, connack


def connect_code(emulator: Emulator, packet: Connect) -> int:
    """CONNACK return code for a refused CONNECT; the server then closes the connection."""
    client = open_client(emulator)
    try:
        client.send(packet)
        connack, _ = client.read_until(lambda p: isinstance(p, ConnAck))
        assert isinstance(connack, ConnAck) and connack.return_code != 0
        assert is_closed(client)
        return connack.return_code
    finally:
        client.close()


def subscribe(client: RawClient, *filters: str, qos: int = 1) -> tuple[int, ...]:
    packet_id = client.packet_id()
    client.send(Subscribe(packet_id, tuple((f, qos) for f in filters)))
    suback, _ = client.read_until(lambda p: isinstance(p, SubAck) and p.packet_id == packet_id)
    assert isinstance(suback, SubAck)
    return suback.return_codes


def publish(client: RawClient, topic: str, payload: bytes = b"", qos: int = 0) -> None:
    client.send(Publish(topic, payload, qos, client.packet_id() if qos else None))


def twin_request(
    client: HubClient, topic: str, payload: bytes = b""
) -> tuple[int, int | None, bytes, list[Packet]]:
    """Send a twin request; return status, $version, body and the packets that came first."""
    rid = f"r{client.packet_id()}"
    publish(client, f"{topic}?$rid={rid}", payload)

    def is_answer(packet: Packet) -> bool:
        return (
            isinstance(packet, Publish)
            and packet.topic.startswith("$iothub/twin/res/")
            and parse_twin_response_topic(packet.topic).rid == rid
        )

    packet, skipped = client.read_until(is_answer)
    assert isinstance(packet, Publish)
    answer = parse_twin_response_topic(packet.topic)
    return answer.status, answer.version, packet.payload, skipped


def twin_get(client: HubClient) -> tuple[dict[str, Any], list[Packet]]:
    status, _, body, skipped = twin_request(client, "$iothub/twin/GET/")
    assert status == 200
    return json.loads(body), skipped


def reported(client: HubClient, patch: Any) -> tuple[int, int | None, bytes]:
    payload = patch if isinstance(patch, bytes) else json.dumps(patch).encode()
    status, version, body, _ = twin_request(
        client, "$iothub/twin/PATCH/properties/reported/", payload
    )
    return status, version, body


@pytest.fixture
def device(emulator: Emulator, service: ServiceClient) -> Device:
    return provision_device(
        emulator,
        service,
        "dev-a",
        initial_twin={"tags": {"site": "lab"}, "properties": {"desired": {"rate": 5}}},
    )


@pytest.fixture
def client(emulator: Emulator, device: Device) -> Iterator[HubClient]:
    connection, _ = hub_connect(emulator, device)
    try:
        yield connection
    finally:
        connection.close()


# -- CONNECT ------------------------------------------------------------------------------------


def test_connect_after_dps_provisioning(
    emulator: Emulator, service: ServiceClient, device: Device
) -> None:
    assert (device.hub, device.device_id) == ("localhost", "dev-a")
    listed = service.list_devices()
    assert [d["deviceId"] for d in listed] == ["dev-a"]
    assert listed[0]["connectionState"] == "Disconnected"

    client, connack = hub_connect(emulator, device)
    try:
        assert connack == ConnAck(False, 0)
        assert service.get_device("dev-a")["connectionState"] == "Connected"
        assert subscribe(client, TWIN_RES) == (1,)
        twin, _ = twin_get(client)
        assert twin == {"desired": {"rate": 5, "$version": 1}, "reported": {"$version": 1}}
    finally:
        client.close()
    wait_for(lambda: service.get_device("dev-a")["connectionState"] == "Disconnected")


def test_group_device_connects_with_its_derived_key(
    emulator: Emulator, service: ServiceClient
) -> None:
    group = service.create_group("line-1")
    group_key = group["attestation"]["symmetricKey"]["primaryKey"]
    assignment = provision(
        provisioning_host="localhost",
        port=emulator.mqtt_port,
        ca_file=str(emulator.ca_file),
        id_scope=ID_SCOPE,
        registration_id="line-1-dev",
        group_key=group_key,
        timeout=30.0,
    )
    from dps_proto import derive_device_key

    member = Device(
        assignment.assigned_hub, "line-1-dev", derive_device_key(group_key, "line-1-dev")
    )
    client, _ = hub_connect(emulator, member)
    client.close()
    assert connect_code(emulator, hub_connect_packet(member, key=group_key)) == 5


def test_bad_credentials_are_refused(emulator: Emulator, device: Device) -> None:
    other_key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
    assert connect_code(emulator, hub_connect_packet(device, key=other_key)) == 5
    expired = int(time.time()) - 3600
    assert connect_code(emulator, hub_connect_packet(device, expiry=expired)) == 5
    unknown = Device(device.hub, "nobody", device.key)
    assert connect_code(emulator, hub_connect_packet(unknown)) == 5
    assert connect_code(emulator, hub_connect_packet(device, client_id="someone-else")) == 2
    other_hub = hub_connect_packet(device, username="other.example/dev-a/?api-version=1")
    assert connect_code(emulator, other_hub) == 5
    HubStore.attached(emulator.store).set_device_status("dev-a", "disabled")
    assert connect_code(emulator, hub_connect_packet(device)) == 3


def test_a_new_connection_drops_the_old_one(emulator: Emulator, device: Device) -> None:
    first, _ = hub_connect(emulator, device)
    second, _ = hub_connect(emulator, device)
    try:
        assert is_closed(first)
        assert subscribe(second, TWIN_RES) == (1,)
        twin_get(second)
    finally:
        first.close()
        second.close()


def test_at_most_five_subscriptions(client: HubClient) -> None:
    filters = [
        TWIN_RES,
        DESIRED,
        METHODS,
        c2d_filter("dev-a"),
        "$iothub/methods/POST/reboot/#",
    ]
    assert subscribe(client, *filters) == (1, 1, 1, 1, 1)
    assert subscribe(client, "$iothub/methods/POST/other/#") == (0x80,)
    assert subscribe(client, TWIN_RES, qos=2) == (1,), "re-subscribing is not a new one"
    client.send(Unsubscribe(client.packet_id(), ("$iothub/methods/POST/reboot/#",)))
    client.read_until(lambda p: isinstance(p, UnsubAck))
    assert subscribe(client, "$iothub/methods/POST/other/#") == (1,)


def test_foreign_and_unknown_filters_are_refused(client: HubClient) -> None:
    codes = subscribe(client, c2d_filter("dev-b"), "#", "$iothub/#", "devices/dev-a/#")
    assert codes == (0x80, 0x80, 0x80, 0x80)
    assert subscribe(client, "devices/+/messages/devicebound/#") == (1,)


def test_qos2_publish_closes_only_that_connection(client: HubClient) -> None:
    client.send(qos2_publish("devices/dev-a/messages/events/", b"x"))
    assert is_closed(client)


# -- persistent sessions ------------------------------------------------------------------------


def test_clean_session_0_keeps_subscriptions_across_reconnects(
    emulator: Emulator, service: ServiceClient, device: Device
) -> None:
    first, connack = hub_connect(emulator, device, clean_session=False)
    assert connack.session_present is False
    assert subscribe(first, TWIN_RES, DESIRED, c2d_filter("dev-a")) == (1, 1, 1)
    first.close()
    wait_for(lambda: service.get_device("dev-a")["connectionState"] == "Disconnected")

    again, connack = hub_connect(emulator, device, clean_session=False)
    try:
        assert connack.session_present is True
        service.send_c2d("dev-a", "while connected, never re-subscribed")
        c2d = again.publishes()
        assert c2d.payload == b"while connected, never re-subscribed"
        service.update_twin("dev-a", desired={"rate": 7})
        desired = again.publishes()
        assert desired.topic == "$iothub/twin/PATCH/properties/desired/?$version=2"
        assert json.loads(desired.payload) == {"rate": 7, "$version": 2}
    finally:
        again.close()

    clean, connack = hub_connect(emulator, device, clean_session=True)
    try:
        assert connack.session_present is False
        assert subscribe(clean, TWIN_RES) == (1,)
        service.send_c2d("dev-a", "queued: a clean session has no C2D subscription")
        _, skipped = twin_get(clean)
        assert not [p for p in skipped if isinstance(p, Publish)]
    finally:
        clean.close()
    resumed, connack = hub_connect(emulator, device, clean_session=False)
    resumed.close()
    assert connack.session_present is False, "clean_session=1 discarded the stored session"


# -- telemetry ----------------------------------------------------------------------------------


def test_telemetry_is_stored_with_properties(client: HubClient, service: ServiceClient) -> None:
    topic = (
        "devices/dev-a/messages/events/"
        "%24.mid=m-1&%24.ct=application%2Fjson&%24.ce=utf-8&alert=high%20temp"
    )
    packet_id = client.packet_id()
    client.send(Publish(topic, b'{"t": 40}', 1, packet_id))
    client.read_until(lambda p: p == PubAck(packet_id))
    client.send(Publish("devices/dev-a/messages/events/", b"\x00\xff", 0, None, retain=True))
    wait_for(lambda: len(service.telemetry("dev-a")) == 2)

    first, second = service.telemetry("dev-a")
    assert first["properties"] == {"alert": "high temp"}
    assert first["systemProperties"]["message-id"] == "m-1"
    assert first["systemProperties"]["content-type"] == "application/json"
    assert first["systemProperties"]["content-encoding"] == "utf-8"
    assert first["body"] == '{"t": 40}' and first["deviceId"] == "dev-a"
    assert second["properties"] == {"mqtt-retain": "true"}
    assert (second["body"], second["bodyEncoding"]) == ("AP8=", "base64")
    assert service.telemetry("dev-a", since=first["seq"]) == [second]


def test_telemetry_keeps_the_last_n() -> None:
    thread: EmulatorThread = start_emulator_with_hub(HubConfig(telemetry_keep=3))
    try:
        emulator = thread.emulator
        assert emulator is not None
        api = ServiceClient(emulator.api_url)
        dev = provision_device(emulator, api, "dev-keep")
        client, _ = hub_connect(emulator, dev)
        try:
            for i in range(6):
                packet_id = client.packet_id()
                client.send(
                    Publish("devices/dev-keep/messages/events/", str(i).encode(), 1, packet_id)
                )
                client.read_until(lambda p, i=packet_id: p == PubAck(i))
        finally:
            client.close()
        assert [m["body"] for m in api.telemetry("dev-keep")] == ["3", "4", "5"]
    finally:
        thread.stop()


def start_emulator_with_hub(hub_config: HubConfig) -> EmulatorThread:
    from emulator.config import EmulatorConfig
    from emulator.dps_service import DpsConfig

    config = EmulatorConfig(
        state_dir=None,
        mqtt_port=0,
        api_port=0,
        https_port=0,
        id_scope=ID_SCOPE,
    )
    thread = EmulatorThread(
        config, dps_config=DpsConfig(id_scope=ID_SCOPE, retry_after=0), hub_config=hub_config
    )
    thread.start()
    return thread


def test_telemetry_for_another_device_closes_the_connection(
    emulator: Emulator, service: ServiceClient, client: HubClient
) -> None:
    provision_device(emulator, service, "dev-b")
    publish(client, "devices/dev-b/messages/events/", b"spoofed")
    assert is_closed(client)
    assert service.telemetry("dev-b") == []


# -- twin ---------------------------------------------------------------------------------------


def test_twin_reported_and_desired_with_versions(client: HubClient, service: ServiceClient) -> None:
    assert subscribe(client, TWIN_RES, DESIRED) == (1, 1)
    assert reported(client, {"fw": "1.0", "temp": {"max": 50}})[:2] == (204, 2)
    assert reported(client, {"temp": None})[:2] == (204, 3)
    twin, _ = twin_get(client)
    assert twin["reported"] == {"fw": "1.0", "$version": 3}

    updated = service.update_twin("dev-a", desired={"rate": 10, "mode": "eco"}, tags={"room": "b"})
    assert updated["properties"]["desired"] == {"rate": 10, "mode": "eco", "$version": 2}
    assert updated["tags"] == {"site": "lab", "room": "b"}
    push = client.publishes()
    assert push.topic == "$iothub/twin/PATCH/properties/desired/?$version=2"
    assert json.loads(push.payload) == {"rate": 10, "mode": "eco", "$version": 2}

    service.update_twin("dev-a", tags={"room": None})
    twin, skipped = twin_get(client)
    assert not [p for p in skipped if isinstance(p, Publish)], "a tags change is not pushed"
    assert twin["desired"] == {"rate": 10, "mode": "eco", "$version": 2}
    assert service.get_twin("dev-a")["properties"]["reported"] == {"fw": "1.0", "$version": 3}


def test_twin_limit_violations_answer_400_and_keep_the_connection(
    client: HubClient, service: ServiceClient
) -> None:
    assert subscribe(client, TWIN_RES) == (1,)
    deep: Any = 1
    for _ in range(12):
        deep = {"a": deep}
    assert reported(client, deep)[:2] == (400, None)
    assert reported(client, {f"k{i}": "x" * 1000 for i in range(40)})[0] == 400
    assert reported(client, b"{not json")[0] == 400
    assert reported(client, {"$version": 9})[0] == 400
    assert reported(client, {"ok": True})[:2] == (204, 2)

    with pytest.raises(ServiceApiError) as info:
        service.update_twin("dev-a", desired=deep)
    assert info.value.status == 400
    with pytest.raises(ServiceApiError) as info:
        service.update_twin("dev-a", tags={f"k{i}": "x" * 1000 for i in range(9)})
    assert info.value.status == 400
    twin, _ = twin_get(client)
    assert twin["desired"]["$version"] == 1


# -- direct methods -----------------------------------------------------------------------------


def answer_method(client: HubClient, status: int, payload: bytes) -> tuple[str, Any]:
    """Read the next method request and answer it; returns its name and payload."""
    packet = client.publishes()
    request = parse_method_request_topic(packet.topic)
    publish(client, f"$iothub/methods/res/{status}/?$rid={request.rid}", payload, qos=1)
    return request.name, json.loads(packet.payload)


def test_method_invocation_answered_by_the_device(
    client: HubClient, service: ServiceClient
) -> None:
    assert subscribe(client, METHODS) == (1,)
    with ThreadPoolExecutor(1) as pool:
        call: Future[dict[str, Any]] = pool.submit(
            service.invoke_method, "dev-a", "reboot", {"delay": 3}, timeout=10
        )
        assert answer_method(client, 202, b'{"accepted": true}') == ("reboot", {"delay": 3})
        assert call.result(IO_TIMEOUT) == {"status": 202, "payload": {"accepted": True}}

        call = pool.submit(service.invoke_method, "dev-a", "ping", timeout=10)
        assert answer_method(client, 200, b"") == ("ping", None)
        assert call.result(IO_TIMEOUT) == {"status": 200, "payload": None}


def test_method_errors(emulator: Emulator, service: ServiceClient, device: Device) -> None:
    with pytest.raises(ServiceApiError) as info:
        service.invoke_method("dev-a", "reboot", timeout=1)
    assert (info.value.status, info.value.error_code) == (404, 404103)
    with pytest.raises(ServiceApiError) as info:
        service.invoke_method("nobody", "reboot", timeout=1)
    assert (info.value.status, info.value.error_code) == (404, 404001)

    client, _ = hub_connect(emulator, device)
    try:
        with pytest.raises(ServiceApiError) as info:
            service.invoke_method("dev-a", "reboot", timeout=1)
        assert info.value.status == 404, "connected but not subscribed to methods"
        assert subscribe(client, METHODS) == (1,)
        with pytest.raises(ServiceApiError) as info:
            service.invoke_method("dev-a", "reboot", timeout=0.2)
        assert (info.value.status, info.value.error_code) == (504, 504101)
        with pytest.raises(ServiceApiError) as info:
            service.invoke_method("dev-a", "reboot", timeout=0.01)
        assert info.value.status == 400
        # a late answer to the timed-out call is ignored
        request = parse_method_request_topic(client.publishes().topic)
        publish(client, f"$iothub/methods/res/200/?$rid={request.rid}", b"{}")
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(service.invoke_method, "dev-a", "bad", timeout=10)
            answer_method(client, 200, b"{not json")
            with pytest.raises(ServiceApiError) as info:
                call.result(IO_TIMEOUT)
            assert info.value.status == 502
    finally:
        client.close()


def test_stopping_the_emulator_ends_pending_method_calls() -> None:
    thread = start_emulator()
    try:
        emulator = thread.emulator
        assert emulator is not None
        service = ServiceClient(emulator.api_url)
        device = provision_device(emulator, service, "dev-stop")
        client, _ = hub_connect(emulator, device)
        assert subscribe(client, METHODS) == (1,)
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(service.invoke_method, "dev-stop", "slow", timeout=300)
            client.publishes()  # the request reached the device, which leaves without answering
            client.close()
            wait_for(lambda: service.get_device("dev-stop")["connectionState"] == "Disconnected")
            assert not call.done(), "a call waits for its time-out, not for the connection"
            thread.stop()
            with pytest.raises(ServiceApiError) as info:
                call.result(IO_TIMEOUT)
            assert info.value.status in (0, 503)
    finally:
        thread.stop()


# -- cloud-to-device ----------------------------------------------------------------------------


def test_c2d_delivered_and_removed_on_puback(
    emulator: Emulator, service: ServiceClient, device: Device
) -> None:
    client, _ = hub_connect(emulator, device, auto_ack=False)
    try:
        assert subscribe(client, c2d_filter("dev-a")) == (1,)
        service.send_c2d("dev-a", "open valve", properties={"valve": "3"}, messageId="m-9")
        packet = client.publishes()
        assert packet.qos == 1 and packet.packet_id is not None
        delivered = parse_c2d_topic(packet.topic)
        assert delivered.device_id == "dev-a" and packet.payload == b"open valve"
        assert delivered.message.properties == {"valve": "3"}
        assert delivered.message.message_id == "m-9"
        assert service.get_device("dev-a")["cloudToDeviceMessageCount"] == 1
        client.send(PubAck(packet.packet_id))
        wait_for(lambda: service.get_device("dev-a")["cloudToDeviceMessageCount"] == 0)
    finally:
        client.close()


def test_c2d_waits_while_offline_and_unacked_ones_come_again(
    emulator: Emulator, service: ServiceClient, device: Device
) -> None:
    service.send_c2d("dev-a", "first")
    service.send_c2d("dev-a", b"\x00second")
    client, _ = hub_connect(emulator, device, auto_ack=False)
    try:
        assert subscribe(client, c2d_filter("dev-a")) == (1,)
        assert [client.publishes().payload for _ in range(2)] == [b"first", b"\x00second"]
    finally:
        client.close()
    again, _ = hub_connect(emulator, device)
    try:
        assert subscribe(again, c2d_filter("dev-a")) == (1,)
        assert [again.publishes().payload for _ in range(2)] == [b"first", b"\x00second"]
        wait_for(lambda: service.get_device("dev-a")["cloudToDeviceMessageCount"] == 0)
    finally:
        again.close()


def test_c2d_at_qos0_is_at_most_once(
    emulator: Emulator, service: ServiceClient, client: HubClient
) -> None:
    assert subscribe(client, c2d_filter("dev-a"), qos=0) == (0,)
    service.send_c2d("dev-a", "fire and forget")
    packet = client.publishes()
    assert (packet.qos, packet.payload) == (0, b"fire and forget")
    wait_for(lambda: service.get_device("dev-a")["cloudToDeviceMessageCount"] == 0)


def test_c2d_queue_and_size_limits(service: ServiceClient, device: Device) -> None:
    for i in range(50):
        service.send_c2d("dev-a", f"m{i}")
    with pytest.raises(ServiceApiError) as info:
        service.send_c2d("dev-a", "m50")
    assert (info.value.status, info.value.error_code) == (403, 403004)
    assert service.get_device("dev-a")["cloudToDeviceMessageCount"] == 50
    with pytest.raises(ServiceApiError) as info:
        service.send_c2d("dev-a", b"x" * (64 * 1024 + 1))
    assert info.value.status == 413
    with pytest.raises(ServiceApiError) as info:
        service.send_c2d("nobody", "m")
    assert info.value.status == 404


# -- isolation ----------------------------------------------------------------------------------


def test_a_device_never_sees_another_devices_traffic(
    emulator: Emulator, service: ServiceClient, device: Device
) -> None:
    other = provision_device(emulator, service, "dev-b")
    a, _ = hub_connect(emulator, device)
    b, _ = hub_connect(emulator, other)
    try:
        everything = (TWIN_RES, DESIRED, METHODS, "devices/+/messages/devicebound/#")
        assert subscribe(a, *everything) == (1, 1, 1, 1)
        assert subscribe(b, *everything) == (1, 1, 1, 1)
        assert reported(b, {"b": 1})[0] == 204
        service.update_twin("dev-b", desired={"only": "b"})
        service.send_c2d("dev-b", "for b")
        with ThreadPoolExecutor(1) as pool:
            call = pool.submit(service.invoke_method, "dev-b", "who", timeout=10)
            b_packets = [b.publishes() for _ in range(3)]
            topics = sorted(p.topic.split("/")[0] + "/" + p.topic.split("/")[1] for p in b_packets)
            assert topics == ["$iothub/methods", "$iothub/twin", "devices/dev-b"]
            (request,) = [p for p in b_packets if p.topic.startswith("$iothub/methods/")]
            rid = parse_method_request_topic(request.topic).rid
            # device A cannot answer B's call, even knowing the rid
            publish(a, f"$iothub/methods/res/500/?$rid={rid}", b'{"from": "a"}')
            publish(b, f"$iothub/methods/res/200/?$rid={rid}", b'{"from": "b"}')
            assert call.result(IO_TIMEOUT) == {"status": 200, "payload": {"from": "b"}}
        twin, skipped = twin_get(a)
        assert not [p for p in skipped if isinstance(p, Publish)], "A received B's traffic"
        assert twin["desired"] == {"rate": 5, "$version": 1}
        assert twin["reported"] == {"$version": 1}
    finally:
        a.close()
        b.close()


# -- arbitrary input ----------------------------------------------------------------------------

_PREFIXES = st.sampled_from(
    [
        "",
        "devices/dev-a/messages/events/",
        "devices/dev-b/messages/events/",
        "devices/dev-a/messages/devicebound/",
        "$iothub/twin/GET/?$rid=",
        "$iothub/twin/PATCH/properties/reported/?$rid=",
        "$iothub/twin/PATCH/properties/desired/?$version=",
        "$iothub/methods/res/",
        "$iothub/methods/POST/",
        "$dps/registrations/",
    ]
)
_TOPIC_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="+#\x00", blacklist_categories=("Cs",)),
    max_size=40,
)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    prefix=_PREFIXES,
    rest=_TOPIC_TEXT,
    payload=st.binary(max_size=300) | st.just(b'{"a": {"b": null}}'),
    qos=st.sampled_from([0, 1]),
)
def test_arbitrary_publishes_cost_at_most_their_own_connection(
    hub_pair: tuple[Emulator, Device, Device, list[HubClient]],
    prefix: str,
    rest: str,
    payload: bytes,
    qos: int,
) -> None:
    emulator, fuzzer, _, clients = hub_pair
    topic = prefix + rest
    if not topic:
        return
    try:
        encode(Publish(topic, payload, qos, 1 if qos else None))
    except MqttProtocolError:
        return
    fuzz, _ = hub_connect(emulator, fuzzer)
    clients.append(fuzz)
    publish(fuzz, topic, payload, qos)
    fuzz.send(PingReq())
    try:
        fuzz.read_until(lambda p: isinstance(p, PingResp))
    except (AssertionError, OSError, ssl.SSLError):
        pass  # the hub closed this connection: allowed
    finally:
        fuzz.close()
    watcher = clients[0]
    twin, _ = twin_get(watcher)
    assert twin["reported"]["$version"] == 1


@pytest.fixture
def hub_pair(
    emulator: Emulator, service: ServiceClient
) -> Iterator[tuple[Emulator, Device, Device, list[HubClient]]]:
    fuzzer = provision_device(emulator, service, "dev-a")
    bystander = provision_device(emulator, service, "dev-b")
    watcher, _ = hub_connect(emulator, bystander)
    assert subscribe(watcher, TWIN_RES) == (1,)
    clients = [watcher]
    try:
        yield emulator, fuzzer, bystander, clients
    finally:
        for connection in clients:
            with contextlib.suppress(OSError):
                connection.close()
