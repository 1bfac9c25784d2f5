"""Run Microsoft's IoTHubDeviceClient (azure-iot-device) against a hub; report what it sees as JSON.

Runs in the SDK's own virtualenv (.venv-azure-sdk), never ours: it must not import our packages.
The SDK always connects to port 8883 with TLS 1.2 only and verifies the server certificate
against --ca-file.

The program connects, enables its handlers (direct methods, C2D messages, desired patches), sends
--telemetry messages with properties, reads the twin, patches reported properties, prints
``{"event": "ready", "twin": ...}`` and then waits, bounded by --timeout, for every event named
in --expect. stdout carries one JSON object a line, each with an "event":

  connection  {"connected": bool}            the SDK's connection state changed
  background  {"error", "message"}           the SDK reported a background exception
  ready       {"twin": {...}}                 set-up finished; the service side may act now
  desired     {"patch": {...}}                a desired-properties patch arrived
  method      {"name", "payload", "status"}   a direct method arrived and was answered
  c2d         {"data", "custom_properties", "message_id", "content_type", "content_encoding"}
  done        {}                              every expected event was seen   exit 0
  error       {"error", "message"[, "cause"]}                                 exit 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from typing import Any

EVENTS = ("desired", "method", "c2d")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line: which hub and device, what to send and what to wait for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="hub host name (the SDK uses port 8883)")
    parser.add_argument("--device-id", required=True)
    parser.add_argument("--key", required=True, help="base64 symmetric device key")
    parser.add_argument("--ca-file", required=True, help="PEM file of the CA to trust")
    parser.add_argument("--telemetry", type=int, default=2, help="telemetry messages to send")
    parser.add_argument(
        "--expect",
        default=",".join(EVENTS),
        help="comma-separated events to wait for after ready (desired, method, c2d)",
    )
    parser.add_argument(
        "--retry-interval", type=int, default=10, help="seconds between SDK reconnect attempts"
    )
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for the whole run")
    parser.add_argument("--debug", action="store_true", help="SDK debug logging on stderr")
    args = parser.parse_args(argv)
    expected = {name for name in args.expect.split(",") if name}
    unknown = expected - set(EVENTS)
    if unknown:
        parser.error(f"unknown --expect events: {sorted(unknown)}")
    args.expected = expected
    return args


class Reporter:
    """Prints events as JSON lines (thread-safe) and remembers which ones were seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self.seen: set[str] = set()
        self.failure: dict[str, Any] | None = None

    def emit(self, event: str, **fields: Any) -> None:
        """Print one event line."""
        line = json.dumps({"event": event, **fields}, default=repr)
        with self._lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
            if event in EVENTS:
                self.seen.add(event)
            self._changed.notify_all()

    def fail(self, exc: BaseException) -> None:
        """Record a failure inside a handler; the main thread reports it."""
        with self._lock:
            if self.failure is None:
                self.failure = describe(exc)
            self._changed.notify_all()

    def wait_for(self, expected: set[str], deadline: float) -> bool:
        """Wait until every expected event was seen (True), or a failure or the deadline."""
        with self._lock:
            while not expected <= self.seen and self.failure is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(min(remaining, 0.5))
            return self.failure is None


def describe(exc: BaseException) -> dict[str, Any]:
    """The error report; the SDK wraps most failures, so name the underlying cause too."""
    report: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        report["cause"] = f"{type(cause).__name__}: {cause}"
    return report


def _text(data: Any) -> Any:
    if isinstance(data, (bytes, bytearray)):
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            return repr(bytes(data))
    return data


def install_handlers(client: Any, reporter: Reporter) -> None:
    """Set the SDK's handler properties (each one subscribes and waits for the SUBACK)."""
    from azure.iot.device import MethodResponse  # type: ignore[import-not-found, unused-ignore]

    def on_state() -> None:
        reporter.emit("connection", connected=bool(client.connected))

    def on_background(exc: Exception) -> None:
        reporter.emit("background", **describe(exc))

    def on_method(request: Any) -> None:
        try:
            response = MethodResponse.create_from_method_request(
                request, 200, {"echo": request.payload}
            )
            client.send_method_response(response)
            reporter.emit("method", name=request.name, payload=request.payload, status=200)
        except Exception as exc:
            reporter.fail(exc)

    def on_message(message: Any) -> None:
        reporter.emit(
            "c2d",
            data=_text(message.data),
            custom_properties=dict(message.custom_properties),
            message_id=message.message_id,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
        )

    def on_desired(patch: Any) -> None:
        reporter.emit("desired", patch=patch)

    client.on_connection_state_change = on_state
    client.on_background_exception = on_background
    client.on_method_request_received = on_method
    client.on_message_received = on_message
    client.on_twin_desired_properties_patch_received = on_desired


def send_telemetry(client: Any, count: int) -> None:
    """Telemetry with an application property, message id, content type and encoding."""
    from azure.iot.device import Message  # type: ignore[import-not-found, unused-ignore]

    for index in range(count):
        message = Message(
            json.dumps({"n": index, "temperature": 20.5 + index}),
            message_id=f"sdk-msg-{index}",
            content_encoding="utf-8",
            content_type="application/json",
        )
        message.custom_properties["app"] = "sdk-hub"
        message.custom_properties["seq"] = str(index)
        message.custom_properties["note"] = "a b&c=d"
        client.send_message(message)


def run(args: argparse.Namespace, reporter: Reporter) -> Any:
    """Connect and set up; return the client (for shutdown) once ready was printed."""
    from azure.iot.device import IoTHubDeviceClient  # type: ignore[import-not-found, unused-ignore]

    with open(args.ca_file, encoding="ascii") as handle:
        ca_pem = handle.read()
    client = IoTHubDeviceClient.create_from_symmetric_key(
        symmetric_key=args.key,
        hostname=args.host,
        device_id=args.device_id,
        server_verification_cert=ca_pem,
        connection_retry_interval=args.retry_interval,
    )
    client.connect()
    install_handlers(client, reporter)
    send_telemetry(client, args.telemetry)
    twin = client.get_twin()
    client.patch_twin_reported_properties({"sdk": {"firmware": "1.2.3"}, "sent": args.telemetry})
    reporter.emit("ready", twin=twin)
    return client


def shutdown(client: Any, timeout: float) -> None:
    """client.shutdown() bounded in time (the SDK has no deadline of its own)."""
    worker = threading.Thread(target=client.shutdown, name="sdk-shutdown", daemon=True)
    worker.start()
    worker.join(timeout)


def main(argv: list[str]) -> int:
    """Parse arguments, run the scenario, report every event; 0 when all expected were seen."""
    args = parse_args(argv)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    deadline = time.monotonic() + args.timeout
    reporter = Reporter()
    clients: list[Any] = []

    def setup() -> None:
        try:
            clients.append(run(args, reporter))
        except BaseException as exc:
            reporter.fail(exc)

    worker = threading.Thread(target=setup, name="sdk-setup", daemon=True)
    worker.start()
    worker.join(max(0.0, deadline - time.monotonic()))
    if reporter.failure is not None:
        reporter.emit("error", **reporter.failure)
        return 2
    if not clients:
        reporter.emit("error", error="Timeout", message=f"set-up took over {args.timeout} s")
        return 2
    client = clients[0]
    try:
        if not reporter.wait_for(args.expected, deadline):
            if reporter.failure is not None:
                reporter.emit("error", **reporter.failure)
            else:
                missing = sorted(args.expected - reporter.seen)
                reporter.emit(
                    "error", error="Timeout", message=f"not seen in {args.timeout} s: {missing}"
                )
            return 2
        reporter.emit("done")
        return 0
    finally:
        shutdown(client, 10.0)


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The SDK can leave non-daemon pipeline threads behind; do not wait for them.
    os._exit(exit_code)
