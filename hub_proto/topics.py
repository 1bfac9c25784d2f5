"""MQTT topics and CONNECT username/client id of the IoT Hub device protocol, both directions.

Device-side builders (what a device publishes or subscribes to) come with server-side parsers
(for the emulator), and server-side builders (what the hub sends) with device-side parsers.
Standard library only.

Encoding rules (as Azure's hub applies them): device ids, module ids, the host name and method
names are never percent-encoded; ``$rid``, ``$version`` and every property-bag key and value are.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Literal, Union

from .errors import HubParseError
from .message import TO_KEY, Message, message_from_properties, message_properties
from .properties import decode_properties, encode_component, encode_properties

DEFAULT_API_VERSION = "2021-04-12"
TWIN_RESPONSE_SUBSCRIBE_TOPIC = "$iothub/twin/res/#"
DESIRED_PATCH_SUBSCRIBE_TOPIC = "$iothub/twin/PATCH/properties/desired/#"
METHODS_SUBSCRIBE_TOPIC = "$iothub/methods/POST/#"

TWIN_RESPONSE_PREFIX = "$iothub/twin/res/"
TWIN_GET_PREFIX = "$iothub/twin/GET/"
TWIN_REPORTED_PREFIX = "$iothub/twin/PATCH/properties/reported/"
DESIRED_PATCH_PREFIX = "$iothub/twin/PATCH/properties/desired/"
METHOD_REQUEST_PREFIX = "$iothub/methods/POST/"
METHOD_RESPONSE_PREFIX = "$iothub/methods/res/"

#: Characters Azure allows in device and module ids (case-sensitive, at most 128 of them).
ID_CHARACTERS = frozenset(string.ascii_letters + string.digits + "-:.+%_#*?!(),=@;$'")
MAX_ID_LENGTH = 128
#: MQTT caps a topic name at 65535 bytes of UTF-8.
MAX_TOPIC_BYTES = 65535
#: Twin statuses are HTTP-like: at most 5 digits, as in the DPS parser.
_MAX_TWIN_STATUS = 99999
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_MAX_VERSION = 2**63 - 1


# -- shared checks ------------------------------------------------------------------------------


def check_id(value: str, what: str = "device id") -> str:
    """Return ``value`` if it is a valid Azure device or module id; :class:`HubParseError` else."""
    if not isinstance(value, str) or not value:
        raise HubParseError(f"a {what} must be a non-empty string")
    if len(value) > MAX_ID_LENGTH:
        raise HubParseError(f"a {what} has at most {MAX_ID_LENGTH} characters")
    if not ID_CHARACTERS.issuperset(value):
        raise HubParseError(f"{what} {value[:40]!r} has characters Azure does not allow")
    return value


def _check_topic(topic: str) -> str:
    if len(topic.encode("utf-8", "surrogatepass")) > MAX_TOPIC_BYTES:
        raise HubParseError("topic longer than MQTT's 65535 bytes")
    return topic


def _check_rid(rid: str) -> str:
    if not isinstance(rid, str) or not rid:
        raise HubParseError("a $rid must be a non-empty string")
    return rid


def _need_str(topic: object) -> str:
    if not isinstance(topic, str):
        raise HubParseError("a topic must be a string")
    return topic


def _parse_int(text: str, what: str, *, signed: bool, max_digits: int) -> int:
    digits = text[1:] if signed and text.startswith("-") else text
    if not digits or len(digits) > max_digits or not digits.isascii() or not digits.isdigit():
        raise HubParseError(f"{what} is not a number: {text[:24]!r}")
    return int(text)


def _parse_version(value: str | None) -> int:
    if value is None:
        raise HubParseError("$version has no value")
    version = _parse_int(value, "$version", signed=False, max_digits=19)
    if version > _MAX_VERSION:
        raise HubParseError("$version out of range")
    return version


def _required_rid(properties: dict[str, str | None]) -> str:
    rid = properties.get("$rid")
    if not rid:
        raise HubParseError("topic has no $rid")
    return rid


def _check_version(version: int) -> int:
    if (
        isinstance(version, bool)
        or not isinstance(version, int)
        or not 0 <= version <= _MAX_VERSION
    ):
        raise HubParseError("a $version must be a non-negative 64-bit integer")
    return version


# -- CONNECT client id and username -------------------------------------------------------------


def client_id(device_id: str, module_id: str | None = None) -> str:
    """MQTT client id: ``{deviceId}`` or ``{deviceId}/{moduleId}``."""
    check_id(device_id)
    if module_id is None:
        return device_id
    return f"{device_id}/{check_id(module_id, 'module id')}"


def parse_client_id(text: str) -> tuple[str, str | None]:
    """Split a client id into (device id, module id or None)."""
    text = _need_str(text)
    device_id, sep, module_id = text.partition("/")
    check_id(device_id)
    return device_id, (check_id(module_id, "module id") if sep else None)


@dataclass(frozen=True)
class Username:
    """The parts of a hub CONNECT username; ``properties`` holds every decoded query key."""

    host: str
    device_id: str
    module_id: str | None
    api_version: str
    client_type: str | None = None
    model_id: str | None = None
    properties: dict[str, str | None] = field(default_factory=dict)


def _check_host(host: str) -> str:
    if not isinstance(host, str) or not host or any(c in host for c in "/?# \t\r\n"):
        raise HubParseError("a hub host name must be non-empty, without '/', '?', '#' or spaces")
    return host


def username(
    host: str,
    device_id: str,
    module_id: str | None = None,
    *,
    api_version: str = DEFAULT_API_VERSION,
    client_type: str | None = None,
    model_id: str | None = None,
) -> str:
    """``{host}/{deviceId}[/{moduleId}]/?api-version=..[&DeviceClientType=..][&model-id=..]``."""
    path = f"{_check_host(host)}/{client_id(device_id, module_id)}"
    props: dict[str, str | None] = {"api-version": api_version}
    if client_type:
        props["DeviceClientType"] = client_type
    if model_id:
        props["model-id"] = model_id
    return f"{path}/?{encode_properties(props)}"


def parse_username(text: str) -> Username:
    """Parse a hub CONNECT username (the emulator's side). The query is the last ``/`` segment:
    three segments for a device, four for a module."""
    parts = _need_str(text).split("/")
    if len(parts) == 3:
        host, device_id, query = parts
        module_id: str | None = None
    elif len(parts) == 4:
        host, device_id, module_id, query = parts
    else:
        raise HubParseError(
            "a hub username looks like {host}/{deviceId}[/{moduleId}]/?api-version=.."
        )
    if not host or any(c in host for c in "?# \t\r\n"):
        raise HubParseError("the username has no valid host name")
    check_id(device_id)
    if module_id is not None:
        check_id(module_id, "module id")
    properties = decode_properties(query)
    api_version = properties.get("api-version")
    if not api_version:
        raise HubParseError("the hub username has no api-version")
    return Username(
        host=host,
        device_id=device_id,
        module_id=module_id,
        api_version=api_version,
        client_type=properties.get("DeviceClientType"),
        model_id=properties.get("model-id"),
        properties=properties,
    )


# -- telemetry (device -> hub) ------------------------------------------------------------------


def _device_path(device_id: str, module_id: str | None) -> str:
    base = f"devices/{check_id(device_id)}"
    return f"{base}/modules/{check_id(module_id, 'module id')}" if module_id is not None else base


def telemetry_topic_prefix(device_id: str, module_id: str | None = None) -> str:
    """``devices/{d}[/modules/{m}]/messages/events/``: the topic of a message without
    properties (an empty bag), checked once."""
    return _check_topic(f"{_device_path(device_id, module_id)}/messages/events/")


def telemetry_topic(
    device_id: str, message: Message | None = None, module_id: str | None = None
) -> str:
    """``devices/{d}[/modules/{m}]/messages/events/{bag}`` with the message's properties."""
    bag = encode_properties(message_properties(message)) if message is not None else ""
    return _check_topic(f"{_device_path(device_id, module_id)}/messages/events/{bag}")


@dataclass(frozen=True)
class TelemetryTopic:
    """A telemetry topic as the hub sees it; ``message`` has the properties but no payload."""

    device_id: str
    module_id: str | None
    message: Message


def parse_telemetry_topic(topic: str) -> TelemetryTopic:
    """Parse ``devices/{d}[/modules/{m}]/messages/events[/{bag}]`` (the emulator's side)."""
    parts = _need_str(topic).split("/", 4)
    if len(parts) >= 4 and parts[0] == "devices" and parts[2:4] == ["messages", "events"]:
        device_id, module_id, bag = parts[1], None, (parts[4] if len(parts) == 5 else "")
    else:
        parts = topic.split("/", 6)
        if not (
            len(parts) >= 6
            and parts[0] == "devices"
            and parts[2] == "modules"
            and parts[4:6] == ["messages", "events"]
        ):
            raise HubParseError(f"not a telemetry topic: {topic[:80]!r}")
        device_id, module_id, bag = parts[1], parts[3], (parts[6] if len(parts) == 7 else "")
        check_id(module_id, "module id")
    check_id(device_id)
    return TelemetryTopic(device_id, module_id, message_from_properties(decode_properties(bag)))


# -- cloud-to-device (hub -> device) ------------------------------------------------------------


def c2d_subscribe_topic(device_id: str) -> str:
    """The filter a device subscribes to for C2D messages."""
    return f"devices/{check_id(device_id)}/messages/devicebound/#"


def c2d_topic(device_id: str, message: Message) -> str:
    """``devices/{id}/messages/devicebound/{bag}``: system properties, ``$.to``, then application
    properties (the hub's side)."""
    check_id(device_id)
    props: dict[str, str | None] = dict(message.system_properties())
    props[TO_KEY] = f"/devices/{device_id}/messages/deviceBound"
    for key, value in message_properties(message).items():
        props.setdefault(key, value)
    return _check_topic(f"devices/{device_id}/messages/devicebound/{encode_properties(props)}")


@dataclass(frozen=True)
class C2DTopic:
    """A C2D delivery topic as the device sees it; ``message`` has no payload yet. ``$.to`` is
    dropped."""

    device_id: str
    message: Message


def parse_c2d_topic(topic: str) -> C2DTopic:
    """Parse ``devices/{id}/messages/devicebound[/{bag}]`` (bag with or without a leading ``?``)."""
    parts = _need_str(topic).split("/", 4)
    if len(parts) < 4 or parts[0] != "devices" or parts[2:4] != ["messages", "devicebound"]:
        raise HubParseError(f"not a C2D topic: {topic[:80]!r}")
    device_id = check_id(parts[1])
    properties = decode_properties(parts[4] if len(parts) == 5 else "")
    message = message_from_properties(properties, ignore=frozenset([TO_KEY]))
    return C2DTopic(device_id, message)


# -- twin ---------------------------------------------------------------------------------------


def twin_get_topic(rid: str) -> str:
    """Where a device asks for its twin (empty payload)."""
    return f"{TWIN_GET_PREFIX}?$rid={encode_component(_check_rid(rid))}"


def twin_patch_reported_topic(rid: str) -> str:
    """Where a device sends a reported-properties patch (JSON payload)."""
    return f"{TWIN_REPORTED_PREFIX}?$rid={encode_component(_check_rid(rid))}"


def twin_response_topic(status: int, rid: str, version: int | None = None) -> str:
    """``$iothub/twin/res/{status}/?$rid={rid}[&$version={v}]`` (the hub's side)."""
    if (
        isinstance(status, bool)
        or not isinstance(status, int)
        or not 0 <= status <= _MAX_TWIN_STATUS
    ):
        raise HubParseError("a twin status must be an integer in 0..99999")
    topic = f"{TWIN_RESPONSE_PREFIX}{status}/?$rid={encode_component(_check_rid(rid))}"
    if version is not None:
        topic += f"&$version={_check_version(version)}"
    return _check_topic(topic)


def desired_patch_topic(version: int) -> str:
    """``$iothub/twin/PATCH/properties/desired/?$version={v}`` (the hub's side)."""
    return f"{DESIRED_PATCH_PREFIX}?$version={_check_version(version)}"


@dataclass(frozen=True)
class TwinResponseTopic:
    """A twin response: status, the request's ``$rid`` and, for a reported patch, the new
    reported ``$version``."""

    status: int
    rid: str
    version: int | None
    properties: dict[str, str | None] = field(default_factory=dict)


def parse_twin_response_topic(topic: str) -> TwinResponseTopic:
    """Parse ``$iothub/twin/res/{status}/?$rid=..[&$version=..]`` (keys in any order)."""
    if not _need_str(topic).startswith(TWIN_RESPONSE_PREFIX):
        raise HubParseError(f"not a twin response topic: {topic[:80]!r}")
    status_text, sep, query = topic[len(TWIN_RESPONSE_PREFIX) :].partition("/")
    if not sep:
        raise HubParseError("twin response topic has no '/' after the status")
    status = _parse_int(status_text, "twin status", signed=False, max_digits=5)
    properties = decode_properties(query)
    rid = _required_rid(properties)
    version = _parse_version(properties["$version"]) if "$version" in properties else None
    return TwinResponseTopic(status, rid, version, properties)


@dataclass(frozen=True)
class DesiredPatchTopic:
    """A desired-properties notification and its ``$version``."""

    version: int
    properties: dict[str, str | None] = field(default_factory=dict)


def parse_desired_patch_topic(topic: str) -> DesiredPatchTopic:
    """Parse ``$iothub/twin/PATCH/properties/desired/?$version=..``; the version is required."""
    if not _need_str(topic).startswith(DESIRED_PATCH_PREFIX):
        raise HubParseError(f"not a desired-properties topic: {topic[:80]!r}")
    properties = decode_properties(topic[len(DESIRED_PATCH_PREFIX) :])
    if "$version" not in properties:
        raise HubParseError("desired-properties topic has no $version")
    return DesiredPatchTopic(_parse_version(properties["$version"]), properties)


@dataclass(frozen=True)
class TwinRequestTopic:
    """A device's twin request as the hub sees it."""

    kind: Literal["get", "patch_reported"]
    rid: str
    properties: dict[str, str | None] = field(default_factory=dict)


def parse_twin_request_topic(topic: str) -> TwinRequestTopic:
    """Parse a twin GET or reported-PATCH topic (the emulator's side)."""
    kind: Literal["get", "patch_reported"]
    if _need_str(topic).startswith(TWIN_GET_PREFIX):
        kind, query = "get", topic[len(TWIN_GET_PREFIX) :]
    elif topic.startswith(TWIN_REPORTED_PREFIX):
        kind, query = "patch_reported", topic[len(TWIN_REPORTED_PREFIX) :]
    else:
        raise HubParseError(f"not a twin request topic: {topic[:80]!r}")
    properties = decode_properties(query)
    return TwinRequestTopic(kind, _required_rid(properties), properties)


# -- direct methods -----------------------------------------------------------------------------


def _check_method_name(name: str) -> str:
    if not isinstance(name, str) or not name or any(c in name for c in "/#+\x00"):
        raise HubParseError("a method name must be non-empty, without '/', '#', '+' or NUL")
    return name


def _check_method_status(status: int) -> int:
    if (
        isinstance(status, bool)
        or not isinstance(status, int)
        or not _INT32_MIN <= status <= _INT32_MAX
    ):
        raise HubParseError("a method status must be a 32-bit integer")
    return status


def method_request_topic(name: str, rid: str) -> str:
    """``$iothub/methods/POST/{name}/?$rid={rid}`` (the hub's side; the name is not encoded)."""
    return _check_topic(
        f"{METHOD_REQUEST_PREFIX}{_check_method_name(name)}/?$rid={encode_component(_check_rid(rid))}"
    )


def method_response_topic(status: int, rid: str) -> str:
    """``$iothub/methods/res/{status}/?$rid={rid}``: where a device answers a method call."""
    status = _check_method_status(status)
    return f"{METHOD_RESPONSE_PREFIX}{status}/?$rid={encode_component(_check_rid(rid))}"


@dataclass(frozen=True)
class MethodRequestTopic:
    """A direct-method call as the device sees it."""

    name: str
    rid: str
    properties: dict[str, str | None] = field(default_factory=dict)


def parse_method_request_topic(topic: str) -> MethodRequestTopic:
    """Parse ``$iothub/methods/POST/{name}/?$rid=..``."""
    if not _need_str(topic).startswith(METHOD_REQUEST_PREFIX):
        raise HubParseError(f"not a method request topic: {topic[:80]!r}")
    name, sep, query = topic[len(METHOD_REQUEST_PREFIX) :].partition("/")
    if not sep or not name:
        raise HubParseError("method request topic has no method name")
    _check_method_name(name)
    properties = decode_properties(query)
    return MethodRequestTopic(name, _required_rid(properties), properties)


@dataclass(frozen=True)
class MethodResponseTopic:
    """A device's method response as the hub sees it."""

    status: int
    rid: str
    properties: dict[str, str | None] = field(default_factory=dict)


def parse_method_response_topic(topic: str) -> MethodResponseTopic:
    """Parse ``$iothub/methods/res/{status}/?$rid=..`` (the emulator's side)."""
    if not _need_str(topic).startswith(METHOD_RESPONSE_PREFIX):
        raise HubParseError(f"not a method response topic: {topic[:80]!r}")
    status_text, sep, query = topic[len(METHOD_RESPONSE_PREFIX) :].partition("/")
    if not sep:
        raise HubParseError("method response topic has no '/' after the status")
    status = _parse_int(status_text, "method status", signed=True, max_digits=10)
    _check_method_status(status)
    properties = decode_properties(query)
    return MethodResponseTopic(status, _required_rid(properties), properties)


# -- dispatch -----------------------------------------------------------------------------------

#: Any topic a device may receive from the hub.
ReceivedTopic = Union[TwinResponseTopic, DesiredPatchTopic, MethodRequestTopic, C2DTopic]
#: Any topic a device may publish to the hub.
PublishedTopic = Union[TelemetryTopic, TwinRequestTopic, MethodResponseTopic]


def parse_received_topic(topic: str) -> ReceivedTopic:
    """Parse any topic the hub sends a device; :class:`HubParseError` for anything else."""
    if _need_str(topic).startswith(TWIN_RESPONSE_PREFIX):
        return parse_twin_response_topic(topic)
    if topic.startswith(DESIRED_PATCH_PREFIX):
        return parse_desired_patch_topic(topic)
    if topic.startswith(METHOD_REQUEST_PREFIX):
        return parse_method_request_topic(topic)
    if topic.startswith("devices/"):
        return parse_c2d_topic(topic)
    raise HubParseError(f"not a topic the hub sends to devices: {topic[:80]!r}")


def parse_published_topic(topic: str) -> PublishedTopic:
    """Parse any topic a device may publish (the emulator's side); :class:`HubParseError` else."""
    if _need_str(topic).startswith("$iothub/twin/"):
        return parse_twin_request_topic(topic)
    if topic.startswith(METHOD_RESPONSE_PREFIX):
        return parse_method_response_topic(topic)
    if topic.startswith("devices/"):
        return parse_telemetry_topic(topic)
    raise HubParseError(f"not a topic a device may publish to: {topic[:80]!r}")
