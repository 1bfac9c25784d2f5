"""The ``dps-mqtt`` command line (argparse).

Sub-commands: ``emulator`` (run the local DPS + IoT Hub), ``enrollment`` / ``group`` /
``registration`` (manage DPS through its service API, printing JSON), ``device`` / ``twin`` /
``method`` / ``c2d`` / ``telemetry`` (the hub's devices), ``provision`` (register a device with any
DPS).
Heavy modules (paho, cryptography, the emulator) are imported inside the sub-command that needs
them, so ``dps-mqtt --help`` stays fast. Expected failures print one line on stderr and exit 1;
usage errors exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from . import __version__

__all__ = ["DEFAULT_API_URL", "build_parser", "main"]

#: Where the service API of a locally running ``dps-mqtt emulator`` listens by default.
DEFAULT_API_URL = "http://127.0.0.1:8480"
API_ENV = "DPS_MQTT_API"
PROG = "dps-mqtt"

_Command = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """An expected failure of a sub-command: printed as one line, exit code 1."""


# ---------------------------------------------------------------------------- helpers


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def _json_object(text: str) -> dict[str, Any]:
    value = _json_value(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from exc
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range: {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _property(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from exc
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = _non_negative_int(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _client(args: argparse.Namespace) -> Any:
    from emulator.service_client import ServiceClient

    url = args.api or os.environ.get(API_ENV) or DEFAULT_API_URL
    return ServiceClient(url)


# ---------------------------------------------------------------------------- emulator


def _cmd_emulator(args: argparse.Namespace) -> int:
    from emulator.config import EmulatorConfig
    from emulator.server import run_foreground

    config = EmulatorConfig(
        state_dir=None if args.in_memory else Path(args.state_dir),
        host=args.host,
        mqtt_port=args.port,
        api_port=args.api_port,
        https_port=args.https_port,
        id_scope=args.id_scope,
        hubs=tuple(args.hub) if args.hub else ("localhost",),
        hostnames=tuple(args.hostname) if args.hostname else ("localhost",),
        log_level="DEBUG" if args.verbose else args.log_level,
        route_to=args.route_to,
        telemetry_keep=args.telemetry_keep,
    )
    try:
        return run_foreground(config)
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------- enrollments, groups


def _symmetric_keys(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "primary_key": args.key,
        "secondary_key": args.secondary_key,
        "iot_hub_host_name": args.hub,
        "initial_twin": args.initial_twin,
        "provisioning_status": "disabled" if args.disabled else "enabled",
    }


def _cmd_enrollment_create(args: argparse.Namespace) -> int:
    client = _client(args)
    created = client.create_enrollment(args.id, device_id=args.device_id, **_symmetric_keys(args))
    _print_json(created)
    return 0


def _cmd_enrollment_list(args: argparse.Namespace) -> int:
    _print_json(_client(args).list_enrollments())
    return 0


def _cmd_enrollment_show(args: argparse.Namespace) -> int:
    _print_json(_client(args).get_enrollment(args.id))
    return 0


def _cmd_enrollment_delete(args: argparse.Namespace) -> int:
    _client(args).delete_enrollment(args.id)
    _print_json({"registrationId": args.id, "deleted": True})
    return 0


def _set_enrollment_status(status: str) -> _Command:
    def command(args: argparse.Namespace) -> int:
        client = _client(args)
        body = client.get_enrollment(args.id)
        etag = body.get("etag")
        body["provisioningStatus"] = status
        _print_json(client.put_enrollment(body, etag=etag if isinstance(etag, str) else None))
        return 0

    return command


def _cmd_group_create(args: argparse.Namespace) -> int:
    _print_json(_client(args).create_group(args.id, **_symmetric_keys(args)))
    return 0


def _cmd_group_list(args: argparse.Namespace) -> int:
    _print_json(_client(args).list_groups())
    return 0


def _cmd_group_show(args: argparse.Namespace) -> int:
    _print_json(_client(args).get_group(args.id))
    return 0


def _cmd_group_delete(args: argparse.Namespace) -> int:
    _client(args).delete_group(args.id)
    _print_json({"enrollmentGroupId": args.id, "deleted": True})
    return 0


def _set_group_status(status: str) -> _Command:
    def command(args: argparse.Namespace) -> int:
        client = _client(args)
        body = client.get_group(args.id)
        etag = body.get("etag")
        body["provisioningStatus"] = status
        _print_json(client.put_group(body, etag=etag if isinstance(etag, str) else None))
        return 0

    return command


def _cmd_group_derive_key(args: argparse.Namespace) -> int:
    from dps_proto import derive_device_key

    print(derive_device_key(args.group_key, args.registration_id))
    return 0


# ---------------------------------------------------------------------------- registrations


def _cmd_registration_list(args: argparse.Namespace) -> int:
    _print_json(_client(args).list_registrations())
    return 0


def _cmd_registration_show(args: argparse.Namespace) -> int:
    _print_json(_client(args).get_registration(args.id))
    return 0


def _cmd_registration_delete(args: argparse.Namespace) -> int:
    _client(args).delete_registration(args.id)
    _print_json({"registrationId": args.id, "deleted": True})
    return 0


# ---------------------------------------------------------------------------- hub

#: Seconds between two polls of ``telemetry tail --follow``.
FOLLOW_INTERVAL = 0.5


def _cmd_device_list(args: argparse.Namespace) -> int:
    _print_json(_client(args).list_devices())
    return 0


def _cmd_device_show(args: argparse.Namespace) -> int:
    _print_json(_client(args).get_device(args.id))
    return 0


def _cmd_twin_show(args: argparse.Namespace) -> int:
    _print_json(_client(args).get_twin(args.id))
    return 0


def _cmd_twin_update(args: argparse.Namespace) -> int:
    if args.desired is None and args.tags is None:
        raise CommandError("give --desired and/or --tags")
    _print_json(_client(args).update_twin(args.id, desired=args.desired, tags=args.tags))
    return 0


def _cmd_method_invoke(args: argparse.Namespace) -> int:
    result = _client(args).invoke_method(args.id, args.name, args.payload, timeout=args.timeout)
    _print_json(result)
    return 0


def _cmd_c2d_send(args: argparse.Namespace) -> int:
    properties = dict(args.property or [])
    _client(args).send_c2d(args.id, args.text, properties=properties or None)
    _print_json({"deviceId": args.id, "queued": True})
    return 0


def _cmd_telemetry_tail(args: argparse.Namespace) -> int:
    """Print stored messages as JSON lines; with --follow, poll until Ctrl-C."""
    client = _client(args)
    since = args.since
    while True:
        for message in client.telemetry(args.id, since):
            print(json.dumps(message), flush=True)
            seq = message.get("seq")
            if isinstance(seq, int) and seq > since:
                since = seq
        if not args.follow:
            return 0
        time.sleep(FOLLOW_INTERVAL)


# ---------------------------------------------------------------------------- provision


def _cmd_provision(args: argparse.Namespace) -> int:
    from dps_proto import provision, provision_https

    if args.tpm is not None:
        from tpm import TpmDevice

        with TpmDevice(args.tpm) as device:
            device.ensure_keys()
            assignment = provision_https(
                provisioning_host=args.host,
                id_scope=args.id_scope,
                registration_id=args.registration_id,
                tpm=device,
                payload=args.payload,
                port=args.port or 443,
                ca_file=args.ca_file,
                timeout=args.timeout,
            )
        _print_json(assignment.to_json())
        return 0
    if not args.registration_id:
        raise CommandError("--registration-id is required with --key or --group-key")
    common = {
        "provisioning_host": args.host,
        "id_scope": args.id_scope,
        "registration_id": args.registration_id,
        "symmetric_key": args.key,
        "group_key": args.group_key,
        "payload": args.payload,
        "ca_file": args.ca_file,
        "timeout": args.timeout,
    }
    if args.https:
        assignment = provision_https(port=args.port or 443, **common)
    else:
        assignment = provision(port=args.port or 8883, **common)
    _print_json(assignment.to_json())
    return 0


def _cmd_tpm_info(args: argparse.Namespace) -> int:
    """What an enrollment needs: registration id and base64 EK (and SRK), as Azure's SDKs print."""
    import base64

    from tpm import TpmDevice

    with TpmDevice(args.tcti) as device:
        device.ensure_keys()
        _print_json(
            {
                "registrationId": device.registration_id(),
                "endorsementKey": base64.b64encode(device.endorsement_key()).decode("ascii"),
                "storageRootKey": base64.b64encode(device.storage_root_key()).decode("ascii"),
            }
        )
    return 0


# ---------------------------------------------------------------------------- parser


def _api_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--api",
        metavar="URL",
        default=None,
        help=f"service API of the emulator (default: ${API_ENV} or {DEFAULT_API_URL})",
    )
    return parent


def _add_create_options(parser: argparse.ArgumentParser, *, individual: bool) -> None:
    parser.add_argument("--key", metavar="K", help="primary key, base64 (default: generated)")
    parser.add_argument(
        "--secondary-key", metavar="K", help="secondary key, base64 (default: generated)"
    )
    if individual:
        parser.add_argument(
            "--device-id", metavar="D", help="hub device id (default: the registration id)"
        )
    parser.add_argument("--hub", metavar="H", help="IoT hub host name to assign devices to")
    parser.add_argument(
        "--initial-twin",
        metavar="JSON",
        type=_json_object,
        help='initial twin, e.g. \'{"tags": {}, "properties": {"desired": {}}}\'',
    )
    parser.add_argument("--disabled", action="store_true", help="create it disabled")


def _add_crud(
    sub: Any,
    api: argparse.ArgumentParser,
    *,
    noun: str,
    id_help: str,
    create: _Command,
    list_: _Command,
    show: _Command,
    delete: _Command,
    enable: _Command,
    disable: _Command,
    individual: bool,
) -> None:
    p = sub.add_parser("create", parents=[api], help=f"create or replace a symmetric-key {noun}")
    p.add_argument("id", metavar="ID", help=id_help)
    _add_create_options(p, individual=individual)
    p.set_defaults(func=create)
    p = sub.add_parser("list", parents=[api], help=f"list every {noun}")
    p.set_defaults(func=list_)
    for verb, func, text in (
        ("show", show, f"show one {noun}"),
        ("delete", delete, f"delete one {noun}"),
        ("enable", enable, f"enable one {noun}"),
        ("disable", disable, f"disable one {noun} (its devices are refused)"),
    ):
        p = sub.add_parser(verb, parents=[api], help=text)
        p.add_argument("id", metavar="ID", help=id_help)
        p.set_defaults(func=func)


def _add_hub_commands(commands: Any, api: argparse.ArgumentParser) -> None:
    device = commands.add_parser("device", help="read the hub's device identities")
    device_sub = device.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = device_sub.add_parser("list", parents=[api], help="list every device")
    p.set_defaults(func=_cmd_device_list)
    p = device_sub.add_parser("show", parents=[api], help="show one device")
    p.add_argument("id", metavar="ID", help="device id")
    p.set_defaults(func=_cmd_device_show)

    twin = commands.add_parser("twin", help="read and update device twins")
    twin_sub = twin.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = twin_sub.add_parser("show", parents=[api], help="show a device's twin")
    p.add_argument("id", metavar="ID", help="device id")
    p.set_defaults(func=_cmd_twin_show)
    p = twin_sub.add_parser(
        "update", parents=[api], help="merge desired properties and/or tags into a twin"
    )
    p.add_argument("id", metavar="ID", help="device id")
    p.add_argument("--desired", metavar="JSON", type=_json_object, help="desired-properties patch")
    p.add_argument("--tags", metavar="JSON", type=_json_object, help="tags patch")
    p.set_defaults(func=_cmd_twin_update)

    method = commands.add_parser("method", help="call direct methods")
    method_sub = method.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = method_sub.add_parser("invoke", parents=[api], help="call a method on a device")
    p.add_argument("id", metavar="ID", help="device id")
    p.add_argument("name", metavar="NAME", help="method name")
    p.add_argument("--payload", metavar="JSON", type=_json_value, help="request payload")
    p.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_float,
        help="seconds to wait for the device's answer (hub default: 30)",
    )
    p.set_defaults(func=_cmd_method_invoke)

    c2d = commands.add_parser("c2d", help="send cloud-to-device messages")
    c2d_sub = c2d.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = c2d_sub.add_parser("send", parents=[api], help="queue a message for a device")
    p.add_argument("id", metavar="ID", help="device id")
    p.add_argument("text", metavar="TEXT", help="message body (sent as UTF-8)")
    p.add_argument(
        "--property",
        metavar="K=V",
        type=_property,
        action="append",
        help="application property; repeatable",
    )
    p.set_defaults(func=_cmd_c2d_send)

    telemetry = commands.add_parser("telemetry", help="read stored device telemetry")
    telemetry_sub = telemetry.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = telemetry_sub.add_parser(
        "tail", parents=[api], help="print a device's stored messages as JSON lines"
    )
    p.add_argument("id", metavar="ID", help="device id")
    p.add_argument(
        "--since", metavar="SEQ", type=_non_negative_int, default=0, help="start after SEQ"
    )
    p.add_argument(
        "--follow", action="store_true", help="keep polling for new messages until Ctrl-C"
    )
    p.set_defaults(func=_cmd_telemetry_tail)


def build_parser() -> argparse.ArgumentParser:
    """The complete ``dps-mqtt`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Azure DPS / IoT Hub device stack over MQTT, and a local emulator of both.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    api = _api_parent()

    emu = commands.add_parser(
        "emulator", help="run the local DPS + IoT Hub emulator in the foreground"
    )
    emu.add_argument(
        "--state-dir",
        metavar="DIR",
        default="./.dps-mqtt-emulator",
        help="where the database and certificates live (default: %(default)s)",
    )
    emu.add_argument(
        "--in-memory", action="store_true", help="keep nothing: in-memory store, temporary certs"
    )
    emu.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    emu.add_argument(
        "--port", type=_port, default=8883, help="MQTT (TLS) port; 0 = any (default: %(default)s)"
    )
    emu.add_argument(
        "--api-port",
        type=_port,
        default=8480,
        help="service API port; 0 = any (default: %(default)s)",
    )
    emu.add_argument(
        "--https-port",
        type=_port,
        default=8443,
        help="DPS HTTPS runtime API port (TPM devices); 0 = any (default: %(default)s)",
    )
    emu.add_argument(
        "--id-scope", default="0ne00000000", help="DPS id scope (default: %(default)s)"
    )
    emu.add_argument(
        "--hub",
        metavar="NAME",
        action="append",
        help="linked IoT hub host name; repeatable (default: localhost)",
    )
    emu.add_argument(
        "--hostname",
        metavar="NAME",
        action="append",
        help="name the server certificate covers; repeatable (default: localhost)",
    )
    emu.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        type=str.upper,
        help="logging level (default: %(default)s)",
    )
    emu.add_argument(
        "--route-to",
        metavar="URL",
        help="republish telemetry to this MQTT broker, e.g. mqtt://127.0.0.1:1883",
    )
    emu.add_argument(
        "--telemetry-keep",
        metavar="N",
        type=_positive_int,
        default=1000,
        help="telemetry messages kept per device (default: %(default)s)",
    )
    emu.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    emu.set_defaults(func=_cmd_emulator)

    enrollment = commands.add_parser("enrollment", help="manage individual enrollments")
    enrollment_sub = enrollment.add_subparsers(dest="verb", metavar="VERB", required=True)
    _add_crud(
        enrollment_sub,
        api,
        noun="individual enrollment",
        id_help="registration id",
        create=_cmd_enrollment_create,
        list_=_cmd_enrollment_list,
        show=_cmd_enrollment_show,
        delete=_cmd_enrollment_delete,
        enable=_set_enrollment_status("enabled"),
        disable=_set_enrollment_status("disabled"),
        individual=True,
    )

    group = commands.add_parser("group", help="manage enrollment groups")
    group_sub = group.add_subparsers(dest="verb", metavar="VERB", required=True)
    _add_crud(
        group_sub,
        api,
        noun="enrollment group",
        id_help="enrollment group id",
        create=_cmd_group_create,
        list_=_cmd_group_list,
        show=_cmd_group_show,
        delete=_cmd_group_delete,
        enable=_set_group_status("enabled"),
        disable=_set_group_status("disabled"),
        individual=False,
    )
    derive = group_sub.add_parser(
        "derive-key", help="print a device's key derived from its group key"
    )
    derive.add_argument("group_key", metavar="GROUP_KEY", help="the group's key, base64")
    derive.add_argument("registration_id", metavar="REGISTRATION_ID")
    derive.set_defaults(func=_cmd_group_derive_key)

    registration = commands.add_parser("registration", help="read device registration records")
    registration_sub = registration.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = registration_sub.add_parser("list", parents=[api], help="list every registration")
    p.set_defaults(func=_cmd_registration_list)
    p = registration_sub.add_parser("show", parents=[api], help="show one registration")
    p.add_argument("id", metavar="ID", help="registration id")
    p.set_defaults(func=_cmd_registration_show)
    p = registration_sub.add_parser("delete", parents=[api], help="forget one registration")
    p.add_argument("id", metavar="ID", help="registration id")
    p.set_defaults(func=_cmd_registration_delete)

    _add_hub_commands(commands, api)

    tpm_parser = commands.add_parser("tpm", help="TPM attestation helpers")
    tpm_sub = tpm_parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    info = tpm_sub.add_parser(
        "info", help="create EK/SRK if absent; print registration id and base64 EK and SRK"
    )
    info.add_argument(
        "--tcti",
        required=True,
        help="how to reach the TPM: device:/dev/tpmrm0, tabrmd, swtpm:host=127.0.0.1,port=2321",
    )
    info.set_defaults(func=_cmd_tpm_info)

    prov = commands.add_parser("provision", help="register a device with DPS (MQTT or HTTPS)")
    prov.add_argument(
        "--host", required=True, help="DPS host, e.g. global.azure-devices-provisioning.net"
    )
    prov.add_argument("--id-scope", required=True, help="DPS id scope")
    prov.add_argument(
        "--registration-id", help="the device's registration id (TPM: derived from the EK)"
    )
    keys = prov.add_mutually_exclusive_group(required=True)
    keys.add_argument("--key", metavar="K", help="individual enrollment key, base64")
    keys.add_argument("--group-key", metavar="K", help="enrollment group key, base64")
    keys.add_argument(
        "--tpm", metavar="TCTI", help="attest with this TPM (always over HTTPS, as Azure requires)"
    )
    prov.add_argument("--https", action="store_true", help="use DPS's HTTPS API instead of MQTT")
    prov.add_argument(
        "--port", type=_port, default=None, help="port (default: 8883 for MQTT, 443 for HTTPS)"
    )
    prov.add_argument("--ca-file", metavar="F", help="CA certificate(s) to trust (PEM)")
    prov.add_argument(
        "--payload", metavar="JSON", type=_json_value, help="custom allocation payload"
    )
    prov.add_argument(
        "--timeout",
        type=_positive_float,
        default=60.0,
        help="give up after this many seconds (default: %(default)s)",
    )
    prov.set_defaults(func=_cmd_provision)
    return parser


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run ``dps-mqtt`` with ``argv`` (default: the process arguments); return the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func: _Command | None = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        message = _expected_failure(exc)
        if message is None:
            raise
        return _error(message)


def _expected_failure(exc: Exception) -> str | None:
    """The one-line message of an expected failure, or ``None`` for a bug (keep the traceback)."""
    from dps_proto.errors import DpsError
    from emulator.errors import EmulatorError
    from hub_proto.errors import HubError
    from tpm.errors import TpmError

    if isinstance(exc, (DpsError, EmulatorError, HubError, TpmError, CommandError)):
        return str(exc)
    if isinstance(exc, OSError):
        return str(exc) or type(exc).__name__
    return None
