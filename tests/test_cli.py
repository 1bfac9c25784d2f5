"""Tests of the ``dps-mqtt`` command line, run in-process against a live service API."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import dps_proto
from dps_mqtt import __version__
from dps_mqtt.cli import main
from dps_proto.errors import RegistrationFailed
from emulator.config import EmulatorConfig
from emulator.models import RegistrationRecord
from emulator.service_api import ServiceApi
from emulator.store import Store

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(32, 64))).decode()
HUB = "hub1.example.net"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store() -> Iterator[Store]:
    with Store() as db:
        db.add_hub(HUB)
        yield db


@pytest.fixture
def api(store: Store) -> Iterator[ServiceApi]:
    server = ServiceApi(store, lambda: {"idScope": "0ne00000A0A"})
    server.start()
    try:
        yield server
    finally:
        server.stop()


def run(
    capsys: pytest.CaptureFixture[str], api: ServiceApi | None, *argv: str
) -> tuple[int, Any, str]:
    """Run ``dps-mqtt argv --api URL``; return the exit code, parsed stdout JSON and stderr."""
    args = [*argv, "--api", api.url] if api is not None else list(argv)
    code = main(args)
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------------------- enrollments


def test_enrollment_verbs(capsys: pytest.CaptureFixture[str], api: ServiceApi) -> None:
    twin = '{"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}}'
    code, created, _ = run(
        capsys, api, "enrollment", "create", "Device-1", "--key", KEY_A, "--secondary-key", KEY_B,
        "--device-id", "Dev-One", "--hub", HUB, "--initial-twin", twin,
    )
    assert code == 0
    assert created["registrationId"] == "device-1"
    assert created["deviceId"] == "Dev-One"
    assert created["iotHubHostName"] == HUB
    assert created["initialTwin"] == json.loads(twin)
    assert created["attestation"]["symmetricKey"] == {"primaryKey": KEY_A, "secondaryKey": KEY_B}

    code, listed, _ = run(capsys, api, "enrollment", "list")
    assert (code, listed) == (0, [created])
    code, shown, _ = run(capsys, api, "enrollment", "show", "device-1")
    assert (code, shown) == (0, created)

    code, disabled, _ = run(capsys, api, "enrollment", "disable", "device-1")
    assert code == 0
    assert disabled["provisioningStatus"] == "disabled"
    assert disabled["createdDateTimeUtc"] == created["createdDateTimeUtc"]
    assert disabled["attestation"] == created["attestation"]
    code, enabled, _ = run(capsys, api, "enrollment", "enable", "device-1")
    assert enabled["provisioningStatus"] == "enabled"

    code, deleted, _ = run(capsys, api, "enrollment", "delete", "device-1")
    assert (code, deleted) == (0, {"registrationId": "device-1", "deleted": True})
    code, listed, _ = run(capsys, api, "enrollment", "list")
    assert listed == []


def test_enrollment_create_disabled_with_generated_keys(
    capsys: pytest.CaptureFixture[str], api: ServiceApi
) -> None:
    code, created, _ = run(capsys, api, "enrollment", "create", "device-2", "--disabled")
    assert code == 0
    assert created["provisioningStatus"] == "disabled"
    keys = created["attestation"]["symmetricKey"]
    assert len(base64.b64decode(keys["primaryKey"])) == 32


def test_service_errors_are_one_line(capsys: pytest.CaptureFixture[str], api: ServiceApi) -> None:
    code, out, err = run(capsys, api, "enrollment", "show", "missing")
    assert code == 1
    assert out is None
    assert err.count("\n") == 1
    assert "404" in err and "404201" in err and "Traceback" not in err
    code, _, err = run(capsys, api, "enrollment", "create", "bad/id")
    assert code == 1
    assert "400" in err
    code, _, err = run(capsys, api, "enrollment", "create", "x", "--key", "not-base64")
    assert code == 1
    assert "primaryKey" in err
    code, _, err = run(capsys, api, "enrollment", "disable", "missing")
    assert code == 1


def test_unreachable_api(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    code = main(["enrollment", "list", "--api", url])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert "connection refused" in err
    code = main(["registration", "list", "--api", "ftp://example"])
    assert code == 1


def test_api_url_from_environment(
    capsys: pytest.CaptureFixture[str], api: ServiceApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DPS_MQTT_API", api.url)
    code, listed, _ = run(capsys, None, "enrollment", "list")
    assert (code, listed) == (0, [])


# ---------------------------------------------------------------------------- groups


def test_group_verbs(capsys: pytest.CaptureFixture[str], api: ServiceApi) -> None:
    code, created, _ = run(capsys, api, "group", "create", "Group-A", "--key", KEY_A, "--hub", HUB)
    assert code == 0
    assert created["enrollmentGroupId"] == "group-a"
    assert created["attestation"]["symmetricKey"]["primaryKey"] == KEY_A
    code, listed, _ = run(capsys, api, "group", "list")
    assert listed == [created]
    code, shown, _ = run(capsys, api, "group", "show", "group-a")
    assert shown == created
    code, disabled, _ = run(capsys, api, "group", "disable", "group-a")
    assert disabled["provisioningStatus"] == "disabled"
    code, enabled, _ = run(capsys, api, "group", "enable", "group-a")
    assert enabled["provisioningStatus"] == "enabled"
    code, deleted, _ = run(capsys, api, "group", "delete", "group-a")
    assert (code, deleted) == (0, {"enrollmentGroupId": "group-a", "deleted": True})
    code, _, err = run(capsys, api, "group", "show", "group-a")
    assert code == 1 and "404" in err


def test_derive_key(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["group", "derive-key", KEY_A, "sensor-0001"])
    out, _ = capsys.readouterr()
    expected = base64.b64encode(
        hmac.new(base64.b64decode(KEY_A), b"sensor-0001", hashlib.sha256).digest()
    ).decode()
    assert (code, out) == (0, expected + "\n")
    code = main(["group", "derive-key", "!!!", "sensor-0001"])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == "" and err.count("\n") == 1


# ---------------------------------------------------------------------------- registrations


def test_registration_verbs(
    capsys: pytest.CaptureFixture[str], api: ServiceApi, store: Store
) -> None:
    store.put_registration(
        RegistrationRecord(
            registration_id="device-1",
            status="assigned",
            assigned_hub=HUB,
            device_id="device-1",
            substatus="initialAssignment",
            created="2026-11-28T16:57:35.123456Z",
            last_updated="2026-11-28T16:57:35.123456Z",
            etag="abc",
        )
    )
    code, listed, _ = run(capsys, api, "registration", "list")
    assert code == 0
    assert [r["registrationId"] for r in listed] == ["device-1"]
    code, shown, _ = run(capsys, api, "registration", "show", "device-1")
    assert shown["assignedHub"] == HUB
    code, deleted, _ = run(capsys, api, "registration", "delete", "device-1")
    assert (code, deleted) == (0, {"registrationId": "device-1", "deleted": True})
    code, _, err = run(capsys, api, "registration", "show", "device-1")
    assert code == 1 and "404202" in err


# ---------------------------------------------------------------------------- provision, emulator


def test_provision_prints_the_assignment(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[dict[str, Any]] = []

    class FakeAssignment:
        def to_json(self) -> dict[str, Any]:
            return {"assignedHub": HUB, "deviceId": "device-1"}

    def fake_provision(**kwargs: Any) -> FakeAssignment:
        calls.append(kwargs)
        return FakeAssignment()

    monkeypatch.setattr(dps_proto, "provision", fake_provision, raising=False)
    code, out, _ = run(
        capsys, None, "provision", "--host", "localhost", "--id-scope", "0ne1", "--registration-id",
        "device-1", "--group-key", KEY_A, "--port", "18883", "--ca-file", "/tmp/ca.pem",
        "--payload", '{"a": 1}', "--timeout", "5",
    )
    assert (code, out) == (0, {"assignedHub": HUB, "deviceId": "device-1"})
    assert calls == [
        {
            "provisioning_host": "localhost",
            "id_scope": "0ne1",
            "registration_id": "device-1",
            "symmetric_key": None,
            "group_key": KEY_A,
            "client_cert": None,
            "client_key": None,
            "csr": None,
            "payload": {"a": 1},
            "port": 18883,
            "ca_file": "/tmp/ca.pem",
            "timeout": 5.0,
        }
    ]


def test_provision_failure_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(**kwargs: Any) -> Any:
        raise RegistrationFailed("device-1", 401002, "bad key")

    monkeypatch.setattr(dps_proto, "provision", failing, raising=False)
    code = main(
        ["provision", "--host", "h", "--id-scope", "s", "--registration-id", "device-1",
         "--key", KEY_A]
    )
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1 and "401002" in err and "Traceback" not in err


def test_emulator_builds_its_config(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import emulator.server

    configs: list[EmulatorConfig] = []

    def fake_run(config: EmulatorConfig) -> int:
        configs.append(config)
        return 0

    monkeypatch.setattr(emulator.server, "run_foreground", fake_run)
    assert main(["emulator"]) == 0
    assert main([
        "emulator", "--state-dir", str(tmp_path), "--host", "127.0.0.2", "--port", "0",
        "--api-port", "0", "--id-scope", "0ne0000TEST", "--hub", "a.example", "--hub",
        "b.example", "--hostname", "dps.example", "-v",
    ]) == 0
    assert main(["emulator", "--in-memory", "--log-level", "warning"]) == 0
    default, custom, memory = configs
    assert default == EmulatorConfig(state_dir=Path("./.dps-mqtt-emulator"))
    assert custom == EmulatorConfig(
        state_dir=tmp_path, host="127.0.0.2", mqtt_port=0, api_port=0, id_scope="0ne0000TEST",
        hubs=("a.example", "b.example"), hostnames=("dps.example",), log_level="DEBUG",
    )
    assert memory.state_dir is None and memory.log_level == "WARNING"


# ---------------------------------------------------------------------------- usage


@pytest.mark.parametrize(
    "argv",
    [
        ["enrollment"],
        ["enrollment", "frobnicate"],
        ["enrollment", "show"],
        ["enrollment", "create", "x", "--initial-twin", "[1]"],
        ["enrollment", "create", "x", "--initial-twin", "{"],
        ["group", "derive-key", KEY_A],
        ["registration", "create", "x"],
        ["provision", "--host", "h", "--id-scope", "s", "--registration-id", "r"],
        ["provision", "--host", "h", "--id-scope", "s", "--registration-id", "r", "--key", "a",
         "--group-key", "b"],
        ["provision", "--host", "h", "--id-scope", "s", "--registration-id", "r", "--key", "a",
         "--timeout", "-1"],
        ["emulator", "--port", "70000"],
        ["nonsense"],
    ],
)
def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(argv)
    assert excinfo.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as excinfo:
        main(["--version"])
    assert excinfo.value.code == 0
    assert capsys.readouterr().out.strip() == f"dps-mqtt {__version__}"


def test_importing_the_cli_loads_nothing_heavy() -> None:
    code = (
        "import sys, dps_mqtt.cli, dps_mqtt.__main__\n"
        "heavy = ('paho', 'cryptography', 'emulator', 'dps_proto')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
        check=True,
    )
    assert result.stdout.strip() == "[]"
