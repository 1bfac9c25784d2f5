"""Our device transport against the running emulator, over real loopback TLS sockets."""

from __future__ import annotations

import asyncio
import json

import pytest

from dps_mqtt import demo
from dps_mqtt.cli import main as cli_main
from dps_mqtt.demo import main as demo_main
from dps_proto import (
    DpsConnectionError,
    RegistrationDisabled,
    RegistrationFailed,
    derive_device_key,
    provision,
    provision_async,
)
from emulator.server import Emulator, EmulatorThread
from emulator.service_client import ServiceClient
from tests.conftest import ID_SCOPE, start_emulator
from tests.support.swtpm import require_swtpm


def _kwargs(emulator: Emulator, registration_id: str) -> dict[str, object]:
    return {
        "provisioning_host": "localhost",
        "port": emulator.mqtt_port,
        "ca_file": str(emulator.ca_file),
        "id_scope": ID_SCOPE,
        "registration_id": registration_id,
        "timeout": 30.0,
    }


def test_individual_enrollment_is_assigned(emulator: Emulator, service: ServiceClient) -> None:
    enrollment = service.create_enrollment("dev-individual", device_id="hub-dev-1")
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]

    assignment = provision(symmetric_key=key, **_kwargs(emulator, "dev-individual"))

    assert (assignment.assigned_hub, assignment.device_id) == ("localhost", "hub-dev-1")
    assert assignment.substatus == "initialAssignment"
    record = service.get_registration("dev-individual")
    assert record["deviceId"] == "hub-dev-1" and record["status"] == "assigned"


def test_group_enrollment_with_group_key_and_polling() -> None:
    thread: EmulatorThread = start_emulator(assigning_polls=2)
    try:
        emulator = thread.emulator
        assert emulator is not None
        service = ServiceClient(emulator.api_url)
        group = service.create_group("line-7")
        group_key = group["attestation"]["symmetricKey"]["primaryKey"]

        assignment = provision(group_key=group_key, **_kwargs(emulator, "line-7-dev"))

        assert assignment.device_id == "line-7-dev"
        assert assignment.state.symmetric_key_group == "line-7"
    finally:
        thread.stop()


def test_disabled_enrollment_raises_registration_disabled(
    emulator: Emulator, service: ServiceClient
) -> None:
    enrollment = service.create_enrollment("dev-off", provisioning_status="disabled")
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]

    with pytest.raises(RegistrationDisabled):
        provision(symmetric_key=key, **_kwargs(emulator, "dev-off"))
    assert service.get_registration("dev-off")["status"] == "disabled"


def test_wrong_key_is_refused_at_connect(emulator: Emulator, service: ServiceClient) -> None:
    service.create_enrollment("dev-wrong")
    wrong = derive_device_key("AAAAAAAAAAAAAAAAAAAAAA==", "dev-wrong")

    with pytest.raises(DpsConnectionError) as info:
        provision(symmetric_key=wrong, **_kwargs(emulator, "dev-wrong"))
    assert info.value.return_code == 5


def test_no_linked_hub_fails_with_the_service_error_code(
    emulator: Emulator, service: ServiceClient
) -> None:
    enrollment = service.create_enrollment("dev-nohub")
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]
    emulator.store.remove_hub("localhost")

    with pytest.raises(RegistrationFailed) as info:
        provision(symmetric_key=key, **_kwargs(emulator, "dev-nohub"))
    assert info.value.error_code == 400208


def test_many_devices_provision_concurrently_with_asyncio(
    emulator: Emulator, service: ServiceClient
) -> None:
    group = service.create_group("fleet")
    group_key = group["attestation"]["symmetricKey"]["primaryKey"]
    ids = [f"fleet-{n:03d}" for n in range(40)]

    async def run_all() -> list[str]:
        results = await asyncio.gather(
            *(provision_async(group_key=group_key, **_kwargs(emulator, rid)) for rid in ids)
        )
        return [a.device_id for a in results]

    assert sorted(asyncio.run(run_all())) == ids
    assert {r["registrationId"] for r in service.list_registrations()} >= set(ids)


def test_cli_provision_prints_the_assignment(
    emulator: Emulator, service: ServiceClient, capsys: pytest.CaptureFixture[str]
) -> None:
    group = service.create_group("cli-group")
    group_key = group["attestation"]["symmetricKey"]["primaryKey"]

    code = cli_main(
        [
            "provision",
            "--host",
            "localhost",
            "--port",
            str(emulator.mqtt_port),
            "--id-scope",
            ID_SCOPE,
            "--registration-id",
            "cli-dev",
            "--group-key",
            group_key,
            "--ca-file",
            str(emulator.ca_file),
            "--timeout",
            "30",
        ]
    )

    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["deviceId"] == "cli-dev" and printed["assignedHub"] == "localhost"


def _assert_demo_talked_to_the_hub(out: str) -> None:
    assert '"assignedHub": "localhost"' in out
    assert "the hub stored 3 messages" in out
    assert "the service sees {'firmware': '1.0.0'" in out
    assert "device received patch {'interval': 30}" in out
    assert '"payload": {"rebooted": true, "request": {"delay": 0}}' in out
    assert "device received 'hello device' {'kind': 'greeting'}" in out
    assert "creating the X.509 enrollment group 'demo-cameras'" in out
    assert "assigned to localhost as camera-0001" in out
    assert "creating the symmetric-key enrollment group 'demo-sensors'" in out
    assert "==> done" in out


def test_demo_runs_end_to_end_with_a_tpm(capsys: pytest.CaptureFixture[str]) -> None:
    """The same path as `make demo`: emulator child process, TPM over HTTPS, then the hub."""
    require_swtpm()
    assert demo_main([]) == 0
    out = capsys.readouterr().out
    assert "provisioning over HTTPS" in out and '"deviceId": "tpm-sensor-0001"' in out
    _assert_demo_talked_to_the_hub(out)


def test_demo_falls_back_to_a_symmetric_key_and_says_why(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo, "_tpm_unavailable_reason", lambda: "swtpm is not installed")
    assert demo_main([]) == 0
    out = capsys.readouterr().out
    assert "no TPM attestation: swtpm is not installed; using a symmetric key instead" in out
    assert '"deviceId": "sensor-0001"' in out
    _assert_demo_talked_to_the_hub(out)
