"""What every benchmark shares: the run context, machine facts, timing and statistics helpers, and
the local servers a benchmark may need (mosquitto with TLS, the emulator in its own process).

A benchmark module (``benchmarks/bench_<name>.py``) defines ``BENCHMARK = Benchmark(...)``; its
``run`` gets a :class:`Context` and returns a :class:`Result`. Servers are started on first use
through the context, shared by the benchmarks of one run and stopped when the run ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import resource
import select
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, TextIO

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
HOST = "127.0.0.1"
ID_SCOPE = "0ne0000BE0C"
#: Packages whose versions every result records (absent ones are recorded as null).
PACKAGES = ("dps-mqtt", "paho-mqtt", "cryptography", "tpm2-pytss", "matplotlib", "numpy")
#: How long a child server may take to say it is ready, and to stop (seconds).
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
#: A child server stops by itself after this long, even if nobody stops it (seconds).
CHILD_MAX_LIFETIME = 1800.0


class Skipped(Exception):
    """A benchmark cannot run here (a tool or package is missing); the reason is recorded."""


# -- results ---------------------------------------------------------------------------------


@dataclass
class Goal:
    """A target for one measure (usually a ratio): ``value <op> target`` (``<=`` or ``>=``)."""

    measure: str
    op: str
    target: float
    value: float | None = None

    @property
    def met(self) -> bool | None:
        """Whether the measured value meets the target (None when it was not measured)."""
        if self.value is None or not math.isfinite(self.value):
            return None
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def to_json(self) -> dict[str, Any]:
        """The goal as it appears in the result file."""
        return {
            "measure": self.measure,
            "op": self.op,
            "target": self.target,
            "value": self.value,
            "met": self.met,
        }


@dataclass
class Row:
    """One line of the README table: a figure, its baseline, their ratio, and the goal."""

    measure: str
    figure: str
    baseline: str
    ratio: float | None
    goal: str = ""
    met: bool | None = None


@dataclass
class Result:
    """What a benchmark measured. The runner adds the name, the machine and the timing."""

    params: dict[str, Any]
    results: dict[str, Any]
    baseline: dict[str, Any]
    ratios: dict[str, float | None]
    goals: list[Goal] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def goals_json(self) -> dict[str, Any]:
        """``{measure: goal, ..., "met": all measured goals met}``."""
        out: dict[str, Any] = {goal.measure: goal.to_json() for goal in self.goals}
        measured = [goal.met for goal in self.goals if goal.met is not None]
        out["met"] = bool(measured) and all(measured)
        return out


PlotFunction = Callable[[dict[str, Any], Path], None]


@dataclass(frozen=True)
class Benchmark:
    """A benchmark as the runner sees it; ``order`` sorts the runs and the README table."""

    name: str
    title: str
    run: Callable[[Context], Result]
    plot: PlotFunction | None = None
    order: int = 100


# -- statistics and timing ---------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0..100) with linear interpolation between closest ranks."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    """The median (50th percentile)."""
    return percentile(values, 50.0)


def latency_summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """Count, mean, p50, p95, p99 and max of latencies given in seconds, in milliseconds."""
    if not seconds:
        return {"count": 0}
    ms = [value * 1000.0 for value in seconds]
    return {
        "count": len(ms),
        "mean_ms": sum(ms) / len(ms),
        "p50_ms": percentile(ms, 50),
        "p95_ms": percentile(ms, 95),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
    }


def ratio(figure: float | None, baseline: float | None) -> float | None:
    """``figure / baseline``, or None when either is missing or the baseline is zero."""
    if figure is None or baseline is None or baseline == 0:
        return None
    return figure / baseline


class Timings:
    """Named durations (seconds), recorded with ``with timings.measure(name):``."""

    def __init__(self) -> None:
        self.calls: dict[str, list[float]] = {}

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        """Time the block and record it under ``name`` (also when it raises)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.calls.setdefault(name, []).append(time.perf_counter() - start)

    def total(self) -> float:
        """The sum of every recorded duration."""
        return sum(sum(values) for values in self.calls.values())


class Progress:
    """Prints ``[elapsed] benchmark: message`` lines as the run goes (flushed at once)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout
        self._start = time.monotonic()
        self.prefix = ""

    def __call__(self, message: str) -> None:
        elapsed = time.monotonic() - self._start
        prefix = f"{self.prefix}: " if self.prefix else ""
        print(f"[{elapsed:7.1f}s] {prefix}{message}", file=self._stream, flush=True)


# -- the machine ---------------------------------------------------------------------------------


def _package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _first_line(command: Sequence[str]) -> str | None:
    """The first non-empty output line of a short command, or None if it cannot run."""
    if shutil.which(command[0]) is None and not Path(command[0]).exists():
        return None
    try:
        done = subprocess.run(
            list(command), capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in (done.stdout + done.stderr).splitlines():
        if line.strip():
            return line.strip()
    return None


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _memory_total_mb() -> float | None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 1024.0
    return None


def _git_commit() -> str | None:
    """The checked-out commit, read from ``.git`` without running git."""
    git = REPO_ROOT / ".git"
    with contextlib.suppress(OSError):
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head or None
        ref = head[5:]
        ref_file = git / ref
        if ref_file.exists():
            return ref_file.read_text().strip() or None
        packed = git / "packed-refs"
        if packed.exists():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref:
                    return parts[0]
    return None


def machine_info() -> dict[str, Any]:
    """Cores, memory, load, OS, Python, OpenSSL, package and tool versions of this machine."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    try:
        load = list(os.getloadavg())
    except OSError:
        load = []
    return {
        "cores": os.cpu_count(),
        "cores_usable": usable,
        "cpu_model": _cpu_model(),
        "memory_mb": _memory_total_mb(),
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "python_executable": sys.executable,
        "openssl": ssl.OPENSSL_VERSION,
        "packages": _package_versions(),
        "tools": {
            "mosquitto": _first_line([mosquitto_binary() or "mosquitto", "-h"]),
            "swtpm": _first_line(["swtpm", "--version"]),
        },
        "commit": _git_commit(),
    }


# -- processes and sockets -------------------------------------------------------------------


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process (all its threads) has used so far; None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def free_port() -> int:
    """A loopback TCP port that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def raise_open_files_limit(wanted: int = 65536) -> int:
    """Raise this process's soft open-files limit towards ``wanted`` (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def wait_listening(port: int, process: subprocess.Popen[Any], what: str, log: Path) -> None:
    """Wait (bounded) until ``port`` accepts connections; raise if the process exits first."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {_tail(log)}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port} within {START_TIMEOUT:g} s")


def stop_process(process: subprocess.Popen[Any] | None) -> None:
    """SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`; idempotent."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=STOP_TIMEOUT)


def _tail(path: Path, lines: int = 5) -> str:
    with contextlib.suppress(OSError):
        return " / ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    return "(no log)"


def mosquitto_binary() -> str | None:
    """Where mosquitto is (Debian puts it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None


class MosquittoProcess:
    """A mosquitto on loopback with a TLS and a plain listener, its files under ``directory``.

    TCP_NODELAY on (else Nagle adds ~40 ms per round trip), no persistence, no per-connection
    log lines, queues and in-flight windows unlimited so that a responder serving a thousand
    clients is never throttled by the broker. Runs as root when we are root (otherwise mosquitto
    switches to the user ``mosquitto``, who cannot read the temporary certificates).
    """

    def __init__(self, directory: Path, cert_file: Path, key_file: Path) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise Skipped("mosquitto is not installed (make bench installs it)")
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.tls_port = free_port()
        self.plain_port = free_port()
        self.log_file = directory / "mosquitto.log"
        lines = [
            f"pid_file {directory / 'mosquitto.pid'}",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "connection_messages false",
            "persistence false",
            "set_tcp_nodelay true",
            "allow_anonymous true",
            "max_queued_messages 0",
            "max_inflight_messages 0",
            f"listener {self.tls_port} {HOST}",
            f"certfile {cert_file}",
            f"keyfile {key_file}",
            f"listener {self.plain_port} {HOST}",
        ]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            lines.insert(0, "user root")
        self.config_file = directory / "mosquitto.conf"
        self.config_file.write_text("\n".join(lines) + "\n")
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [binary, "-c", str(self.config_file)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(self.tls_port, self._process, "mosquitto", self.log_file)
            wait_listening(self.plain_port, self._process, "mosquitto", self.log_file)
        except BaseException:
            self.stop()
            raise

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """Stop the broker; idempotent."""
        process, self._process = self._process, None
        stop_process(process)

    def __enter__(self) -> MosquittoProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ChildProcess:
    """``python -m benchmarks.<module> ...`` that prints one JSON line when it is ready.

    The child stops when its standard input closes (we never write to it), on SIGTERM, or after
    its own maximum lifetime; :meth:`stop` closes the pipe and waits, then signals.
    """

    def __init__(self, module: str, args: Sequence[str], log_file: Path) -> None:
        self.log_file = log_file
        self._log = open(log_file, "ab")  # noqa: SIM115 - closed in stop()
        self._process: subprocess.Popen[bytes] | None = subprocess.Popen(
            [sys.executable, "-m", f"benchmarks.{module}", *args],
            cwd=REPO_ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
        )
        try:
            self.info = self._read_ready(module)
        except BaseException:
            self.stop()
            raise

    def _read_ready(self, module: str) -> dict[str, Any]:
        process = self._process
        assert process is not None and process.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        buffer = b""
        while b"\n" not in buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{module} did not start within {START_TIMEOUT:g} s")
            ready, _, _ = select.select([process.stdout], [], [], min(remaining, 0.5))
            if ready:
                chunk = os.read(process.stdout.fileno(), 4096)
                if not chunk:
                    process.wait(timeout=STOP_TIMEOUT)
                    raise RuntimeError(
                        f"{module} exited with {process.returncode}: {_tail(self.log_file)}"
                    )
                buffer += chunk
        info: dict[str, Any] = json.loads(buffer.split(b"\n", 1)[0])
        return info

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        return self._process.pid if self._process is not None else None

    def stop(self) -> None:
        """Close its standard input, wait (bounded), then SIGTERM/SIGKILL; idempotent."""
        process, self._process = self._process, None
        if process is not None:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                stop_process(process)
            if process.stdout is not None:
                process.stdout.close()
        with contextlib.suppress(OSError):
            self._log.close()


@dataclass(frozen=True)
class EmulatorInfo:
    """Where a running emulator listens."""

    mqtt_port: int
    https_port: int
    api_url: str
    ca_file: str
    id_scope: str
    pid: int


class EmulatorProcess(ChildProcess):
    """The emulator (DPS over MQTT and HTTPS, service API) in its own Python process.

    Its own process, not a thread of the benchmark's, so that the load generator and the server
    do not share one interpreter lock: with mosquitto the broker is a process of its own too.
    """

    def __init__(
        self,
        directory: Path,
        *,
        retry_after: int = 0,
        poll_throttle: bool = False,
        https_nodelay: bool = False,
        route_to: str | None = None,
        ssl_read_buffer: int | None = None,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        args = ["--id-scope", ID_SCOPE, "--retry-after", str(retry_after)]
        if poll_throttle:
            args.append("--poll-throttle")
        if https_nodelay:
            args.append("--https-nodelay")
        if route_to:
            args += ["--route-to", route_to]
        if ssl_read_buffer:
            args += ["--ssl-read-buffer", str(ssl_read_buffer)]
        super().__init__("emulator_process", args, directory / "emulator.log")
        self.emulator = EmulatorInfo(**self.info)


# -- the run context -------------------------------------------------------------------------


class Context:
    """What a benchmark gets: the mode, a progress printer, a work directory, shared servers."""

    def __init__(self, *, smoke: bool, progress: Progress | None = None) -> None:
        self.smoke = smoke
        self.progress = progress if progress is not None else Progress()
        self.work_dir = Path(tempfile.mkdtemp(prefix="dps-mqtt-bench-"))
        self._stack = contextlib.ExitStack()
        self._mosquitto: MosquittoProcess | None = None
        self._emulators: dict[tuple[int, bool, bool], EmulatorProcess] = {}
        self._certs: tuple[Path, Path, Path] | None = None
        self._fresh = 0

    def pick(self, full: Any, smoke: Any) -> Any:
        """``smoke`` in smoke mode, else ``full`` (for sizes and time budgets)."""
        return smoke if self.smoke else full

    def tls_files(self) -> tuple[Path, Path, Path]:
        """(CA certificate, server certificate, server key) for loopback TLS servers.

        Made with the emulator's own certificate code, so mosquitto and the emulator present the
        same kind of key and chain.
        """
        if self._certs is None:
            from emulator.certs import ensure_certificates

            paths = ensure_certificates(self.work_dir / "pki", ["localhost"], [HOST, "::1"])
            self._certs = (paths.ca_cert, paths.server_cert, paths.server_key)
        return self._certs

    def mosquitto(self) -> MosquittoProcess:
        """The run's mosquitto (TLS and plain listeners), started on first use."""
        if self._mosquitto is None:
            _, cert, key = self.tls_files()
            self.progress("starting mosquitto")
            broker = MosquittoProcess(self.work_dir / "mosquitto", cert, key)
            self._stack.callback(broker.stop)
            self._mosquitto = broker
            self.progress(
                f"mosquitto pid {broker.pid}: TLS port {broker.tls_port}, "
                f"plain port {broker.plain_port}"
            )
        return self._mosquitto

    def emulator(
        self, *, retry_after: int = 0, poll_throttle: bool = False, https_nodelay: bool = False
    ) -> EmulatorInfo:
        """The run's emulator with these settings, started on first use.

        ``retry_after`` is what DPS answers with each 202 (0: poll at once, so that polling does
        not dominate). ``poll_throttle`` keeps Azure's 5 polls per registration in 10 s (off:
        benchmarks provision the same device again and again). ``https_nodelay`` (a diagnostic)
        sets TCP_NODELAY on the HTTPS server's connections, which http.server does not.
        """
        key = (retry_after, poll_throttle, https_nodelay)
        process = self._emulators.get(key)
        if process is None:
            self.progress(
                f"starting the emulator (retry_after={retry_after}, poll_throttle={poll_throttle},"
                f" https_nodelay={https_nodelay})"
            )
            process = EmulatorProcess(
                self.work_dir / f"emulator-{len(self._emulators)}",
                retry_after=retry_after,
                poll_throttle=poll_throttle,
                https_nodelay=https_nodelay,
            )
            self._stack.callback(process.stop)
            self._emulators[key] = process
            info = process.emulator
            self.progress(
                f"emulator pid {info.pid}: MQTT port {info.mqtt_port}, "
                f"HTTPS port {info.https_port}, API {info.api_url}"
            )
        return process.emulator

    def start_emulator(
        self,
        *,
        retry_after: int = 0,
        poll_throttle: bool = False,
        https_nodelay: bool = False,
        route_to: str | None = None,
        ssl_read_buffer: int | None = None,
    ) -> EmulatorProcess:
        """A new emulator of its own (fresh state), not shared: stop it when done with it.

        It is stopped when the run ends in any case. Options as for :meth:`emulator`;
        ``route_to`` (``mqtt://HOST:PORT``) has its hub republish all telemetry to that broker;
        ``ssl_read_buffer`` (a diagnostic) sets the size of asyncio's per-connection TLS read
        buffer in the emulator (256 KiB by default).
        """
        self._fresh += 1
        process = EmulatorProcess(
            self.work_dir / f"emulator-fresh-{self._fresh}",
            retry_after=retry_after,
            poll_throttle=poll_throttle,
            https_nodelay=https_nodelay,
            route_to=route_to,
            ssl_read_buffer=ssl_read_buffer,
        )
        self._stack.callback(process.stop)
        return process

    def child(self, module: str, args: Sequence[str]) -> ChildProcess:
        """Another ``benchmarks.<module>`` child process, stopped when the run ends."""
        process = ChildProcess(module, args, self.work_dir / f"{module}.log")
        self._stack.callback(process.stop)
        return process

    def close(self) -> None:
        """Stop every server this run started and remove the work directory."""
        try:
            self._stack.close()
        finally:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> Context:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class NoDelaySSLSocket(ssl.SSLSocket):
    """An SSL socket that turns Nagle's algorithm off before its handshake (TCP_NODELAY)."""

    def do_handshake(self, block: bool = False) -> None:
        with contextlib.suppress(OSError):
            self.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().do_handshake(block)


def client_ssl_context(ca_file: str | Path, *, nodelay: bool = False) -> ssl.SSLContext:
    """A TLS client context trusting ``ca_file``, with host name checks (as devices use).

    ``nodelay``: every socket wrapped by it gets TCP_NODELAY before the handshake (paho-mqtt
    itself never sets it).
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_verify_locations(cafile=str(ca_file))
    if nodelay:
        context.sslsocket_class = NoDelaySSLSocket
    return context


def as_jsonable(value: Any) -> Any:
    """Dataclasses to dicts, tuples to lists; leaves JSON types alone."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return as_jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(key): as_jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_jsonable(item) for item in value]
    return value


def write_json(path: Path, document: dict[str, Any]) -> None:
    """Write ``document`` to ``path`` atomically (through ``path.tmp``)."""
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(as_jsonable(document), indent=2, allow_nan=False) + "\n")
    os.replace(temp, path)
