"""A local mosquitto broker with TLS for transport tests, and the PKI it serves.

The broker listens on two free loopback ports: TLS (for the client under test) and plain TCP
(for test-side peers such as a fake DPS or a fake hub). It can be stopped and started again on
the same ports, and (with ``persistence=True``) keeps persistent sessions and queued QoS 1
messages across such a restart. Every process started here is stopped by :meth:`Mosquitto.stop`.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from .pki import Pki, make_pki

__all__ = ["MOSQUITTO", "Mosquitto", "Pki", "free_port", "make_pki", "wait_listening"]

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)


# -- mosquitto --------------------------------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_listening(port: int, process: subprocess.Popen[bytes], log_file: Path) -> None:
    """Wait (at most 10 s) until ``process`` accepts connections on ``port``."""
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = log_file.read_text() if log_file.exists() else ""
            pytest.fail(f"mosquitto exited with {process.returncode}:\n{text}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    pytest.fail("mosquitto did not start listening within 10 s")


class Mosquitto:
    """One mosquitto process (started by :meth:`start` or ``with``), restartable on its ports."""

    def __init__(self, pki: Pki, directory: Path, *, persistence: bool = False) -> None:
        if MOSQUITTO is None:
            pytest.skip("mosquitto is not installed")
        self.tls_port = free_port()
        self.plain_port = free_port()
        self.log_file = directory / "mosquitto.log"
        self.starts = 0
        self.process: subprocess.Popen[bytes] | None = None
        lines = [
            f"pid_file {directory / 'mosquitto.pid'}",
            f"log_dest file {self.log_file}",
            "log_type all",
            "set_tcp_nodelay true",
            "allow_anonymous true",
            f"listener {self.tls_port} 127.0.0.1",
            f"cafile {pki.ca_file}",
            f"certfile {pki.server_cert}",
            f"keyfile {pki.server_key}",
            f"listener {self.plain_port} 127.0.0.1",
        ]
        if persistence:
            lines += ["persistence true", f"persistence_location {directory}/"]
        else:
            lines.append("persistence false")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # Otherwise mosquitto drops to user 'mosquitto', who cannot read the temporary files.
            lines.insert(0, "user root")
        self.config = directory / "mosquitto.conf"
        self.config.write_text("\n".join(lines) + "\n")

    def start(self) -> None:
        """Start the broker and wait until both listeners accept connections."""
        assert self.process is None, "already running"
        assert MOSQUITTO is not None
        self.process = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.starts += 1
        try:
            wait_listening(self.tls_port, self.process, self.log_file)
            wait_listening(self.plain_port, self.process, self.log_file)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Terminate the broker (SIGTERM: it saves its persistence file), killing it if needed."""
        process, self.process = self.process, None
        if process is None:
            return
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)

    def restart(self) -> None:
        """Stop, then start again on the same ports."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        """True while the process is alive."""
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> Mosquitto:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
