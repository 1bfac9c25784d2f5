"""Microsoft's IoTHubDeviceClient (azure-iot-device 2.14) works against the emulated hub unchanged.

The SDK program (sdk_programs/sdk_hub.py) runs in the SDK's own virtualenv and reports what the
device sees as JSON lines; the test drives the service side through the service API. The SDK
cannot change port 8883, so the emulator listens there.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from emulator.server import Emulator, EmulatorThread
from emulator.service_client import ServiceClient
from tests.conftest import start_emulator
from tests.emulator.test_hub_server import Device, hub_connect, provision_device, wait_for
from tests.sdk_support import SDK_PROGRAMS, sdk_python

#: Bound on each wait for one event from the SDK program.
EVENT_TIMEOUT = 30.0
#: The SDK program's own deadline for a whole run (it exits 2 after it).
PROGRAM_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def emulator_8883() -> Iterator[Emulator]:
    """An emulator on port 8883, the only port the SDK can use."""
    thread: EmulatorThread = start_emulator(mqtt_port=8883)
    assert thread.emulator is not None
    try:
        yield thread.emulator
    finally:
        thread.stop()


class SdkDevice:
    """The SDK program as a child process; its stdout events arrive in a queue."""

    def __init__(self, emulator: Emulator, device: Device, stderr: Path, *extra: str) -> None:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["PYTHONUNBUFFERED"] = "1"
        self._stderr_path = stderr
        self._stderr: IO[bytes] = open(stderr, "wb")  # noqa: SIM115 - closed in stop()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        command = [
            str(sdk_python()),
            str(SDK_PROGRAMS / "sdk_hub.py"),
            "--host",
            device.hub,
            "--device-id",
            device.device_id,
            "--key",
            device.key,
            "--ca-file",
            str(emulator.ca_file),
            "--timeout",
            str(PROGRAM_TIMEOUT),
            *extra,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=SDK_PROGRAMS,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name="sdk-stdout", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("{"):
                try:
                    self.events.put(json.loads(line))
                except ValueError:
                    self.events.put({"event": "unparsed", "line": line})

    def diagnostics(self) -> str:
        """Events so far and the end of the program's stderr, for assertion messages."""
        self._stderr.flush()
        tail = self._stderr_path.read_text(errors="replace")[-3000:]
        return f"events: {self.seen!r}\nstderr: {tail}"

    def expect(self, event: str, timeout: float = EVENT_TIMEOUT, **fields: Any) -> dict[str, Any]:
        """The next ``event`` (with matching ``fields``), skipping others; an error event fails."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {event!r} event in {timeout} s\n{self.diagnostics()}")
            try:
                item = self.events.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                if self.process.poll() is not None and self.events.empty():
                    self._reader.join(1.0)
                    if self.events.empty():
                        pytest.fail(
                            f"the SDK program exited {self.process.returncode} before {event!r}"
                            f"\n{self.diagnostics()}"
                        )
                continue
            self.seen.append(item)
            if item.get("event") == "error":
                pytest.fail(f"the SDK program failed\n{self.diagnostics()}")
            if item.get("event") == event and all(item.get(k) == v for k, v in fields.items()):
                return item

    def wait_exit(self, timeout: float = EVENT_TIMEOUT) -> int:
        """The program's exit code (it exits by itself after "done")."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the SDK program did not exit\n{self.diagnostics()}")

    def stop(self) -> None:
        """Kill the program if it still runs; close the pipes."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._stderr.close()


def test_sdk_device_client_round_trip(emulator_8883: Emulator, tmp_path: Path) -> None:
    service = ServiceClient(emulator_8883.api_url)
    device = provision_device(emulator_8883, service, "sdk-hub-1", device_id="sdk-hub-dev-1")
    assert device.hub == "localhost" and device.device_id == "sdk-hub-dev-1"
    sdk = SdkDevice(emulator_8883, device, tmp_path / "stderr.txt", "--telemetry", "2")
    try:
        ready = sdk.expect("ready")
        # The twin as the SDK read it, before its reported patch.
        assert ready["twin"] == {"desired": {"$version": 1}, "reported": {"$version": 1}}
        assert service.get_device(device.device_id)["connectionState"] == "Connected"

        messages = service.telemetry(device.device_id)
        assert [json.loads(m["body"])["n"] for m in messages] == [0, 1]
        for index, message in enumerate(messages):
            assert message["properties"] == {"app": "sdk-hub", "seq": str(index), "note": "a b&c=d"}
            system = message["systemProperties"]
            assert system["message-id"] == f"sdk-msg-{index}"
            assert system["content-type"] == "application/json"
            assert system["content-encoding"] == "utf-8"
            assert system["iothub-connection-device-id"] == device.device_id

        reported = service.get_twin(device.device_id)["properties"]["reported"]
        assert reported == {"sdk": {"firmware": "1.2.3"}, "sent": 2, "$version": 2}

        service.update_twin(device.device_id, desired={"interval": 5, "mode": {"eco": True}})
        desired = sdk.expect("desired")
        assert desired["patch"] == {"interval": 5, "mode": {"eco": True}, "$version": 2}

        answer = service.invoke_method(device.device_id, "echo", {"x": [1, "two"]}, timeout=15)
        assert answer == {"status": 200, "payload": {"echo": {"x": [1, "two"]}}}
        method = sdk.expect("method")
        assert method["name"] == "echo" and method["payload"] == {"x": [1, "two"]}

        service.send_c2d(
            device.device_id,
            "hello SDK",
            properties={"k": "v w", "x": "1&2"},
            messageId="c2d-1",
            contentType="text/plain",
            contentEncoding="utf-8",
        )
        c2d = sdk.expect("c2d")
        assert c2d["data"] == "hello SDK"
        assert c2d["custom_properties"] == {"k": "v w", "x": "1&2"}
        assert c2d["message_id"] == "c2d-1"
        assert c2d["content_type"] == "text/plain" and c2d["content_encoding"] == "utf-8"

        sdk.expect("done")
        assert sdk.wait_exit() == 0, sdk.diagnostics()
        # The SDK acknowledged the delivery: the message left the queue.
        wait_for(lambda: service.get_device(device.device_id)["cloudToDeviceMessageCount"] == 0)
    finally:
        sdk.stop()


def test_sdk_reconnects_into_its_persistent_session(
    emulator_8883: Emulator, tmp_path: Path
) -> None:
    """A second connection for the device drops the SDK's; the SDK reconnects (clean_session=0,
    no new SUBSCRIBE) and still gets twin answers and C2D through the subscriptions its session
    kept."""
    service = ServiceClient(emulator_8883.api_url)
    device = provision_device(emulator_8883, service, "sdk-hub-2", device_id="sdk-hub-dev-2")
    sdk = SdkDevice(
        emulator_8883,
        device,
        tmp_path / "stderr.txt",
        "--telemetry",
        "0",
        "--expect",
        "c2d",
        "--retry-interval",
        "1",
    )
    try:
        sdk.expect("ready")
        # The intruder resumes the same persistent session (clean_session=0) so it keeps the
        # SDK's subscriptions; a clean session would erase them, and the SDK never re-subscribes.
        intruder, connack = hub_connect(emulator_8883, device, clean_session=False)
        try:
            assert connack.session_present is True
            sdk.expect("connection", connected=False)
            service.update_twin(device.device_id, desired={"mode": "set-while-away"})
        finally:
            intruder.close()
        sdk.expect("connection", connected=True)
        # After a reconnect the SDK GETs the twin (its ensure_desired_properties) and raises a
        # patch with the missed change; had it reconnected first, the pushed patch is the same.
        # The SDK may report that patch before or after its "connected" callback.
        missed = {"mode": "set-while-away", "$version": 2}
        if not any(e.get("event") == "desired" and e.get("patch") == missed for e in sdk.seen):
            sdk.expect("desired", patch=missed)
        wait_for(lambda: service.get_device(device.device_id)["connectionState"] == "Connected")

        service.send_c2d(device.device_id, "after reconnect", properties={"k": "v"})
        c2d = sdk.expect("c2d")
        assert c2d["data"] == "after reconnect" and c2d["custom_properties"] == {"k": "v"}
        sdk.expect("done")
        assert sdk.wait_exit() == 0, sdk.diagnostics()
    finally:
        sdk.stop()
