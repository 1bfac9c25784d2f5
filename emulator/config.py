"""Settings of one emulator run (DPS + IoT Hub + service API), as the CLI and tests build them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["EmulatorConfig"]


@dataclass(frozen=True)
class EmulatorConfig:
    """Where the emulator keeps its state, where it listens and which hubs it pretends to be.

    ``state_dir=None`` means an in-memory store and a temporary certificate directory: nothing
    survives the run, which is what tests want. Every listener binds to ``host`` (loopback by
    default); ``hubs`` are the linked hub host names DPS assigns devices to and ``hostnames`` the
    names the server certificate covers.

    Hub: ``route_to`` is an ``mqtt://HOST[:PORT]`` broker that receives every telemetry message
    (None: telemetry is only stored); ``telemetry_keep`` messages are kept per device.

    Allocation: ``hub_weights`` (hub -> ``allocationWeight`` 0..1000) and ``hub_latencies``
    (hub -> milliseconds, for ``geoLatency``) set up the linked hubs at start;
    ``allocation_policy`` is the service-level policy (``hashed`` or ``geoLatency``) enrollments
    without their own use; ``webhook_timeout`` bounds a custom allocation webhook call.
    """

    state_dir: Path | None = None
    host: str = "127.0.0.1"
    mqtt_port: int = 8883
    api_port: int = 8480
    https_port: int = 8443
    id_scope: str = "0ne00000000"
    hubs: tuple[str, ...] = ("localhost",)
    hostnames: tuple[str, ...] = ("localhost",)
    retry_after: int = 1
    log_level: str = "INFO"
    route_to: str | None = None
    telemetry_keep: int = 1000
    hub_weights: Mapping[str, int] = field(default_factory=dict)
    hub_latencies: Mapping[str, float] = field(default_factory=dict)
    allocation_policy: str = "hashed"
    webhook_timeout: float = 5.0
