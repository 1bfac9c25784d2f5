#!/usr/bin/env bash
# Install the Debian packages dps-mqtt's tests and demo need, and only those that are missing.
#   mosquitto            broker for telemetry routing tests and benchmarks (started by fixtures)
#   swtpm, swtpm-tools   software TPM started by the TPM test fixtures
#   libtss2-dev, pkg-config   tpm2-pytss builds from source against libtss2
#   python3-venv         only when "$PYTHON -m venv" cannot work (Debian splits ensurepip out)
# Quiet and idempotent when everything is present. Never prompts.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
PACKAGES=(mosquitto swtpm swtpm-tools libtss2-dev pkg-config)

log() { printf 'install-system-deps: %s\n' "$*" >&2; }

if ! command -v dpkg-query >/dev/null 2>&1; then
    # Not Debian: we cannot install anything; check the commands and say what is missing.
    missing_cmds=()
    for cmd in mosquitto swtpm swtpm_setup pkg-config; do
        command -v "$cmd" >/dev/null 2>&1 || missing_cmds+=("$cmd")
    done
    if ((${#missing_cmds[@]})); then
        log "not a Debian system (no dpkg-query); install these by hand: ${missing_cmds[*]}"
        exit 1
    fi
    exit 0
fi

is_installed() {
    [[ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" == "install ok installed" ]]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    is_installed "$pkg" || missing+=("$pkg")
done

# ensurepip is what Debian's python3-venv adds; without it "python -m venv" fails half-way.
venv_usable() { "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; }
if ! venv_usable && ! is_installed python3-venv; then
    missing+=(python3-venv)
fi

if ((${#missing[@]} == 0)); then
    exit 0
fi

if [[ "$(id -u)" -ne 0 ]]; then
    log "missing Debian packages: ${missing[*]}"
    log "install them with:"
    printf '    sudo apt-get update && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends %s\n' \
        "${missing[*]}" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log "installing: ${missing[*]}"
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null

installed_mosquitto=0
for pkg in "${missing[@]}"; do
    [[ "$pkg" == mosquitto ]] && installed_mosquitto=1
done
if ((installed_mosquitto)); then
    # The package starts a system broker on 1883; the tests start their own brokers on free ports.
    log "stopping and disabling the system mosquitto service"
    if command -v systemctl >/dev/null 2>&1; then
        systemctl stop mosquitto >/dev/null 2>&1 || true
        systemctl disable mosquitto >/dev/null 2>&1 || true
    fi
    if command -v service >/dev/null 2>&1; then
        service mosquitto stop >/dev/null 2>&1 || true
    fi
    if command -v update-rc.d >/dev/null 2>&1; then
        update-rc.d mosquitto disable >/dev/null 2>&1 || true
    fi
fi

if ! venv_usable; then
    log "warning: '$PYTHON -m venv' still cannot work (ensurepip missing);" \
        "if $PYTHON is not Debian's python3, install its venv support yourself"
fi
log "done"
