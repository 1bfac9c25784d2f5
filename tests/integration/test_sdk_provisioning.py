"""Microsoft's Python SDK (azure-iot-device 2.14) provisions against the emulator unchanged.

The SDK cannot change port 8883, so the emulator listens there for these tests; it runs from its
own virtualenv because it pins paho-mqtt < 2.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from dps_proto import derive_device_key
from emulator.server import Emulator, EmulatorThread
from emulator.service_client import ServiceClient
from tests.conftest import ID_SCOPE, start_emulator
from tests.sdk_support import run_sdk_program


@pytest.fixture(scope="module")
def emulator_8883() -> Iterator[Emulator]:
    """An emulator on port 8883, the only port the SDK can use."""
    thread: EmulatorThread = start_emulator(mqtt_port=8883)
    assert thread.emulator is not None
    try:
        yield thread.emulator
    finally:
        thread.stop()


def _sdk_provision(emulator: Emulator, registration_id: str, key: str) -> dict[str, object]:
    proc = run_sdk_program(
        "sdk_provision",
        [
            "--host",
            "localhost",
            "--id-scope",
            ID_SCOPE,
            "--registration-id",
            registration_id,
            "--key",
            key,
            "--ca-file",
            str(emulator.ca_file),
            "--timeout",
            "60",
        ],
        timeout=90,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from the SDK program: {proc.stdout!r} {proc.stderr[-2000:]!r}"
    result: dict[str, object] = json.loads(lines[-1])
    return result


def test_sdk_provisions_individual_enrollment(emulator_8883: Emulator) -> None:
    service = ServiceClient(emulator_8883.api_url)
    enrollment = service.create_enrollment("sdk-device-1", device_id="sdk-hub-device-1")
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]

    result = _sdk_provision(emulator_8883, "sdk-device-1", key)

    assert result["status"] == "assigned", result
    assert result["assignedHub"] == "localhost"
    assert result["deviceId"] == "sdk-hub-device-1"
    assert result["substatus"] == "initialAssignment"
    record = service.get_registration("sdk-device-1")
    assert record["status"] == "assigned"


def test_sdk_provisions_group_enrollment_with_derived_key(emulator_8883: Emulator) -> None:
    service = ServiceClient(emulator_8883.api_url)
    group = service.create_group("sdk-group")
    key = derive_device_key(group["attestation"]["symmetricKey"]["secondaryKey"], "sdk-device-2")

    result = _sdk_provision(emulator_8883, "sdk-device-2", key)

    assert result["status"] == "assigned", result
    assert result["deviceId"] == "sdk-device-2"
    record = service.get_registration("sdk-device-2")
    assert record["symmetricKey"] == {"enrollmentGroupId": "sdk-group"}


def test_sdk_with_wrong_key_is_refused(emulator_8883: Emulator) -> None:
    service = ServiceClient(emulator_8883.api_url)
    service.create_enrollment("sdk-device-3")
    wrong = derive_device_key("AAAAAAAAAAAAAAAAAAAAAA==", "sdk-device-3")

    result = _sdk_provision(emulator_8883, "sdk-device-3", wrong)

    assert "error" in result, result
    with pytest.raises(Exception, match="404"):
        service.get_registration("sdk-device-3")


def test_sdk_sees_disabled_enrollment(emulator_8883: Emulator) -> None:
    service = ServiceClient(emulator_8883.api_url)
    enrollment = service.create_enrollment("sdk-device-4", provisioning_status="disabled")
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]

    result = _sdk_provision(emulator_8883, "sdk-device-4", key)

    # The SDK has no branch for "disabled": it reports the status it could not handle.
    assert "error" in result, result
    assert "invalid registration status disabled" in json.dumps(result), result
    assert service.get_registration("sdk-device-4")["status"] == "disabled"
