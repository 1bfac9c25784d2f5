"""The ``dps-mqtt`` command line (argparse).

Sub-commands: ``emulator`` (run the local DPS + IoT Hub), ``enrollment`` / ``group`` /
``registration`` / ``hub`` (manage DPS through its service API, printing JSON), ``device`` /
``twin`` / ``method`` / ``c2d`` / ``telemetry`` (the hub's devices), ``provision`` (register a
device with any DPS).
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


def _named_number(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {text!r}")
    try:
        number = float(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from exc
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number: {value!r}")
    return name, number


def _named_int(text: str) -> tuple[str, int]:
    name, number = _named_number(text)
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"expected NAME=WHOLE_NUMBER, got {text!r}")
    return name, int(number)


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from exc
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a non-negative number: {text!r}")
    return value


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
        hub_weights=dict(args.hub_weight or []),
        hub_latencies=dict(args.hub_latency or []),
        allocation_policy=args.allocation_policy,
        webhook_timeout=args.webhook_timeout,
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
        **_allocation(args),
    }


def _allocation(args: argparse.Namespace) -> dict[str, Any]:
    """The allocation options of ``create`` / ``update`` as ``allocation_fields`` keywords."""
    return {
        "allocation_policy": args.allocation_policy,
        "iot_hubs": args.iot_hub,
        "webhook_url": args.webhook_url,
        "webhook_api_version": args.webhook_api_version,
        "reprovision": args.reprovision,
    }


def _update_command(kind: str) -> _Command:
    """``enrollment update`` / ``group update``: change the allocation settings (and hub,
    initial twin) of an existing record, keeping its keys; read-modify-write with its etag."""

    def command(args: argparse.Namespace) -> int:
        from emulator.service_client import allocation_fields

        client = _client(args)
        if kind == "enrollment":
            body, put = client.get_enrollment(args.id), client.put_enrollment
        else:
            body, put = client.get_group(args.id), client.put_group
        changes = allocation_fields(**_allocation(args))
        if args.hub is not None:
            changes["iotHubHostName"] = args.hub
        if args.no_hub:
            body.pop("iotHubHostName", None)
        if args.initial_twin is not None:
            changes["initialTwin"] = args.initial_twin
        if not changes and not args.no_hub:
            raise CommandError("nothing to change: give at least one option")
        body.update(changes)
        etag = body.get("etag")
        _print_json(put(body, etag=etag if isinstance(etag, str) else None))
        return 0

    return command


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


def _set_status(kind: str, status: str) -> _Command:
    """A command that sets the provisioning status of the ``kind`` ("enrollment" or "group")
    ``args.id``: read it, change the status, write it back under the etag that was read."""

    def command(args: argparse.Namespace) -> int:
        client = _client(args)
        body = getattr(client, f"get_{kind}")(args.id)
        etag = body.get("etag")
        body["provisioningStatus"] = status
        put = getattr(client, f"put_{kind}")
        _print_json(put(body, etag=etag if isinstance(etag, str) else None))
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


def _set_device_status(status: str) -> _Command:
    def command(args: argparse.Namespace) -> int:
        _print_json(_client(args).set_device_status(args.id, status))
        return 0

    return command


def _cmd_hub_list(args: argparse.Namespace) -> int:
    _print_json(_client(args).list_linked_hubs())
    return 0


def _cmd_hub_add(args: argparse.Namespace) -> int:
    hub = _client(args).put_hub(args.name, allocation_weight=args.weight, latency_ms=args.latency)
    _print_json(hub)
    return 0


def _cmd_hub_remove(args: argparse.Namespace) -> int:
    _client(args).remove_hub(args.name)
    _print_json({"name": args.name, "removed": True})
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

    if args.key_file is not None and args.cert is None:
        raise CommandError("--key-file goes with --cert")
    if args.csr and args.out is None:
        raise CommandError(
            "--csr needs --out DIR: the new private key and the issued certificate go there"
        )
    if args.out is not None and not args.csr:
        raise CommandError("--out goes with --csr")
    if args.tpm is not None:
        from tpm import TpmDevice

        with TpmDevice(args.tpm) as device:
            device.ensure_keys()
            request = _new_csr(args, args.registration_id or device.registration_id())
            assignment = provision_https(
                provisioning_host=args.host,
                id_scope=args.id_scope,
                registration_id=args.registration_id,
                tpm=device,
                csr=None if request is None else request[1],
                payload=args.payload,
                port=args.port or 443,
                ca_file=args.ca_file,
                timeout=args.timeout,
            )
        return _print_assignment(args, assignment, request)
    registration_id = args.registration_id
    if not registration_id and args.cert is not None:
        registration_id = _certificate_cn(args.cert)
    if not registration_id:
        raise CommandError("--registration-id is required with --key or --group-key")
    request = _new_csr(args, registration_id)
    common = {
        "provisioning_host": args.host,
        "id_scope": args.id_scope,
        "registration_id": registration_id,
        "symmetric_key": args.key,
        "group_key": args.group_key,
        "client_cert": args.cert,
        "client_key": args.key_file,
        "csr": None if request is None else request[1],
        "payload": args.payload,
        "ca_file": args.ca_file,
        "timeout": args.timeout,
    }
    if args.https:
        assignment = provision_https(port=args.port or 443, **common)
    else:
        assignment = provision(port=args.port or 8883, **common)
    return _print_assignment(args, assignment, request)


def _certificate_cn(path: str) -> str:
    """The subject CN of the first certificate in a PEM file (X.509: the registration id)."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    try:
        cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    except ValueError as exc:
        raise CommandError(f"{path} does not start with a PEM certificate: {exc}") from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[-1].value if names else None
    if not isinstance(value, str) or not value:
        raise CommandError(f"the certificate in {path} has no CN: give --registration-id")
    return value


def _new_csr(args: argparse.Namespace, registration_id: str) -> tuple[bytes, bytes] | None:
    """With ``--csr``: a new EC P-384 key (PEM) and a CSR (DER) for ``registration_id``."""
    if not args.csr:
        return None
    from dps_proto import generate_key_and_csr

    return generate_key_and_csr(registration_id)


def _print_assignment(
    args: argparse.Namespace, assignment: Any, request: tuple[bytes, bytes] | None
) -> int:
    """Print the assignment; with ``--csr`` write the key and the issued chain to ``--out``."""
    out = assignment.to_json()
    if request is not None:
        from dps_proto import chain_pem

        chain = assignment.issued_certificate_chain
        if not chain:
            raise CommandError("DPS assigned the device but issued no certificate for its CSR")
        directory = Path(args.out)
        directory.mkdir(parents=True, exist_ok=True)
        stem = assignment.registration_id
        key_path, cert_path = directory / f"{stem}.key.pem", directory / f"{stem}.pem"
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(request[0])
        cert_path.write_bytes(chain_pem(chain))
        out["certificateFile"] = str(cert_path)
        out["keyFile"] = str(key_path)
    _print_json(out)
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
    _add_allocation_options(parser)


def _add_allocation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allocation-policy",
        choices=["hashed", "geoLatency", "static", "custom"],
        help="how DPS picks the hub (default: static with --hub, else the service's policy)",
    )
    parser.add_argument(
        "--iot-hub",
        metavar="H",
        action="append",
        help="linked hub this enrollment may use; repeatable (default: every linked hub)",
    )
    parser.add_argument(
        "--webhook-url",
        metavar="URL",
        help="custom allocation webhook (with --allocation-policy custom)",
    )
    parser.add_argument(
        "--webhook-api-version",
        metavar="V",
        default="2021-10-01",
        help="customAllocationDefinition.apiVersion (default: %(default)s)",
    )
    parser.add_argument(
        "--reprovision",
        choices=["migrate", "reset", "never"],
        help="on re-registration: move and keep the twin (migrate, Azure's default), move and"
        " reset it to the initial twin (reset), or stay on the current hub (never)",
    )


def _add_x509_create(sub: Any, api: argparse.ArgumentParser, *, individual: bool) -> None:
    if individual:
        p = sub.add_parser(
            "create-x509",
            parents=[api],
            help="create or replace an X.509 individual enrollment (the device's certificate)",
        )
        p.add_argument("id", metavar="ID", help="registration id (the certificate's CN)")
        p.add_argument("--cert", metavar="PEMFILE", required=True, help="device certificate")
        p.add_argument("--secondary-cert", metavar="PEMFILE", help="secondary device certificate")
        p.add_argument(
            "--device-id", metavar="D", help="hub device id (default: the registration id)"
        )
    else:
        p = sub.add_parser(
            "create-x509",
            parents=[api],
            help="create or replace an X.509 enrollment group (the CA that signs its devices)",
        )
        p.add_argument("id", metavar="ID", help="enrollment group id")
        p.add_argument(
            "--ca", metavar="PEMFILE", required=True, help="root or intermediate CA certificate"
        )
        p.add_argument("--secondary-ca", metavar="PEMFILE", help="secondary CA certificate")
    p.add_argument("--hub", metavar="H", help="IoT hub host name to assign devices to")
    p.add_argument(
        "--initial-twin",
        metavar="JSON",
        type=_json_object,
        help='initial twin, e.g. \'{"tags": {}, "properties": {"desired": {}}}\'',
    )
    p.add_argument("--disabled", action="store_true", help="create it disabled")
    _add_allocation_options(p)
    p.set_defaults(func=_cmd_create_x509)


def _read_pem(path: str) -> str:
    try:
        return Path(path).read_text(encoding="ascii")
    except UnicodeDecodeError as exc:
        raise CommandError(f"{path} is not a PEM file") from exc


def _cmd_create_x509(args: argparse.Namespace) -> int:
    """``enrollment create-x509`` / ``group create-x509``."""
    individual = hasattr(args, "cert")
    primary = _read_pem(args.cert if individual else args.ca)
    second_path = args.secondary_cert if individual else args.secondary_ca
    secondary = _read_pem(second_path) if second_path else None
    common = {
        "secondary_certificate": secondary,
        "iot_hub_host_name": args.hub,
        "initial_twin": args.initial_twin,
        "provisioning_status": "disabled" if args.disabled else "enabled",
        **_allocation(args),
    }
    client = _client(args)
    if individual:
        created = client.create_x509_enrollment(
            args.id, primary, device_id=args.device_id, **common
        )
    else:
        created = client.create_x509_group(args.id, primary, **common)
    _print_json(created)
    return 0


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
    p = sub.add_parser(
        "update", parents=[api], help=f"change the hub and allocation settings of one {noun}"
    )
    p.add_argument("id", metavar="ID", help=id_help)
    hub = p.add_mutually_exclusive_group()
    hub.add_argument("--hub", metavar="H", help="IoT hub host name (static allocation)")
    hub.add_argument("--no-hub", action="store_true", help="remove iotHubHostName")
    p.add_argument("--initial-twin", metavar="JSON", type=_json_object, help="initial twin")
    _add_allocation_options(p)
    p.set_defaults(func=_update_command("enrollment" if individual else "group"))


def _add_hub_commands(commands: Any, api: argparse.ArgumentParser) -> None:
    device = commands.add_parser("device", help="read the hub's device identities")
    device_sub = device.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = device_sub.add_parser("list", parents=[api], help="list every device")
    p.set_defaults(func=_cmd_device_list)
    p = device_sub.add_parser("show", parents=[api], help="show one device")
    p.add_argument("id", metavar="ID", help="device id")
    p.set_defaults(func=_cmd_device_show)
    p = device_sub.add_parser(
        "disable", parents=[api], help="disable a device: its connection is closed and refused"
    )
    p.add_argument("id", metavar="ID", help="device id")
    p.set_defaults(func=_set_device_status("disabled"))
    p = device_sub.add_parser("enable", parents=[api], help="enable a disabled device")
    p.add_argument("id", metavar="ID", help="device id")
    p.set_defaults(func=_set_device_status("enabled"))

    hub = commands.add_parser("hub", help="manage the IoT hubs linked to DPS")
    hub_sub = hub.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = hub_sub.add_parser("list", parents=[api], help="list linked hubs with weight and latency")
    p.set_defaults(func=_cmd_hub_list)
    p = hub_sub.add_parser(
        "add",
        parents=[api],
        help="link a hub (a name the emulator's certificate covers) or change its settings",
    )
    p.add_argument("name", metavar="NAME", help="hub host name, e.g. hub-a.azure-devices.net")
    p.add_argument(
        "--weight", metavar="W", type=_non_negative_int, help="allocationWeight 0..1000 (default 1)"
    )
    p.add_argument(
        "--latency",
        metavar="MS",
        type=_non_negative_float,
        help="latency in milliseconds, for geoLatency allocation",
    )
    p.set_defaults(func=_cmd_hub_add)
    p = hub_sub.add_parser("remove", parents=[api], help="unlink a hub (its devices disconnect)")
    p.add_argument("name", metavar="NAME", help="hub host name")
    p.set_defaults(func=_cmd_hub_remove)

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
        help="name the server certificate covers; repeatable (default: localhost);"
        " '*.DOMAIN' lets hubs of that domain be linked at run time",
    )
    emu.add_argument(
        "--hub-weight",
        metavar="NAME=W",
        type=_named_int,
        action="append",
        help="allocationWeight (0..1000) of a --hub; repeatable (default 1)",
    )
    emu.add_argument(
        "--hub-latency",
        metavar="NAME=MS",
        type=_named_number,
        action="append",
        help="latency in ms of a --hub, for geoLatency allocation; repeatable",
    )
    emu.add_argument(
        "--allocation-policy",
        choices=["hashed", "geoLatency"],
        default="hashed",
        help="service-level allocation policy for enrollments without one (default: %(default)s)",
    )
    emu.add_argument(
        "--webhook-timeout",
        metavar="S",
        type=_positive_float,
        default=5.0,
        help="seconds a custom allocation webhook may take (default: %(default)s)",
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
        enable=_set_status("enrollment", "enabled"),
        disable=_set_status("enrollment", "disabled"),
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
        enable=_set_status("group", "enabled"),
        disable=_set_status("group", "disabled"),
        individual=False,
    )
    _add_x509_create(enrollment_sub, api, individual=True)
    _add_x509_create(group_sub, api, individual=False)
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
    keys.add_argument(
        "--cert",
        metavar="F",
        help="X.509: the device certificate (PEM; then any intermediates); its CN is the"
        " registration id unless --registration-id says otherwise",
    )
    prov.add_argument(
        "--key-file", metavar="F", help="private key of --cert (PEM; default: in the --cert file)"
    )
    prov.add_argument(
        "--csr",
        action="store_true",
        help="have DPS issue a client certificate: make an EC P-384 key and a CSR, and write the"
        " key and the issued chain to --out (api-version 2025-07-01-preview)",
    )
    prov.add_argument(
        "--out", metavar="DIR", help="with --csr: where REGISTRATION_ID.key.pem and .pem go"
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
