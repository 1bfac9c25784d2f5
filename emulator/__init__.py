"""A local Azure DPS and IoT Hub that speak the real device protocol on real sockets.

Start it with ``dps-mqtt emulator`` or, from Python, :class:`emulator.server.EmulatorThread`.
"""

from __future__ import annotations
