"""``make demo``: a device provisioned against a local emulator, printed step by step.

Starts ``dps-mqtt emulator`` as a child process on free loopback ports, creates a symmetric-key
enrollment group through the service API, provisions a device of that group with the library
(MQTT over TLS, SAS token from the derived key), prints the assignment and stops the emulator.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ID_SCOPE = "0ne0000DEMO"
GROUP_ID = "demo-sensors"
REGISTRATION_ID = "sensor-0001"
_READY_LINE = "Press Ctrl-C to stop."


@dataclass(frozen=True)
class RunningEmulator:
    """Where the child emulator listens."""

    process: subprocess.Popen[str]
    mqtt_port: int
    api_url: str
    ca_file: str


def _step(text: str) -> None:
    print(f"==> {text}", flush=True)


def start_emulator(state_dir: Path, timeout: float = 30.0) -> RunningEmulator:
    """Run ``python -m dps_mqtt emulator`` on free ports and read its endpoints from stdout."""
    command = [
        sys.executable,
        "-m",
        "dps_mqtt",
        "emulator",
        "--state-dir",
        str(state_dir),
        "--port",
        "0",
        "--api-port",
        "0",
        "--https-port",
        "0",
        "--id-scope",
        ID_SCOPE,
        "--log-level",
        "WARNING",
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    lines = _read_until_ready(process.stdout, process, timeout)
    text = "\n".join(lines)
    port = re.search(r"DPS \(MQTT over TLS\):\s+\S+:(\d+)", text)
    api = re.search(r"service API:\s+(\S+)", text)
    ca = re.search(r"CA certificate:\s+(\S+)", text)
    if not (port and api and ca):
        process.terminate()
        raise RuntimeError(f"could not read the emulator's endpoints from:\n{text}")
    return RunningEmulator(process, int(port.group(1)), api.group(1), ca.group(1))


def _read_until_ready(stream: IO[str], process: subprocess.Popen[str], timeout: float) -> list[str]:
    deadline = time.monotonic() + timeout
    lines: list[str] = []
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise RuntimeError(f"the emulator exited early (code {process.poll()})")
        print(f"    {line.rstrip()}", flush=True)
        lines.append(line.rstrip())
        if line.strip() == _READY_LINE:
            return lines
    process.terminate()
    raise RuntimeError("the emulator did not report ready in time")


def stop_emulator(emulator: RunningEmulator) -> None:
    """SIGTERM the child and wait for it (kill if it hangs)."""
    emulator.process.terminate()
    try:
        emulator.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        emulator.process.kill()
        emulator.process.wait(timeout=5)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    del argv
    from dps_proto import DpsError, derive_device_key, provision
    from emulator.service_client import ServiceClient

    with tempfile.TemporaryDirectory(prefix="dps-mqtt-demo-") as tmp:
        _step("starting the local DPS emulator")
        emulator = start_emulator(Path(tmp) / "state")
        try:
            service = ServiceClient(emulator.api_url)
            _step(f"creating the symmetric-key enrollment group {GROUP_ID!r}")
            group = service.create_group(GROUP_ID)
            group_key = group["attestation"]["symmetricKey"]["primaryKey"]
            device_key = derive_device_key(group_key, REGISTRATION_ID)
            _step(f"provisioning device {REGISTRATION_ID!r} with its derived key")
            try:
                assignment = provision(
                    provisioning_host="localhost",
                    port=emulator.mqtt_port,
                    id_scope=ID_SCOPE,
                    registration_id=REGISTRATION_ID,
                    symmetric_key=device_key,
                    ca_file=emulator.ca_file,
                    timeout=30,
                )
            except DpsError as exc:
                print(f"provisioning failed: {exc}", file=sys.stderr)
                return 1
            _step("assignment")
            print(json.dumps(assignment.to_json(), indent=2), flush=True)
            _step("the emulator's registration record")
            print(json.dumps(service.get_registration(REGISTRATION_ID), indent=2), flush=True)
        finally:
            _step("stopping the emulator")
            stop_emulator(emulator)
    _step("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
