"""A software TPM (swtpm) in a child process, for tests, demos and benchmarks.

Each :class:`SwtpmProcess` is one TPM 2.0 on two loopback TCP ports (commands on ``port``, control
on ``port + 1``), keeping its state in ``state_dir`` so keys survive a restart. swtpm has no
resource manager and only 3 transient object and 3 session slots: give each simulated device its
own process rather than sharing one between threads.
"""

from __future__ import annotations

import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from .errors import TpmError, TpmUnavailable

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: How long :meth:`SwtpmProcess.start` waits for swtpm to accept connections (seconds).
START_TIMEOUT = 10.0
#: How long :meth:`SwtpmProcess.stop` waits after SIGTERM before it sends SIGKILL (seconds).
STOP_TIMEOUT = 5.0
_PORT_ATTEMPTS = 50
_START_ATTEMPTS = 3
_LOG_NAME = "swtpm.log"


def available() -> bool:
    """True if the ``swtpm`` binary is on PATH."""
    return shutil.which("swtpm") is not None


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port_pair() -> int:
    """A loopback port P such that P and P + 1 are both free right now (bounded attempts)."""
    for _ in range(_PORT_ATTEMPTS):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            port = int(sock.getsockname()[1])
        if port < 65535 and _port_is_free(port + 1):
            return port
    raise TpmError(f"found no pair of free consecutive loopback ports in {_PORT_ATTEMPTS} tries")


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


class SwtpmProcess:
    """A running ``swtpm socket --tpm2`` on loopback; stop it with :meth:`stop` or ``with``.

    ``port`` fixes the command port (control is ``port + 1``); without it a free pair is picked,
    and if swtpm loses a race for the ports a new pair is tried (a few times). Starts in the
    constructor; :class:`TpmUnavailable` if swtpm does not come up within :data:`START_TIMEOUT`.
    """

    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        if not available():
            raise TpmUnavailable("swtpm", "the swtpm binary is not on PATH")
        self.state_dir = Path(state_dir).resolve()
        if "," in str(self.state_dir):
            raise TpmError(f"swtpm cannot use a state directory with a comma: {self.state_dir}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._fixed_port = port
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._start()

    @property
    def tcti(self) -> str:
        """The TCTI string for tpm2-tss / tpm2-pytss: ``swtpm:host=127.0.0.1,port=P``."""
        return f"swtpm:host={HOST},port={self.port}"

    @property
    def ctrl_port(self) -> int:
        """The control channel's port (the swtpm TCTI always uses ``port + 1``)."""
        return self.port + 1

    @property
    def running(self) -> bool:
        """True while the child process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _command(self) -> list[str]:
        return [
            "swtpm",
            "socket",
            "--tpm2",
            "--server",
            f"type=tcp,port={self.port},bindaddr={HOST}",
            "--ctrl",
            f"type=tcp,port={self.port + 1},bindaddr={HOST}",
            "--tpmstate",
            f"dir={self.state_dir}",
            "--flags",
            "not-need-init,startup-clear",
        ]

    def _start(self) -> None:
        attempts = 1 if self._fixed_port is not None else _START_ATTEMPTS
        reason = "not started"
        for _ in range(attempts):
            self.port = self._fixed_port if self._fixed_port is not None else _free_port_pair()
            reason = self._start_once()
            if not reason:
                log.debug("swtpm pid %s listening at %s", self.pid, self.tcti)
                return
        raise TpmUnavailable(self.tcti, f"swtpm did not start: {reason}")

    def _start_once(self) -> str:
        """Start swtpm and wait for both ports; '' on success, else why it failed."""
        log_path = self.state_dir / _LOG_NAME
        with open(log_path, "ab") as log_file:
            self._proc = subprocess.Popen(
                self._command(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                return f"exited with status {code}; {self._log_tail(log_path)}"
            if _accepts(self.port) and _accepts(self.port + 1) and self._proc.poll() is None:
                return ""
            time.sleep(0.01)
        self.stop()
        return f"no connection within {START_TIMEOUT:g} s"

    @staticmethod
    def _log_tail(path: Path) -> str:
        try:
            lines = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return "no log"
        return " / ".join(lines[-3:]) or "empty log"

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def stop(self) -> None:
        """Terminate swtpm (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`); idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop and start again on the same ports with the same state (keys survive)."""
        self.stop()
        self._fixed_port, fixed = self.port, self._fixed_port
        try:
            self._start()
        finally:
            self._fixed_port = fixed

    def __enter__(self) -> SwtpmProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"SwtpmProcess({self.tcti!r}, state_dir={str(self.state_dir)!r}, {state})"
