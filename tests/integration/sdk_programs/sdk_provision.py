"""Provision one device with Microsoft's Python SDK (azure-iot-device); print the outcome as JSON.

Runs in the SDK's own virtualenv (.venv-azure-sdk), never ours: it must not import our packages.
The SDK always connects to port 8883 with TLS 1.2 only, verifies the server certificate against
--ca-file and checks that it covers --host. Symmetric-key group enrollments use this same program;
the caller passes the derived device key.

stdout carries exactly one line of JSON:
  success: {"status", "assignedHub", "deviceId", "substatus", "payload"}   exit 0
  failure: {"error": <exception type name>, "message": <text>[, "cause": <text>]}   exit 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
from typing import Any


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Command line: where to register and with which credentials."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", required=True, help="DPS host name (the SDK uses port 8883)")
    parser.add_argument("--id-scope", required=True)
    parser.add_argument("--registration-id", required=True)
    parser.add_argument("--key", required=True, help="base64 symmetric key (device or derived)")
    parser.add_argument("--ca-file", required=True, help="PEM file of the CA to trust")
    parser.add_argument("--payload-json", default=None, help="custom allocation payload as JSON")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds for register()")
    parser.add_argument("--debug", action="store_true", help="SDK debug logging on stderr")
    return parser.parse_args(argv)


def register(args: argparse.Namespace) -> dict[str, Any]:
    """Run the SDK's register() and return the result fields as a dict."""
    from azure.iot.device import (  # type: ignore[import-not-found, unused-ignore]
        ProvisioningDeviceClient,
    )

    with open(args.ca_file, encoding="ascii") as handle:
        ca_pem = handle.read()
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=args.host,
        registration_id=args.registration_id,
        id_scope=args.id_scope,
        symmetric_key=args.key,
        server_verification_cert=ca_pem,
    )
    if args.payload_json is not None:
        client.provisioning_payload = json.loads(args.payload_json)

    result = client.register()
    state = result.registration_state
    # RegistrationState.response_payload is a JSON *string* ("null" when absent); decode it.
    payload = json.loads(state.response_payload) if state is not None else None
    return {
        "status": result.status,
        "assignedHub": state.assigned_hub if state is not None else None,
        "deviceId": state.device_id if state is not None else None,
        "substatus": state.sub_status if state is not None else None,
        "payload": payload,
    }


def describe(exc: BaseException) -> dict[str, Any]:
    """The error report; the SDK wraps most failures, so name the underlying cause too."""
    report: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        report["cause"] = f"{type(cause).__name__}: {cause}"
    return report


def run(args: argparse.Namespace) -> tuple[int, dict[str, Any]]:
    """register() bounded by --timeout (the SDK has no overall deadline of its own)."""
    outcome: list[tuple[int, dict[str, Any]]] = []

    def target() -> None:
        try:
            outcome.append((0, register(args)))
        except BaseException as exc:
            outcome.append((2, describe(exc)))

    worker = threading.Thread(target=target, name="sdk-register", daemon=True)
    worker.start()
    worker.join(args.timeout)
    if not outcome:
        return 2, {"error": "Timeout", "message": f"register() did not finish in {args.timeout} s"}
    return outcome[0]


def main(argv: list[str]) -> int:
    """Parse arguments, register, print one JSON line."""
    args = parse_args(argv)
    if args.debug:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    code, report = run(args)
    sys.stdout.write(json.dumps(report) + "\n")
    return code


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # The SDK can leave non-daemon pipeline threads behind after a failure; do not wait for them.
    os._exit(exit_code)
