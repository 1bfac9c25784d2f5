"""Helpers for tests that run Microsoft's Python device SDK (azure-iot-device) as a peer.

The SDK pins paho-mqtt < 2, so it lives in its own virtualenv (.venv-azure-sdk, built by
scripts/sdk-venv.sh) and its programs run as subprocesses from tests/integration/sdk_programs/.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SDK_VENV = REPO_ROOT / ".venv-azure-sdk"
SDK_VENV_SCRIPT = REPO_ROOT / "scripts" / "sdk-venv.sh"
SDK_PROGRAMS = Path(__file__).resolve().parent / "integration" / "sdk_programs"
SDK_VENV_TIMEOUT = 900.0

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_thread_lock = threading.Lock()
_ready: Path | None = None


class SdkUnavailable(RuntimeError):
    """The SDK virtualenv could not be built (no network to PyPI, no venv support, ...)."""


def _lock_path() -> Path:
    """A lock file outside the repository, one per checkout."""
    digest = hashlib.sha256(str(REPO_ROOT).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"dps-mqtt-sdk-venv-{digest}.lock"


def sdk_python() -> Path:
    """Return the SDK virtualenv's python, building the virtualenv on first use.

    scripts/sdk-venv.sh runs at most once per process; an exclusive file lock serialises it against
    other processes (parallel pytest runs), and the script itself is a no-op when the SDK imports.
    """
    global _ready
    with _thread_lock:
        if _ready is not None:
            return _ready
        with open(_lock_path(), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                env = dict(os.environ, SDK_VENV=str(SDK_VENV))
                env.setdefault("PYTHON", _base_python())
                proc = subprocess.run(
                    ["bash", str(SDK_VENV_SCRIPT)],
                    cwd=REPO_ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    text=True,
                    timeout=SDK_VENV_TIMEOUT,
                    check=False,
                )
            except subprocess.TimeoutExpired as exc:
                raise SdkUnavailable(f"{SDK_VENV_SCRIPT} took over {SDK_VENV_TIMEOUT} s") from exc
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        python = SDK_VENV / "bin" / "python"
        if proc.returncode != 0 or not python.exists():
            raise SdkUnavailable(
                f"{SDK_VENV_SCRIPT} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
            )
        _ready = python
        return python


def _base_python() -> str:
    """The interpreter to build the SDK virtualenv from: the one our .venv was made from."""
    return getattr(sys, "_base_executable", None) or sys.executable


def run_sdk_program(
    name: str, args: list[str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run tests/integration/sdk_programs/<name>.py with the SDK's python; output captured.

    On timeout the child is killed and subprocess.TimeoutExpired propagates.
    """
    if not _NAME.fullmatch(name):
        raise ValueError(f"not an SDK program name: {name!r}")
    program = SDK_PROGRAMS / f"{name}.py"
    if not program.is_file():
        raise FileNotFoundError(program)
    python = sdk_python()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONUNBUFFERED"] = "1"
    return subprocess.run(
        [str(python), str(program), *args],
        cwd=SDK_PROGRAMS,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
