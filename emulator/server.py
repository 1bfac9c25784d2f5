"""The emulator process: store, certificates, the MQTT listener with DPS and the hub behind it
(:mod:`emulator.router` tells them apart), the service API.

:class:`Emulator` runs inside an asyncio loop; :class:`EmulatorThread` runs one in a background
thread (tests, demos); :func:`run_foreground` is ``dps-mqtt emulator``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from .allocation import (
    SERVICE_POLICIES,
    LinkedHub,
    LinkedHubRegistry,
    WebhookRunner,
    validate_allocation_weight,
    validate_latency,
)
from .certs import CertPaths, ensure_certificates
from .client_trust import ClientTrust
from .config import EmulatorConfig
from .dps_https import DpsHttpsServer
from .dps_service import Answer, DpsConfig, DpsService
from .errors import EmulatorError, ValidationError
from .hub_service import HubConfig, HubService
from .models import validate_host_name
from .mqtt_server import MqttServer, ServerLimits
from .router import ConnectionRouter, DpsSession, HubRuntime, TelemetryForwarder
from .service_api import ServiceApi
from .store import Store
from .x509 import CertificateIssuer

__all__ = ["DpsSession", "Emulator", "EmulatorThread", "run_foreground"]

log = logging.getLogger(__name__)


class Emulator:
    """DPS and IoT Hub emulator bound to one event loop."""

    def __init__(
        self,
        config: EmulatorConfig,
        *,
        dps_config: DpsConfig | None = None,
        hub_config: HubConfig | None = None,
        limits: ServerLimits | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        # Checked first: a bad route URL or hub setting must fail before anything is opened.
        forwarder = TelemetryForwarder(config.route_to) if config.route_to else None
        hub_settings = _hub_settings(config)
        allocation_policy = (dps_config or config).allocation_policy
        if allocation_policy not in SERVICE_POLICIES:
            raise EmulatorError(
                f"the service allocation policy must be one of {', '.join(SERVICE_POLICIES)};"
                f" got {allocation_policy!r}"
            )
        self._clock = clock
        self._limits = limits or ServerLimits()
        self._temp_dir: Path | None = None
        if config.state_dir is None:
            self._temp_dir = Path(tempfile.mkdtemp(prefix="dps-mqtt-emulator-"))
            self.state_dir = self._temp_dir
            store_path = ":memory:"
        else:
            self.state_dir = Path(config.state_dir)
            self.state_dir.mkdir(parents=True, exist_ok=True)
            store_path = str(self.state_dir / "emulator.db")
        self.store = Store(store_path)
        for hub in config.hubs:
            self.store.add_hub(hub)
        for hub_setting in hub_settings:
            self.store.put_hub(hub_setting)
        dps = dps_config or DpsConfig(
            id_scope=config.id_scope,
            retry_after=config.retry_after,
            allocation_policy=config.allocation_policy,
            webhook_timeout=config.webhook_timeout,
        )
        self.dps = DpsService(self.store, dps)
        self.hub = HubService(
            self.store, hub_config or HubConfig(telemetry_keep=config.telemetry_keep)
        )
        self.hub_runtime = HubRuntime(self.hub, forwarder, clock)
        self.router = ConnectionRouter(self.dps, self.hub_runtime)
        # Custom allocation webhooks run in worker threads; DPS hears back on the loop.
        self._webhooks = WebhookRunner(self.dps.complete_allocation, clock)
        self.dps.allocation_listener = self._start_webhooks
        self.dps.device_moved = self.hub_runtime.disconnect_device
        # Hubs linked at run time in an earlier run are in the store: cover them too.
        self.certs: CertPaths = ensure_certificates(
            self.state_dir, _cert_names(config, self.store.list_hubs()), _cert_addresses(config)
        )
        #: DNS names the server certificate covers (hubs linked at run time must be among them).
        self.certificate_names = _certificate_dns_names(self.certs.server_cert)
        # TLS for both listeners: requests (never requires) a client certificate, trusting the
        # emulator CA and the X.509 enrollments' certificates (see emulator.client_trust).
        self.trust = ClientTrust(self.certs, self.store)
        # Certificates for register requests with a CSR are signed by the emulator's CA.
        self.dps.issuer = CertificateIssuer.from_paths(self.certs)
        self._mqtt = MqttServer(
            self.router.authenticate,
            self.trust.context,
            limits=self._limits,
            clock=clock,
        )
        self.api = ServiceApi(
            self.store, self.info, host=config.host, port=config.api_port, clock=clock
        )
        self.api.add_hub_routes(self.hub_runtime)
        self.api.add_linked_hub_routes(
            LinkedHubRegistry(self.store, self.certificate_names, self.hub_runtime.unlink_hub)
        )
        self.mqtt_port = config.mqtt_port
        self.https: DpsHttpsServer | None = None
        #: The event loop the emulator runs on (set by :meth:`start`).
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def ca_file(self) -> Path:
        """The CA certificate devices must trust."""
        return self.certs.ca_cert

    @property
    def api_url(self) -> str:
        """Base URL of the service API."""
        return self.api.url

    @property
    def connection_count(self) -> int:
        """MQTT connections open right now."""
        return self._mqtt.connection_count

    def _start_webhooks(self) -> None:
        """DPS queued webhook calls (we are on the loop): run them off the loop."""
        self._webhooks.submit(self.dps.take_allocation_calls(), self.dps.config.webhook_timeout)

    def info(self) -> dict[str, Any]:
        """What a client needs to know to use this emulator."""
        return {
            "idScope": self.config.id_scope,
            "dps": {
                "host": self.config.hostnames[0],
                "port": self.mqtt_port,
                "bind": self.config.host,
            },
            "dpsHttps": {
                "host": self.config.hostnames[0],
                "port": self.https.port if self.https else self.config.https_port,
            },
            "hubs": self.store.list_hubs(),
            "hub": {"port": self.mqtt_port, "bind": self.config.host},
            "telemetryRoute": (
                self.hub_runtime.forwarder.stats() if self.hub_runtime.forwarder else None
            ),
            "serviceApi": self.api_url,
            "caCertificate": str(self.ca_file),
            "stateDir": None if self._temp_dir else str(self.state_dir),
        }

    async def start(self) -> None:
        """Start listening (MQTT, DPS over HTTPS, service API) and the telemetry route."""
        loop = asyncio.get_running_loop()
        self.loop = loop
        self.hub_runtime.attach(loop)
        if self.hub_runtime.forwarder is not None:
            self.hub_runtime.forwarder.start()

        def run_on_loop(func: Callable[[], Answer]) -> Answer:
            async def call() -> Answer:
                return func()

            return asyncio.run_coroutine_threadsafe(call(), loop).result(30.0)

        self.mqtt_port = await self._mqtt.start(self.config.host, self.config.mqtt_port)
        self.https = DpsHttpsServer(
            self.dps,
            self.trust.context,
            run_on_loop,
            self._clock,
            host=self.config.host,
            port=self.config.https_port,
        )
        self.https.start()
        self.api.start()
        log.info(
            "emulator listening: MQTT %s:%d, API %s", self.config.host, self.mqtt_port, self.api_url
        )

    async def stop(self) -> None:
        """Stop serving, close every connection and the store."""
        await self._mqtt.stop()
        await self._webhooks.close()
        self.hub_runtime.attach(None)
        loop = asyncio.get_running_loop()
        if self.https is not None:
            await loop.run_in_executor(None, self.https.stop)
        self.api.stop()
        if self.hub_runtime.forwarder is not None:
            await loop.run_in_executor(None, self.hub_runtime.forwarder.stop)
        self.store.close()
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)


def _hub_settings(config: EmulatorConfig) -> list[LinkedHub]:
    """The configured allocation weights and latencies, for hubs among ``config.hubs``
    (validated: :class:`EmulatorError` names the bad one)."""
    hubs = {hub.lower() for hub in config.hubs}
    weights = {name.lower(): value for name, value in config.hub_weights.items()}
    latencies = {name.lower(): value for name, value in config.hub_latencies.items()}
    settings: list[LinkedHub] = []
    for name in sorted({*weights, *latencies}):
        if name not in hubs:
            raise EmulatorError(f"hub {name!r} has a weight or latency but is not a linked hub")
        try:
            settings.append(
                LinkedHub(
                    validate_host_name(name, "hub name"),
                    validate_allocation_weight(weights.get(name, 1), f"weight of {name}"),
                    validate_latency(latencies.get(name), f"latency of {name}"),
                )
            )
        except ValidationError as exc:
            raise EmulatorError(str(exc)) from exc
    return settings


def _certificate_dns_names(path: Path) -> list[str]:
    """The DNS names in a PEM certificate's subjectAltName (empty if it cannot be read)."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound) as exc:
        log.warning("cannot read the names of %s: %s", path, exc)
        return []
    return [str(name) for name in san.get_values_for_type(x509.DNSName)]


def _cert_names(config: EmulatorConfig, stored_hubs: Sequence[str] = ()) -> list[str]:
    names: list[str] = []
    hubs = [hub.partition(":")[0] for hub in (*config.hubs, *stored_hubs)]  # no ":port"
    for name in (*config.hostnames, *hubs, "localhost"):
        if _is_ip(name) or name in names:
            continue
        names.append(name)
    return names


def _cert_addresses(config: EmulatorConfig) -> list[str]:
    addresses = ["127.0.0.1", "::1"]
    for name in (config.host, *config.hostnames, *config.hubs):
        if _is_ip(name) and name not in addresses and name not in ("0.0.0.0", "::"):
            addresses.append(name)
    return addresses


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


class EmulatorThread:
    """Runs an :class:`Emulator` on its own event loop in a daemon thread."""

    def __init__(self, config: EmulatorConfig, **kwargs: Any) -> None:
        self._config = config
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="dps-mqtt-emulator", daemon=True)
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._error: BaseException | None = None
        self.emulator: Emulator | None = None

    def start(self, timeout: float = 30.0) -> Emulator:
        """Start the thread and wait until the emulator listens."""
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the emulator did not start in time")
        if self._error is not None or self.emulator is None:
            raise RuntimeError(f"the emulator failed to start: {self._error}") from self._error
        return self.emulator

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        try:
            self.emulator = Emulator(self._config, **self._kwargs)
            await self.emulator.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()
        await self.emulator.stop()

    def call(self, func: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Run ``func`` on the emulator's loop and return its result."""

        async def runner() -> Any:
            return func()

        return asyncio.run_coroutine_threadsafe(runner(), self._loop).result(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the emulator and join the thread."""
        if self._stopped is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout)

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: asyncio's TLS transports read into a 256 KiB buffer each; 16 KiB (one TLS record) is plenty
#: for MQTT and cuts the emulator's memory per connection by about 200 KiB.
TLS_READ_BUFFER = 16 * 1024


def limit_tls_read_buffer(size: int = TLS_READ_BUFFER) -> None:
    """Shrink asyncio's per-connection TLS read buffer for this process (CPython 3.11+)."""
    import asyncio.sslproto

    protocol = getattr(asyncio.sslproto, "SSLProtocol", None)
    if protocol is not None and hasattr(protocol, "max_size"):
        protocol.max_size = size


def run_foreground(config: EmulatorConfig) -> int:
    """Run the emulator until Ctrl-C or SIGTERM; print where it listens. Returns an exit code."""
    logging.basicConfig(
        level=getattr(logging, config.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )

    limit_tls_read_buffer()

    async def main() -> None:
        emulator = Emulator(config)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        await emulator.start()
        info = emulator.info()
        print("dps-mqtt emulator is running", flush=True)
        print(
            f"  DPS (MQTT over TLS): {info['dps']['host']}:{emulator.mqtt_port}"
            f"  id scope {config.id_scope}",
            flush=True,
        )
        print(
            f"  DPS (HTTPS):         {info['dpsHttps']['host']}:{info['dpsHttps']['port']}",
            flush=True,
        )
        print(
            f"  linked IoT hubs:     {', '.join(info['hubs']) or '(none)'}"
            f" (MQTT over TLS on port {emulator.mqtt_port})",
            flush=True,
        )
        if config.route_to:
            print(f"  telemetry route:     {config.route_to}", flush=True)
        print(f"  service API:         {emulator.api_url}", flush=True)
        print(f"  CA certificate:      {emulator.ca_file}", flush=True)
        print(f"  state directory:     {info['stateDir'] or '(in memory)'}", flush=True)
        print("Press Ctrl-C to stop.", flush=True)
        await stop.wait()
        print("stopping", flush=True)
        await emulator.stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"dps-mqtt emulator: cannot start: {exc}", flush=True)
        return 1
    return 0
