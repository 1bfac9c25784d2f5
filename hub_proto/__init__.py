"""IoT Hub device protocol over MQTT (telemetry, C2D, twin, direct methods): not built yet."""

from __future__ import annotations
