#!/usr/bin/env bash
# Create .venv-azure-sdk: a virtualenv holding Microsoft's Python device SDK (azure-iot-device), used by
# the interoperability tests. It is separate from .venv because the SDK pins paho-mqtt < 2 and we need 2.x.
# Idempotent: does nothing when the pinned SDK already imports.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
SDK_VENV="${SDK_VENV:-.venv-azure-sdk}"
SDK_VERSION="2.14.0"

log() { printf 'sdk-venv: %s\n' "$*" >&2; }

sdk_ready() {
    [[ -x "$SDK_VENV/bin/python" ]] && "$SDK_VENV/bin/python" - "$SDK_VERSION" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version

import azure.iot.device  # noqa: F401

sys.exit(0 if version("azure-iot-device") == sys.argv[1] else 1)
PY
}

if sdk_ready; then
    exit 0
fi

log "creating $SDK_VENV with azure-iot-device==$SDK_VERSION"
if [[ -x "$SDK_VENV/bin/python" ]] && "$SDK_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    : # reuse the existing environment; pip below fixes the SDK version
else
    "$PYTHON" -m venv --clear "$SDK_VENV"
fi
"$SDK_VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$SDK_VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off \
    "azure-iot-device==$SDK_VERSION"

if ! sdk_ready; then
    log "azure-iot-device==$SDK_VERSION does not import from $SDK_VENV"
    exit 1
fi
log "ready: $SDK_VENV/bin/python"
