"""Several linked hubs in one emulator, over real loopback TLS sockets: allocation policies
(hashed with weights, static, geoLatency, custom webhook), reprovisioning policies, and enabling
and disabling devices. Devices use :func:`dps_proto.provision` and
:class:`hub_proto.HubClient` with ``address="127.0.0.1"`` (the hub names do not resolve here)."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

import pytest

from dps_proto import (
    Assignment,
    RegistrationDisabled,
    RegistrationFailed,
    derive_device_key,
    provision,
)
from emulator.config import EmulatorConfig
from emulator.dps_service import DpsConfig
from emulator.server import Emulator, EmulatorThread
from emulator.service_client import ServiceApiError, ServiceClient
from hub_proto import BackoffPolicy, HubAuthError, HubClient, HubError, Message

ID_SCOPE = "0ne00000A11"
HUB_A, HUB_B, HUB_C = HUBS = (
    "hub-a.azure-devices.net",
    "hub-b.azure-devices.net",
    "hub-c.azure-devices.net",
)
WEBHOOK_TIMEOUT = 1.0
#: Bound on every wait for something to happen in the background.
WAIT = 10.0
_serial = itertools.count(1)


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    """One emulator linked to three hubs, shared by the module (tests use their own ids)."""
    config = EmulatorConfig(
        mqtt_port=0,
        api_port=0,
        https_port=0,
        id_scope=ID_SCOPE,
        hubs=HUBS,
        hostnames=("localhost",),
    )
    dps = DpsConfig(id_scope=ID_SCOPE, retry_after=0, webhook_timeout=WEBHOOK_TIMEOUT)
    thread = EmulatorThread(config, dps_config=dps)
    emulator = thread.start()
    try:
        yield emulator
    finally:
        thread.stop()


@pytest.fixture
def service(emulator: Emulator) -> Iterator[ServiceClient]:
    """The service API; every hub's weight and latency are reset after the test."""
    client = ServiceClient(emulator.api_url)
    try:
        yield client
    finally:
        for hub in HUBS:
            client.put_hub(hub)


@dataclass
class Webhook:
    """A custom allocation webhook on loopback; ``respond(request) -> (status, body)``."""

    url: str
    requests: list[dict[str, Any]] = field(default_factory=list)
    respond: Callable[[dict[str, Any]], tuple[int, Any]] = lambda request: (500, None)


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            request = json.loads(self.rfile.read(length))
            hook.requests.append(request)
            status, body = hook.respond(request)
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:
                pass  # DPS gave up (time-out) and closed the connection

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/api/allocate?code=secret"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(WAIT)


# ---------------------------------------------------------------------------- helpers


def group_key(service: ServiceClient, group_id: str, **fields: Any) -> str:
    group = service.create_group(group_id, **fields)
    return str(group["attestation"]["symmetricKey"]["primaryKey"])


def register(emulator: Emulator, registration_id: str, key: str, payload: Any = None) -> Assignment:
    return provision(
        provisioning_host="localhost",
        port=emulator.mqtt_port,
        ca_file=str(emulator.ca_file),
        id_scope=ID_SCOPE,
        registration_id=registration_id,
        symmetric_key=key,
        payload=payload,
        timeout=20,
    )


def hub_client(emulator: Emulator, assignment: Assignment, key: str, **kwargs: Any) -> HubClient:
    return HubClient.from_assignment(
        assignment,
        symmetric_key=key,
        port=emulator.mqtt_port,
        ca_file=str(emulator.ca_file),
        address="127.0.0.1",
        **kwargs,
    )


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def enroll(service: ServiceClient, registration_id: str, **fields: Any) -> str:
    """An individual enrollment; returns its key."""
    created = service.create_enrollment(registration_id, **fields)
    return str(created["attestation"]["symmetricKey"]["primaryKey"])


def move(service: ServiceClient, registration_id: str, hub: str) -> None:
    """Change the enrollment's static hub, keeping everything else (keys included)."""
    body = service.get_enrollment(registration_id)
    body["iotHubHostName"] = hub
    service.put_enrollment(body, etag=body["etag"])


# ---------------------------------------------------------------------------- hub addressing


def test_devices_reach_each_hub_by_address(emulator: Emulator, service: ServiceClient) -> None:
    for hub in HUBS:
        rid = f"addr-{hub.split('.')[0]}"
        key = enroll(service, rid, iot_hub_host_name=hub)
        assignment = register(emulator, rid, key)
        assert assignment.assigned_hub == hub
        with hub_client(emulator, assignment, key) as client:
            client.connect(timeout=WAIT)
            client.wait_for(client.send_message(Message(b"hi", message_id=rid)), timeout=WAIT)
            assert service.get_device(rid)["connectionState"] == "Connected"
        assert [m["body"] for m in service.telemetry(rid)] == ["hi"]
        assert service.get_device(rid)["iotHubHostName"] == hub


def test_hub_host_name_without_address_does_not_resolve(
    emulator: Emulator, service: ServiceClient
) -> None:
    key = enroll(service, "no-address", iot_hub_host_name=HUB_A)
    assignment = register(emulator, "no-address", key)
    client = HubClient.from_assignment(
        assignment, symmetric_key=key, port=emulator.mqtt_port, ca_file=str(emulator.ca_file)
    )
    with client, pytest.raises(HubError, match=r"hub-a\.azure-devices\.net"):
        client.connect(timeout=1)


# ---------------------------------------------------------------------------- policies


def test_hashed_spreads_by_weight(emulator: Emulator, service: ServiceClient) -> None:
    service.put_hub(HUB_A, allocation_weight=3)
    service.put_hub(HUB_B, allocation_weight=1)
    service.put_hub(HUB_C, allocation_weight=0)
    key = group_key(service, "hashed-fleet")
    hubs = Counter(
        register(emulator, f"hashed-{n}", derive_device_key(key, f"hashed-{n}")).assigned_hub
        for n in range(200)
    )
    assert set(hubs) == {HUB_A, HUB_B}, "a hub of weight 0 takes no devices"
    assert 0.65 <= hubs[HUB_A] / 200 <= 0.85, hubs  # weight 3 of 4
    # the same ids land on the same hubs again
    again = register(emulator, "hashed-7", derive_device_key(key, "hashed-7"))
    assert again.substatus == "initialAssignment"


def test_hashed_over_the_enrollments_hubs_only(emulator: Emulator, service: ServiceClient) -> None:
    key = group_key(service, "subset-fleet", allocation_policy="hashed", iot_hubs=[HUB_B, HUB_C])
    hubs = {
        register(emulator, f"subset-{n}", derive_device_key(key, f"subset-{n}")).assigned_hub
        for n in range(30)
    }
    assert hubs == {HUB_B, HUB_C}


def test_static(emulator: Emulator, service: ServiceClient) -> None:
    key = enroll(service, "static-1", allocation_policy="static", iot_hub_host_name=HUB_C)
    assert register(emulator, "static-1", key).assigned_hub == HUB_C
    with pytest.raises(ServiceApiError, match="not linked"):
        enroll(service, "static-2", iot_hub_host_name="hub-x.azure-devices.net")
    with pytest.raises(ServiceApiError, match="static"):
        enroll(service, "static-3", allocation_policy="static")


def test_geo_latency_picks_the_lowest(emulator: Emulator, service: ServiceClient) -> None:
    service.put_hub(HUB_A, latency_ms=80)
    service.put_hub(HUB_B, latency_ms=20)
    service.put_hub(HUB_C, latency_ms=20)
    key = group_key(service, "geo-fleet", allocation_policy="geoLatency")
    hubs = Counter(
        register(emulator, f"geo-{n}", derive_device_key(key, f"geo-{n}")).assigned_hub
        for n in range(30)
    )
    assert set(hubs) == {HUB_B, HUB_C}, "ties between the lowest latencies are hashed"
    service.put_hub(HUB_A, latency_ms=5)
    assert register(emulator, "geo-99", derive_device_key(key, "geo-99")).assigned_hub == HUB_A


# ---------------------------------------------------------------------------- custom webhook


def custom_group(service: ServiceClient, webhook: Webhook, group_id: str, **fields: Any) -> str:
    return group_key(
        service, group_id, allocation_policy="custom", webhook_url=webhook.url, **fields
    )


def test_custom_allocation_payload_and_initial_twin(
    emulator: Emulator, service: ServiceClient, webhook: Webhook
) -> None:
    def respond(request: dict[str, Any]) -> tuple[int, Any]:
        kind = request["deviceRuntimeContext"]["payload"]["kind"]
        hub = HUB_C if kind == "toaster" else HUB_A
        return 200, {
            "iotHubHostName": hub,
            "initialTwin": {"tags": {"kind": kind}, "properties": {"desired": {"rate": 7}}},
            "payload": {"welcome": kind, "hub": hub},
        }

    webhook.respond = respond
    key = custom_group(service, webhook, "custom-fleet", iot_hubs=[HUB_A, HUB_C])
    device_key = derive_device_key(key, "toaster-1")
    assignment = register(emulator, "toaster-1", device_key, payload={"kind": "toaster"})

    assert assignment.assigned_hub == HUB_C
    assert assignment.payload == {"welcome": "toaster", "hub": HUB_C}
    [request] = webhook.requests
    assert request["linkedHubs"] == [HUB_A, HUB_C]
    context = request["deviceRuntimeContext"]
    assert context["registrationId"] == "toaster-1"
    assert context["payload"] == {"kind": "toaster"}
    assert "symmetricKey" in context and "currentIotHubHostName" not in context
    group = request["enrollmentGroup"]
    assert group["enrollmentGroupId"] == "custom-fleet"
    assert group["attestation"] == {"type": "symmetricKey"}, "keys are never sent"
    assert service.get_registration("toaster-1")["payload"] == assignment.payload

    with hub_client(emulator, assignment, device_key) as client:
        client.connect(timeout=WAIT)
        assert client.get_twin(timeout=WAIT)["desired"] == {"rate": 7, "$version": 1}
    assert service.get_twin("toaster-1")["tags"] == {"kind": "toaster"}

    # registering again: the webhook sees where the device is now
    assert register(emulator, "toaster-1", device_key, {"kind": "toaster"}).assigned_hub == HUB_C
    context = webhook.requests[-1]["deviceRuntimeContext"]
    assert context["currentIotHubHostName"] == HUB_C
    assert context["currentDeviceId"] == "toaster-1"


@pytest.mark.parametrize(
    ("respond", "message"),
    [
        (lambda r: (400, {"error": "no"}), "Custom allocation failed with status code: 400"),
        (lambda r: (503, b""), "Custom allocation failed with status code: 503"),
        (lambda r: (200, b"not json"), "not JSON"),
        (lambda r: (200, {"payload": {}}), "no iotHubHostName"),
        (lambda r: (200, {"iotHubHostName": HUB_B}), f"{HUB_B!r}, which is not linked"),
        (lambda r: (200, {"iotHubHostName": "hub-x.azure-devices.net"}), "not linked"),
        (
            lambda r: (200, {"iotHubHostName": HUB_A, "initialTwin": {"bad": 1}}),
            "initialTwin may only contain",
        ),
    ],
    ids=["400", "503", "not-json", "no-hub", "hub-outside-enrollment", "unlinked", "bad-twin"],
)
def test_custom_allocation_failures(
    emulator: Emulator,
    service: ServiceClient,
    webhook: Webhook,
    respond: Callable[[dict[str, Any]], tuple[int, Any]],
    message: str,
) -> None:
    webhook.respond = respond
    key = custom_group(service, webhook, "failing-fleet", iot_hubs=[HUB_A, HUB_C])
    rid = f"failing-{next(_serial)}"  # its own id: DPS throttles polls per registration id
    with pytest.raises(RegistrationFailed) as failure:
        register(emulator, rid, derive_device_key(key, rid))
    assert failure.value.error_code == 400207
    assert message in (failure.value.error_message or "")
    record = service.get_registration(rid)
    assert (record["status"], record["errorCode"]) == ("failed", 400207)


def test_custom_allocation_webhook_down(emulator: Emulator, service: ServiceClient) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key = group_key(
        service,
        "down-fleet",
        allocation_policy="custom",
        webhook_url=f"http://127.0.0.1:{port}/allocate",
    )
    with pytest.raises(RegistrationFailed) as failure:
        register(emulator, "down-1", derive_device_key(key, "down-1"))
    assert failure.value.error_code == 400207
    assert "refused the connection" in (failure.value.error_message or "")


def test_slow_webhook_times_out_without_blocking_the_emulator(
    emulator: Emulator, service: ServiceClient, webhook: Webhook
) -> None:
    entered, release = threading.Event(), threading.Event()

    def respond(request: dict[str, Any]) -> tuple[int, Any]:
        entered.set()
        release.wait(WAIT)
        return 200, {"iotHubHostName": HUB_A}

    webhook.respond = respond
    key = custom_group(service, webhook, "slow-fleet")
    errors: list[BaseException] = []

    def slow_device() -> None:
        try:
            register(emulator, "slow-1", derive_device_key(key, "slow-1"))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=slow_device)
    thread.start()
    try:
        assert entered.wait(WAIT), "the webhook was called"
        # While the webhook hangs, the emulator serves other devices and the service API.
        other_key = enroll(service, "while-slow", iot_hub_host_name=HUB_B)
        assert register(emulator, "while-slow", other_key).assigned_hub == HUB_B
        assert not release.is_set()
        thread.join(WAIT)
        assert not thread.is_alive()
    finally:
        release.set()
        thread.join(WAIT)
    [error] = errors
    assert isinstance(error, RegistrationFailed) and error.error_code == 400207
    assert f"did not answer within {WEBHOOK_TIMEOUT:g} s" in (error.error_message or "")


def test_custom_without_webhook_is_refused(service: ServiceClient) -> None:
    with pytest.raises(ServiceApiError, match="customAllocationDefinition"):
        service.create_group("no-webhook", allocation_policy="custom")
    with pytest.raises(ServiceApiError, match="webhookUrl"):
        service.create_group("bad-webhook", allocation_policy="custom", webhook_url="ftp://x/y")


# ---------------------------------------------------------------------------- reprovisioning


def start_on(emulator: Emulator, service: ServiceClient, rid: str, **fields: Any) -> str:
    """Enroll ``rid`` on hub A with an initial twin, provision it, and give its twin history:
    a reported property and a desired one set by the service. Returns its key."""
    twin = {"tags": {"site": "one"}, "properties": {"desired": {"mode": "initial"}}}
    key = enroll(service, rid, iot_hub_host_name=HUB_A, initial_twin=twin, **fields)
    assignment = register(emulator, rid, key)
    assert (assignment.assigned_hub, assignment.substatus) == (HUB_A, "initialAssignment")
    with hub_client(emulator, assignment, key) as client:
        client.connect(timeout=WAIT)
        client.patch_reported({"firmware": "2.0"}, timeout=WAIT)
    service.update_twin(rid, desired={"mode": "changed"})
    return key


def test_reprovision_and_migrate(emulator: Emulator, service: ServiceClient) -> None:
    key = start_on(emulator, service, "migrate-1")
    first = register(emulator, "migrate-1", key)
    assert first.assigned_hub == HUB_A
    old = hub_client(emulator, first, key, backoff=BackoffPolicy(base=0.05, cap=0.2))
    with old:
        old.connect(timeout=WAIT)
        move(service, "migrate-1", HUB_B)
        moved = register(emulator, "migrate-1", key)
        assert (moved.assigned_hub, moved.substatus) == (HUB_B, "deviceDataMigrated")
        # The old hub identity is gone: its live connection is closed and cannot come back.
        with pytest.raises(HubAuthError):
            old.wait_for(old.send_message(b"to the old hub"), timeout=WAIT)
    twin = service.get_twin("migrate-1")
    assert twin["properties"]["desired"]["mode"] == "changed"
    assert twin["properties"]["reported"]["firmware"] == "2.0"
    assert twin["tags"] == {"site": "one"}
    assert service.get_device("migrate-1")["iotHubHostName"] == HUB_B
    with hub_client(emulator, moved, key) as client:
        client.connect(timeout=WAIT)
        assert client.get_twin(timeout=WAIT)["reported"]["firmware"] == "2.0"

    move(service, "migrate-1", HUB_A)
    back = register(emulator, "migrate-1", key)
    assert (back.assigned_hub, back.substatus) == (HUB_A, "reprovisionedToInitialAssignment")
    assert service.get_registration("migrate-1")["substatus"] == "reprovisionedToInitialAssignment"


def test_reprovision_and_reset(emulator: Emulator, service: ServiceClient) -> None:
    key = start_on(emulator, service, "reset-1", reprovision="reset")
    move(service, "reset-1", HUB_C)
    moved = register(emulator, "reset-1", key)
    assert (moved.assigned_hub, moved.substatus) == (HUB_C, "deviceDataReset")
    twin = service.get_twin("reset-1")
    assert twin["properties"]["desired"] == {"mode": "initial", "$version": 1}
    assert twin["properties"]["reported"] == {"$version": 1}
    assert twin["tags"] == {"site": "one"}
    with hub_client(emulator, moved, key) as client:
        client.connect(timeout=WAIT)
        assert client.get_twin(timeout=WAIT)["desired"]["mode"] == "initial"


def test_never_reprovision(emulator: Emulator, service: ServiceClient) -> None:
    key = start_on(emulator, service, "never-1", reprovision="never")
    move(service, "never-1", HUB_B)
    again = register(emulator, "never-1", key)
    assert (again.assigned_hub, again.substatus) == (HUB_A, "initialAssignment")
    assert service.get_twin("never-1")["properties"]["reported"]["firmware"] == "2.0"


def test_reset_takes_the_webhooks_initial_twin(
    emulator: Emulator, service: ServiceClient, webhook: Webhook
) -> None:
    hubs = [HUB_A]

    def respond(request: dict[str, Any]) -> tuple[int, Any]:
        twin = {"properties": {"desired": {"from": hubs[0]}}}
        return 200, {"iotHubHostName": hubs[0], "initialTwin": twin}

    webhook.respond = respond
    key = custom_group(service, webhook, "custom-reset", reprovision="reset")
    device_key = derive_device_key(key, "custom-reset-1")
    assert register(emulator, "custom-reset-1", device_key).assigned_hub == HUB_A
    service.update_twin("custom-reset-1", desired={"extra": 1})
    hubs[0] = HUB_B
    moved = register(emulator, "custom-reset-1", device_key)
    assert (moved.assigned_hub, moved.substatus) == (HUB_B, "deviceDataReset")
    assert service.get_twin("custom-reset-1")["properties"]["desired"] == {
        "from": HUB_B,
        "$version": 1,
    }


# ---------------------------------------------------------------------------- enable / disable


def test_disabling_a_device_cuts_and_refuses_it(emulator: Emulator, service: ServiceClient) -> None:
    key = enroll(service, "toggle-1", iot_hub_host_name=HUB_B)
    assignment = register(emulator, "toggle-1", key)
    fast = BackoffPolicy(base=0.05, cap=0.2, jitter=0.0)
    with hub_client(emulator, assignment, key, backoff=fast) as client:
        client.connect(timeout=WAIT)
        count = client.connection_count
        assert service.set_device_status("toggle-1", "disabled")["status"] == "disabled"
        wait_until(lambda: not client.connected, "the disabled device's connection to close")
        assert service.get_device("toggle-1")["connectionState"] == "Disconnected"
        with (
            hub_client(emulator, assignment, key) as second,
            pytest.raises(HubError, match="disabled device"),
        ):
            second.connect(timeout=1)
        service.set_device_status("toggle-1", "enabled")
        wait_until(lambda: client.connected, "the enabled device to reconnect on its own")
        assert client.connection_count > count
    with pytest.raises(ServiceApiError, match="status must be"):
        service.request("PATCH", "/devices/toggle-1", {"status": "off"})
    with pytest.raises(ServiceApiError) as missing:
        service.set_device_status("nobody", "disabled")
    assert missing.value.status == 404


def test_disabling_the_enrollment_keeps_the_live_connection(
    emulator: Emulator, service: ServiceClient
) -> None:
    key = enroll(service, "enr-off-1", iot_hub_host_name=HUB_C)
    assignment = register(emulator, "enr-off-1", key)
    with hub_client(emulator, assignment, key) as client:
        client.connect(timeout=WAIT)
        body = service.get_enrollment("enr-off-1")
        body["provisioningStatus"] = "disabled"
        service.put_enrollment(body, etag=body["etag"])
        with pytest.raises(RegistrationDisabled):
            register(emulator, "enr-off-1", key)
        client.wait_for(client.send_message(b"still here"), timeout=WAIT)
        assert client.connected
        assert client.get_twin(timeout=WAIT)["reported"] == {"$version": 1}


# ---------------------------------------------------------------------------- linked hubs API


def test_hub_api_link_update_unlink(emulator: Emulator, service: ServiceClient) -> None:
    assert [h["name"] for h in service.list_linked_hubs()] == list(HUBS)
    assert service.put_hub(HUB_B, allocation_weight=5, latency_ms=12.5) == {
        "name": HUB_B,
        "allocationWeight": 5,
        "latencyMs": 12.5,
    }
    with pytest.raises(ServiceApiError, match="not covered by the emulator's server certificate"):
        service.put_hub("hub-z.example.com")
    key = enroll(service, "unlink-1", iot_hub_host_name=HUB_C)
    assignment = register(emulator, "unlink-1", key)
    with hub_client(emulator, assignment, key, max_auth_failures=1) as client:
        client.connect(timeout=WAIT)
        service.remove_hub(HUB_C)
        try:
            assert service.list_hubs() == [HUB_A, HUB_B]
            with pytest.raises(HubAuthError):
                client.wait_for(client.send_message(b"x"), timeout=WAIT)
        finally:
            service.put_hub(HUB_C)
    with pytest.raises(ServiceApiError) as gone:
        service.remove_hub("hub-z.example.com")
    assert gone.value.status == 404
