"""A telemetry or cloud-to-device message: payload, application properties, system properties.

System properties travel in the topic's property bag under Azure's ``$.`` keys (sent as
``%24.mid`` etc.; both spellings are accepted when parsing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from .errors import HubParseError

#: Message field -> property-bag key of each system property this package knows.
SYSTEM_PROPERTIES: dict[str, str] = {
    "message_id": "$.mid",
    "correlation_id": "$.cid",
    "user_id": "$.uid",
    "content_type": "$.ct",
    "content_encoding": "$.ce",
    "creation_time": "$.ctime",
    "expiry_time": "$.exp",
    "component": "$.sub",
    "output_name": "$.on",
}
#: ``$.to`` (a C2D message's address) is set by the hub, not carried as a Message field.
TO_KEY = "$.to"
#: Keys an application property may not use, since the system properties use them.
RESERVED_KEYS = frozenset([*SYSTEM_PROPERTIES.values(), TO_KEY])
_FIELD_BY_KEY = {key: name for name, key in SYSTEM_PROPERTIES.items()}


@dataclass(frozen=True)
class Message:
    """One message. ``properties`` are application properties (string values); the rest are
    Azure system properties, None when absent. ``creation_time`` and ``expiry_time`` are ISO 8601
    UTC strings (e.g. ``2021-04-21T11:30:16Z``), passed through unchanged."""

    payload: bytes = b""
    properties: dict[str, str] = field(default_factory=dict)
    message_id: str | None = None
    correlation_id: str | None = None
    user_id: str | None = None
    content_type: str | None = None
    content_encoding: str | None = None
    creation_time: str | None = None
    expiry_time: str | None = None
    component: str | None = None
    output_name: str | None = None

    def system_properties(self) -> dict[str, str]:
        """The system properties that are set, keyed by their ``$.`` names."""
        out: dict[str, str] = {}
        for name, key in SYSTEM_PROPERTIES.items():
            value = getattr(self, name)
            if value is not None:
                out[key] = value
        return out

    def with_payload(self, payload: bytes) -> Message:
        """A copy with another payload (parsers return messages without one)."""
        return dataclasses.replace(self, payload=payload)


def message_properties(message: Message) -> dict[str, str]:
    """All properties of ``message`` for a bag: system ones first, then application ones.

    :class:`HubParseError` if an application property uses a reserved ``$.`` key or is not a
    string.
    """
    if not isinstance(message, Message):
        raise HubParseError("expected a Message")
    if not isinstance(message.payload, bytes):
        raise HubParseError("a message payload must be bytes")
    out = message.system_properties()
    for key, value in out.items():
        if not isinstance(value, str):
            raise HubParseError(f"system property {key} must be a string")
    for key, value in message.properties.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise HubParseError("application properties must map strings to strings")
        if key in RESERVED_KEYS:
            raise HubParseError(f"application property key {key!r} is reserved")
        out[key] = value
    return out


def message_from_properties(
    properties: Mapping[str, str | None],
    payload: bytes = b"",
    *,
    ignore: frozenset[str] = frozenset(),
) -> Message:
    """Build a Message from decoded bag properties: known ``$.`` keys become fields, keys in
    ``ignore`` are dropped, everything else is an application property. A bare ``key`` (None)
    becomes ``""``."""
    fields: dict[str, str] = {}
    application: dict[str, str] = {}
    for key, value in properties.items():
        text = "" if value is None else value
        if key in ignore:
            continue
        name = _FIELD_BY_KEY.get(key)
        if name is not None:
            fields[name] = text
        else:
            application[key] = text
    return Message(payload=payload, properties=application, **fields)
