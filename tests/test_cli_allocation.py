"""The ``dps-mqtt`` verbs for linked hubs, allocation settings and device enable/disable, run
in-process against a live emulator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dps_mqtt.cli import main
from dps_proto import derive_device_key, provision
from emulator.config import EmulatorConfig
from emulator.server import Emulator, EmulatorThread
from tests.conftest import ID_SCOPE, start_emulator


@pytest.fixture(scope="module")
def emulator() -> Iterator[Emulator]:
    thread = start_emulator()
    try:
        assert thread.emulator is not None
        yield thread.emulator
    finally:
        thread.stop()


def run(capsys: pytest.CaptureFixture[str], emulator: Emulator, *argv: str) -> tuple[int, Any, str]:
    code = main([*argv, "--api", emulator.api_url])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def test_hub_verbs(capsys: pytest.CaptureFixture[str], emulator: Emulator) -> None:
    code, hubs, _ = run(capsys, emulator, "hub", "list")
    assert (code, hubs) == (0, [{"name": "localhost", "allocationWeight": 1, "latencyMs": None}])
    code, hub, _ = run(
        capsys, emulator, "hub", "add", "localhost", "--weight", "4", "--latency", "12.5"
    )
    assert (code, hub) == (0, {"name": "localhost", "allocationWeight": 4, "latencyMs": 12.5})
    code, _, err = run(capsys, emulator, "hub", "add", "hub-z.example.com")
    assert code == 1 and "not covered by the emulator's server certificate" in err
    code, _, err = run(capsys, emulator, "hub", "add", "localhost", "--weight", "1001")
    assert code == 1 and "allocationWeight" in err
    code, _, err = run(capsys, emulator, "hub", "remove", "hub-z.example.com")
    assert code == 1 and "not linked" in err
    code, removed, _ = run(capsys, emulator, "hub", "remove", "localhost")
    assert (code, removed) == (0, {"name": "localhost", "removed": True})
    code, hub, _ = run(capsys, emulator, "hub", "add", "localhost")
    assert (code, hub["allocationWeight"]) == (0, 1)


def test_enrollment_allocation_options_and_update(
    capsys: pytest.CaptureFixture[str], emulator: Emulator
) -> None:
    code, created, _ = run(
        capsys,
        emulator,
        "group",
        "create",
        "cli-custom",
        "--allocation-policy",
        "custom",
        "--webhook-url",
        "http://127.0.0.1:9/allocate",
        "--iot-hub",
        "localhost",
        "--reprovision",
        "reset",
    )
    assert code == 0
    assert created["allocationPolicy"] == "custom"
    assert created["customAllocationDefinition"] == {
        "webhookUrl": "http://127.0.0.1:9/allocate",
        "apiVersion": "2021-10-01",
    }
    assert created["iotHubs"] == ["localhost"]
    assert created["reprovisionPolicy"] == {
        "updateHubAssignment": True,
        "migrateDeviceData": False,
    }
    key = created["attestation"]["symmetricKey"]["primaryKey"]
    code, updated, _ = run(
        capsys,
        emulator,
        "group",
        "update",
        "cli-custom",
        "--allocation-policy",
        "hashed",
        "--reprovision",
        "never",
    )
    assert code == 0
    assert updated["allocationPolicy"] == "hashed"
    assert updated["reprovisionPolicy"]["updateHubAssignment"] is False
    assert updated["attestation"]["symmetricKey"]["primaryKey"] == key, "keys are kept"
    code, _, err = run(capsys, emulator, "group", "update", "cli-custom")
    assert code == 1 and "nothing to change" in err
    code, _, err = run(
        capsys, emulator, "enrollment", "create", "cli-x", "--allocation-policy", "custom"
    )
    assert code == 1 and "customAllocationDefinition" in err
    code, _, _ = run(capsys, emulator, "enrollment", "create", "cli-static", "--hub", "localhost")
    assert code == 0
    code, updated, _ = run(capsys, emulator, "enrollment", "update", "cli-static", "--no-hub")
    assert code == 0 and "iotHubHostName" not in updated


def test_device_disable_enable(capsys: pytest.CaptureFixture[str], emulator: Emulator) -> None:
    code, group, _ = run(capsys, emulator, "group", "create", "cli-devices")
    key = derive_device_key(group["attestation"]["symmetricKey"]["primaryKey"], "cli-dev-1")
    provision(
        provisioning_host="localhost",
        port=emulator.mqtt_port,
        ca_file=str(emulator.ca_file),
        id_scope=ID_SCOPE,
        registration_id="cli-dev-1",
        symmetric_key=key,
        payload={"modelId": "dtmi:example:thing;1"},
        timeout=20,
    )
    code, device, _ = run(capsys, emulator, "device", "disable", "cli-dev-1")
    assert (code, device["status"]) == (0, "disabled")
    code, device, _ = run(capsys, emulator, "device", "enable", "cli-dev-1")
    assert (code, device["status"]) == (0, "enabled")
    code, _, err = run(capsys, emulator, "device", "disable", "nobody")
    assert code == 1 and "404" in err


def test_emulator_allocation_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import emulator.server

    configs: list[EmulatorConfig] = []
    monkeypatch.setattr(emulator.server, "run_foreground", lambda c: configs.append(c) or 0)
    assert (
        main(
            [
                "emulator",
                "--state-dir",
                str(tmp_path),
                "--hub",
                "a.example",
                "--hub",
                "b.example",
                "--hub-weight",
                "a.example=3",
                "--hub-latency",
                "b.example=20.5",
                "--allocation-policy",
                "geoLatency",
                "--webhook-timeout",
                "2.5",
            ]
        )
        == 0
    )
    [config] = configs
    assert config.hub_weights == {"a.example": 3}
    assert config.hub_latencies == {"b.example": 20.5}
    assert (config.allocation_policy, config.webhook_timeout) == ("geoLatency", 2.5)
    with pytest.raises(SystemExit):
        main(["emulator", "--hub-weight", "a.example=1.5"])


def test_emulator_applies_hub_settings() -> None:
    config = EmulatorConfig(
        mqtt_port=0,
        api_port=0,
        https_port=0,
        id_scope=ID_SCOPE,
        hubs=("a.example", "b.example"),
        hub_weights={"a.example": 3},
        hub_latencies={"B.example": 20.5},
        allocation_policy="geoLatency",
    )
    with EmulatorThread(config) as running:
        assert [h.to_json() for h in running.store.list_linked_hubs()] == [
            {"name": "a.example", "allocationWeight": 3, "latencyMs": None},
            {"name": "b.example", "allocationWeight": 1, "latencyMs": 20.5},
        ]
        assert running.dps.config.allocation_policy == "geoLatency"
    with pytest.raises(RuntimeError, match="not a linked hub"):
        EmulatorThread(
            EmulatorConfig(mqtt_port=0, api_port=0, https_port=0, hub_weights={"x.example": 1})
        ).start()
    with pytest.raises(RuntimeError, match="allocation policy"):
        EmulatorThread(
            EmulatorConfig(mqtt_port=0, api_port=0, https_port=0, allocation_policy="static")
        ).start()
