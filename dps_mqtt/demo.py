"""``make demo``: a device provisioned against a local emulator and talking to its hub.

Starts ``dps-mqtt emulator`` as a child process on free loopback ports. When a software TPM
(swtpm and tpm2-pytss) is available, the device attests with its TPM: an individual TPM
enrollment, DPS over HTTPS, and hub SAS tokens signed inside the TPM; otherwise it says why and
uses a symmetric-key enrollment group (MQTT, derived key). Either way it then connects to its hub,
sends telemetry, round-trips the twin, answers a direct method invoked through the service API
and receives a cloud-to-device message, printing each step, and stops the emulator.
"""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

if TYPE_CHECKING:
    from dps_proto import Assignment, Signer
    from emulator.service_client import ServiceClient
    from hub_proto import Message, MethodRequest

ID_SCOPE = "0ne0000DEMO"
GROUP_ID = "demo-sensors"
X509_GROUP_ID = "demo-cameras"
REGISTRATION_ID = "sensor-0001"
_READY_LINE = "Press Ctrl-C to stop."


@dataclass(frozen=True)
class RunningEmulator:
    """Where the child emulator listens."""

    process: subprocess.Popen[str]
    mqtt_port: int
    https_port: int
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
    https = re.search(r"DPS \(HTTPS\):\s+\S+:(\d+)", text)
    api = re.search(r"service API:\s+(\S+)", text)
    ca = re.search(r"CA certificate:\s+(\S+)", text)
    if not (port and https and api and ca):
        process.terminate()
        raise RuntimeError(f"could not read the emulator's endpoints from:\n{text}")
    return RunningEmulator(
        process, int(port.group(1)), int(https.group(1)), api.group(1), ca.group(1)
    )


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


def _tpm_unavailable_reason() -> str | None:
    """Why TPM attestation cannot run here, or None when it can."""
    import importlib.util

    from tpm.swtpm import available

    if not available():
        return "swtpm is not installed"
    if importlib.util.find_spec("tpm2_pytss") is None:
        return "tpm2-pytss is not installed (pip install 'dps-mqtt[tpm]')"
    return None


def _provision_with_tpm(
    emulator: RunningEmulator, service: ServiceClient, work: Path, stack: ExitStack
) -> tuple[Assignment, Signer]:
    """An individual TPM enrollment from the TPM's EK; DPS over HTTPS; the hub key in the TPM."""
    from dps_proto import provision_https
    from tpm import SwtpmProcess, TpmDevice

    swtpm = stack.enter_context(SwtpmProcess(work / "swtpm"))
    device = stack.enter_context(TpmDevice(swtpm.tcti))
    device.ensure_keys()
    registration_id = device.registration_id()
    _step(f"software TPM ready; registration id {registration_id} (from its endorsement key)")
    _step("creating an individual TPM enrollment from the EK and SRK")
    service.put_enrollment(
        {
            "registrationId": registration_id,
            "deviceId": "tpm-sensor-0001",
            "attestation": {
                "type": "tpm",
                "tpm": {
                    "endorsementKey": base64.b64encode(device.endorsement_key()).decode(),
                    "storageRootKey": base64.b64encode(device.storage_root_key()).decode(),
                },
            },
            "initialTwin": {"properties": {"desired": {"interval": 10}}},
        }
    )
    _step("provisioning over HTTPS: challenge, activation in the TPM, TPM-signed SAS token")
    assignment = provision_https(
        provisioning_host="localhost",
        port=emulator.https_port,
        ca_file=emulator.ca_file,
        id_scope=ID_SCOPE,
        tpm=device,
        timeout=30,
    )
    return assignment, device.signer()


def _provision_with_group_key(
    emulator: RunningEmulator, service: ServiceClient
) -> tuple[Assignment, Signer]:
    """A symmetric-key enrollment group; DPS over MQTT with the derived device key."""
    from dps_proto import KeySigner, derive_device_key, provision

    _step(f"creating the symmetric-key enrollment group {GROUP_ID!r}")
    group = service.put_group(
        {
            "enrollmentGroupId": GROUP_ID,
            "attestation": {"type": "symmetricKey"},
            "initialTwin": {"properties": {"desired": {"interval": 10}}},
        }
    )
    group_key = group["attestation"]["symmetricKey"]["primaryKey"]
    device_key = derive_device_key(group_key, REGISTRATION_ID)
    _step(f"provisioning device {REGISTRATION_ID!r} over MQTT with its derived key")
    assignment = provision(
        provisioning_host="localhost",
        port=emulator.mqtt_port,
        ca_file=emulator.ca_file,
        id_scope=ID_SCOPE,
        registration_id=REGISTRATION_ID,
        symmetric_key=device_key,
        timeout=30,
    )
    return assignment, KeySigner.from_base64(device_key)


def _talk_to_hub(
    emulator: RunningEmulator, service: ServiceClient, assignment: Assignment, signer: Signer
) -> None:
    """Telemetry, twin, a direct method and a C2D message, each checked from the service side."""
    from hub_proto import HubClient, Message

    desired_seen = threading.Event()
    c2d_seen = threading.Event()
    desired: list[tuple[dict[str, object], int]] = []
    c2d: list[Message] = []

    def on_desired(patch: dict[str, object], version: int) -> None:
        desired.append((patch, version))
        desired_seen.set()

    def on_c2d(message: Message) -> None:
        c2d.append(message)
        c2d_seen.set()

    def on_reboot(request: MethodRequest) -> tuple[int, object]:
        return 200, {"rebooted": True, "request": json.loads(request.payload or b"null")}

    device_id = assignment.device_id
    client = HubClient.from_assignment(
        assignment, signer=signer, port=emulator.mqtt_port, ca_file=emulator.ca_file
    )
    client.on_desired(on_desired)
    client.on_c2d(on_c2d)
    client.on_method("reboot", on_reboot)
    with client:
        _step(f"connecting to hub {assignment.assigned_hub} as {device_id}")
        client.connect(timeout=30)
        _step("sending 3 telemetry messages (QoS 1, with properties)")
        for n in range(3):
            body = json.dumps({"temperature": 20.5 + n}).encode()
            message = Message(
                body,
                properties={"alert": "false"},
                content_type="application/json",
                content_encoding="utf-8",
                message_id=f"msg-{n}",
            )
            client.wait_for(client.send_message(message), timeout=10)
        stored = service.telemetry(device_id)
        last = stored[-1]
        print(
            f"    the hub stored {len(stored)} messages; last: {last['body']} "
            f"properties {last['properties']} message-id {last['systemProperties']['message-id']}",
            flush=True,
        )
        _step("twin: read it, then report the firmware version")
        twin = client.get_twin(timeout=10)
        print(f"    desired (from the enrollment's initial twin): {twin['desired']}", flush=True)
        version = client.patch_reported({"firmware": "1.0.0"}, timeout=10)
        reported = service.get_twin(device_id)["properties"]["reported"]
        print(f"    reported version {version}; the service sees {reported}", flush=True)
        _step("service: set desired interval=30; the device receives the patch")
        service.update_twin(device_id, desired={"interval": 30})
        if not desired_seen.wait(10):
            raise RuntimeError("the desired patch did not arrive")
        print(f"    device received patch {desired[0][0]} (version {desired[0][1]})", flush=True)
        _step("service: invoke the direct method 'reboot'")
        result = service.invoke_method(device_id, "reboot", {"delay": 0}, timeout=10)
        print(f"    the device answered {json.dumps(result)}", flush=True)
        _step("service: send a cloud-to-device message")
        service.send_c2d(device_id, "hello device", properties={"kind": "greeting"})
        if not c2d_seen.wait(10):
            raise RuntimeError("the C2D message did not arrive")
        print(f"    device received {c2d[0].payload.decode()!r} {c2d[0].properties}", flush=True)


def _make_device_pki(work: Path, registration_id: str) -> tuple[str, Path, Path]:
    """A throwaway root CA (PEM text) and a device certificate + key it signed (files)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "demo fleet root CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_id)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = work / f"{registration_id}.pem", work / f"{registration_id}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return ca.public_bytes(serialization.Encoding.PEM).decode(), cert_path, key_path


def _x509_group_device(emulator: RunningEmulator, service: ServiceClient, work: Path) -> None:
    """An X.509 enrollment group (a CA), one device with a certificate it signed, one message."""
    from dps_proto import provision
    from hub_proto import HubClient, Message

    registration_id = "camera-0001"
    ca_pem, cert, key = _make_device_pki(work, registration_id)
    _step(f"creating the X.509 enrollment group {X509_GROUP_ID!r} (its root CA)")
    service.create_x509_group(X509_GROUP_ID, ca_pem)
    _step(f"provisioning {registration_id!r} over MQTT with its TLS client certificate")
    assignment = provision(
        provisioning_host="localhost",
        port=emulator.mqtt_port,
        ca_file=emulator.ca_file,
        id_scope=ID_SCOPE,
        registration_id=registration_id,
        client_cert=str(cert),
        client_key=str(key),
        timeout=30,
    )
    print(f"    assigned to {assignment.assigned_hub} as {assignment.device_id}", flush=True)
    hub = HubClient.from_assignment(
        assignment,
        client_cert=str(cert),
        client_key=str(key),
        port=emulator.mqtt_port,
        ca_file=emulator.ca_file,
    )
    with hub:
        hub.connect(timeout=30)
        hub.wait_for(hub.send_message(Message(b'{"motion": true}')), timeout=10)
    print(f"    the hub stored {len(service.telemetry(registration_id))} message(s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    del argv
    from dps_proto import DpsError
    from emulator.service_client import ServiceApiError, ServiceClient
    from hub_proto import HubError
    from tpm import TpmError

    with tempfile.TemporaryDirectory(prefix="dps-mqtt-demo-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        _step("starting the local DPS + IoT Hub emulator")
        emulator = start_emulator(work / "state")
        try:
            service = ServiceClient(emulator.api_url)
            reason = _tpm_unavailable_reason()
            if reason is None:
                assignment, signer = _provision_with_tpm(emulator, service, work, stack)
            else:
                _step(f"no TPM attestation: {reason}; using a symmetric key instead")
                assignment, signer = _provision_with_group_key(emulator, service)
            _step("assignment")
            print(json.dumps(assignment.to_json(), indent=2), flush=True)
            _talk_to_hub(emulator, service, assignment, signer)
            stack.close()
            if reason is None:
                _step("a second device, from a symmetric-key enrollment group")
                second, _ = _provision_with_group_key(emulator, service)
                print(f"    assigned to {second.assigned_hub} as {second.device_id}", flush=True)
            _x509_group_device(emulator, service, work)
        except (DpsError, HubError, TpmError, ServiceApiError, RuntimeError) as exc:
            print(f"demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        finally:
            _step("stopping the emulator")
            stop_emulator(emulator)
    _step("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
