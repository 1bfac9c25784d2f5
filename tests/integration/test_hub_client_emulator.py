"""Our hub client against the emulator's hub over TLS: faults on the path, nothing lost."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from dps_proto import Assignment, derive_device_key, provision
from emulator.server import EmulatorThread
from emulator.service_client import ServiceClient
from hub_proto import HubClient, HubRequestError, Message, TicketState
from tests.conftest import ID_SCOPE, start_emulator


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _provision(thread: EmulatorThread, registration_id: str) -> tuple[Assignment, str]:
    emulator = thread.emulator
    assert emulator is not None
    service = ServiceClient(emulator.api_url)
    group = service.create_group("hub-tests")
    key = derive_device_key(group["attestation"]["symmetricKey"]["primaryKey"], registration_id)
    assignment = provision(
        provisioning_host="localhost",
        port=emulator.mqtt_port,
        ca_file=str(emulator.ca_file),
        id_scope=ID_SCOPE,
        registration_id=registration_id,
        symmetric_key=key,
        timeout=30,
    )
    return assignment, key


@pytest.fixture
def restartable(tmp_path: Path) -> Iterator[list[EmulatorThread]]:
    """An emulator with a state directory on a fixed port; tests may restart it in place."""
    threads = [start_emulator(tmp_path / "state", mqtt_port=_free_port())]
    try:
        yield threads
    finally:
        threads[-1].stop()


def test_emulator_restart_mid_stream_loses_nothing(
    restartable: list[EmulatorThread], tmp_path: Path
) -> None:
    first = restartable[0]
    assert first.emulator is not None
    port, ca_file = first.emulator.mqtt_port, str(first.emulator.ca_file)
    assignment, key = _provision(first, "stream-dev")
    client = HubClient.from_assignment(assignment, symmetric_key=key, port=port, ca_file=ca_file)
    with client:
        client.connect(timeout=30)
        tickets = [client.send_message(Message(b"m%d" % n, message_id=f"m{n}")) for n in range(30)]
        client.wait_for(tickets[9], timeout=30)

        first.stop()  # the hub goes away with messages still queued or in flight
        tickets += [
            client.send_message(Message(b"m%d" % n, message_id=f"m{n}")) for n in range(30, 60)
        ]
        restartable.append(start_emulator(tmp_path / "state", mqtt_port=port))

        states = [client.wait_for(ticket, timeout=60) for ticket in tickets]
        stats = client.stats
    assert set(states) == {TicketState.ACKNOWLEDGED}
    emulator = restartable[-1].emulator
    assert emulator is not None
    stored = ServiceClient(emulator.api_url).telemetry(assignment.device_id, limit=1000)
    ids = [m["systemProperties"]["message-id"] for m in stored]
    assert set(ids) == {f"m{n}" for n in range(60)}, "every accepted message reached the hub"
    assert len(ids) - 60 <= stats.resent, "duplicates are only ever resent messages, counted"
    assert client.connection_count >= 2


def test_twin_request_while_the_hub_is_down_fails_and_never_hangs(
    restartable: list[EmulatorThread],
) -> None:
    first = restartable[0]
    assert first.emulator is not None
    assignment, key = _provision(first, "twin-dev")
    client = HubClient.from_assignment(
        assignment,
        symmetric_key=key,
        port=first.emulator.mqtt_port,
        ca_file=str(first.emulator.ca_file),
        request_timeout=2.0,
    )
    with client:
        client.connect(timeout=30)
        assert client.get_twin(timeout=10)["reported"] == {"$version": 1}
        first.stop()
        with pytest.raises(HubRequestError):
            client.get_twin(timeout=15)


def test_devices_never_see_each_others_traffic(restartable: list[EmulatorThread]) -> None:
    thread = restartable[0]
    emulator = thread.emulator
    assert emulator is not None
    service = ServiceClient(emulator.api_url)
    clients: dict[str, HubClient] = {}
    seen: dict[str, list[str]] = {"dev-a": [], "dev-b": []}
    got_c2d = {name: threading.Event() for name in seen}
    for name in seen:
        assignment, key = _provision(thread, name)
        client = HubClient.from_assignment(
            assignment, symmetric_key=key, port=emulator.mqtt_port, ca_file=str(emulator.ca_file)
        )

        def on_c2d(message: Message, name: str = name) -> None:
            seen[name].append(f"c2d:{message.payload.decode()}")
            got_c2d[name].set()

        def on_desired(patch: dict[str, object], version: int, name: str = name) -> None:
            seen[name].append(f"desired:{patch}")

        def on_method(request: object, name: str = name) -> tuple[int, object]:
            seen[name].append("method")
            return 200, {"me": name}

        client.on_c2d(on_c2d)
        client.on_desired(on_desired)
        client.on_method(None, on_method)
        client.connect(timeout=30)
        clients[name] = client
    try:
        service.update_twin("dev-a", desired={"only": "a"})
        assert service.invoke_method("dev-a", "ping", timeout=10)["payload"] == {"me": "dev-a"}
        service.send_c2d("dev-a", "for-a")
        assert got_c2d["dev-a"].wait(10)
        clients["dev-a"].get_twin(timeout=10)
        clients["dev-b"].get_twin(timeout=10)  # a round trip: b has had time to see a leak
    finally:
        for client in clients.values():
            client.close()
    assert seen["dev-b"] == []
    assert "c2d:for-a" in seen["dev-a"] and "method" in seen["dev-a"]
