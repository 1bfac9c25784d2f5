"""TPM attestation end to end: a real software TPM, our HTTPS transport, the emulator's DPS."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from dps_proto import DpsConnectionError, DpsServiceError, provision, provision_https
from emulator.server import Emulator
from emulator.service_client import ServiceClient
from tests.conftest import ID_SCOPE
from tests.support.swtpm import require_swtpm
from tpm import TpmDevice
from tpm.swtpm import SwtpmProcess


@pytest.fixture
def device(tmp_path: Path) -> Iterator[TpmDevice]:
    """A TPM device on its own swtpm, with EK and SRK in place."""
    require_swtpm()
    process = SwtpmProcess(tmp_path / "swtpm")
    try:
        with TpmDevice(process.tcti) as tpm_device:
            tpm_device.ensure_keys()
            yield tpm_device
    finally:
        process.stop()


def _enroll(service: ServiceClient, device: TpmDevice, *, device_id: str | None = None) -> str:
    registration_id = device.registration_id()
    body = {
        "registrationId": registration_id,
        "attestation": {
            "type": "tpm",
            "tpm": {
                "endorsementKey": base64.b64encode(device.endorsement_key()).decode(),
                "storageRootKey": base64.b64encode(device.storage_root_key()).decode(),
            },
        },
    }
    if device_id:
        body["deviceId"] = device_id
    service.put_enrollment(body)
    return registration_id


def _https(emulator: Emulator) -> dict[str, object]:
    assert emulator.https is not None
    return {
        "provisioning_host": "localhost",
        "port": emulator.https.port,
        "ca_file": str(emulator.ca_file),
        "id_scope": ID_SCOPE,
        "timeout": 30.0,
    }


def test_tpm_device_provisions_over_https_and_holds_the_hub_key(
    emulator: Emulator, service: ServiceClient, device: TpmDevice
) -> None:
    registration_id = _enroll(service, device, device_id="tpm-hub-device")

    assignment = provision_https(tpm=device, **_https(emulator))

    assert assignment.registration_id == registration_id
    assert (assignment.assigned_hub, assignment.device_id) == ("localhost", "tpm-hub-device")
    assert assignment.tpm_authentication_key  # the second blob: the key for the hub
    hub_key = base64.b64decode(emulator.dps.hub_keys[registration_id])
    data = b"localhost%2Fdevices%2Ftpm-hub-device\n1700000000"
    assert device.signer().sign(data) == hmac.new(hub_key, data, hashlib.sha256).digest()
    assert service.get_registration(registration_id)["status"] == "assigned"


def test_an_ek_that_is_not_enrolled_gets_the_service_error(
    emulator: Emulator, device: TpmDevice
) -> None:
    with pytest.raises(DpsServiceError) as info:
        provision_https(tpm=device, **_https(emulator))
    assert info.value.status == 401
    assert "no TPM enrollment" in info.value.service_message


def test_tpm_over_mqtt_is_refused_not_left_hanging(
    emulator: Emulator, service: ServiceClient, device: TpmDevice
) -> None:
    """Azure offers TPM only over HTTPS/AMQP: an MQTT device has no token the hub accepts."""
    registration_id = _enroll(service, device)
    assert not device.has_identity_key()
    with pytest.raises(DpsConnectionError) as info:
        provision(
            provisioning_host="localhost",
            port=emulator.mqtt_port,
            ca_file=str(emulator.ca_file),
            id_scope=ID_SCOPE,
            registration_id=registration_id,
            signer=_NoKey(),
            timeout=20,
        )
    assert info.value.return_code == 5


class _NoKey:
    """A signer for a TPM that was never challenged: its signatures match nothing."""

    def sign(self, data: bytes) -> bytes:
        return hashlib.sha256(data).digest()


def test_cli_tpm_info_then_provision_with_the_tpm(
    emulator: Emulator, service: ServiceClient, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The factory flow: read the EK with `tpm info`, enroll it, then `provision --tpm`."""
    require_swtpm()
    from dps_mqtt.cli import main as cli_main

    with SwtpmProcess(tmp_path / "cli-swtpm") as process:
        assert cli_main(["tpm", "info", "--tcti", process.tcti]) == 0
        info = json.loads(capsys.readouterr().out)
        assert len(info["registrationId"]) == 52
        service.put_enrollment(
            {
                "registrationId": info["registrationId"],
                "attestation": {
                    "type": "tpm",
                    "tpm": {
                        "endorsementKey": info["endorsementKey"],
                        "storageRootKey": info["storageRootKey"],
                    },
                },
            }
        )
        assert emulator.https is not None
        code = cli_main(
            [
                "provision",
                "--host",
                "localhost",
                "--port",
                str(emulator.https.port),
                "--id-scope",
                ID_SCOPE,
                "--tpm",
                process.tcti,
                "--ca-file",
                str(emulator.ca_file),
                "--timeout",
                "30",
            ]
        )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["registrationId"] == info["registrationId"]


def test_cli_tpm_info_names_an_unreachable_tcti(capsys: pytest.CaptureFixture[str]) -> None:
    require_swtpm()
    from dps_mqtt.cli import main as cli_main

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    assert cli_main(["tpm", "info", "--tcti", tcti]) == 1
    assert tcti in capsys.readouterr().err
