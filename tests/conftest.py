"""Shared fixtures: a running emulator on free loopback ports, and a service API client for it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.config import EmulatorConfig
from emulator.dps_service import DpsConfig
from emulator.server import Emulator, EmulatorThread
from emulator.service_client import ServiceClient

ID_SCOPE = "0ne00000A0A"


def start_emulator(
    state_dir: Path | None = None, *, mqtt_port: int = 0, **dps: object
) -> EmulatorThread:
    """Start an emulator on free ports (or ``mqtt_port``); the caller stops it."""
    config = EmulatorConfig(
        state_dir=state_dir,
        host="127.0.0.1",
        mqtt_port=mqtt_port,
        api_port=0,
        https_port=0,
        id_scope=ID_SCOPE,
        hubs=("localhost",),
        hostnames=("localhost",),
    )
    dps_config = DpsConfig(id_scope=ID_SCOPE, retry_after=0)
    for name, value in dps.items():
        setattr(dps_config, name, value)
    thread = EmulatorThread(config, dps_config=dps_config)
    thread.start()
    return thread


@pytest.fixture
def emulator_thread() -> Iterator[EmulatorThread]:
    """An emulator with an in-memory store, stopped after the test."""
    thread = start_emulator()
    try:
        yield thread
    finally:
        thread.stop()


@pytest.fixture
def emulator(emulator_thread: EmulatorThread) -> Emulator:
    """The running emulator."""
    assert emulator_thread.emulator is not None
    return emulator_thread.emulator


@pytest.fixture
def service(emulator: Emulator) -> ServiceClient:
    """A client of the running emulator's service API."""
    return ServiceClient(emulator.api_url)
