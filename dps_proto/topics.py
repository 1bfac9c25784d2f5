"""MQTT topics and CONNECT username of the DPS device protocol: builders and parsers.

Standard library only. ``$rid`` and ``operationId`` are percent-encoded when built and decoded when
parsed; query keys may come in any order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote, unquote

from .errors import DpsParseError

DEFAULT_API_VERSION = "2019-03-31"
RESPONSE_SUBSCRIBE_TOPIC = "$dps/registrations/res/#"
RESPONSE_PREFIX = "$dps/registrations/res/"
REGISTER_PREFIX = "$dps/registrations/PUT/iotdps-register/?"
POLL_PREFIX = "$dps/registrations/GET/iotdps-get-operationstatus/?"
#: A retry-after longer than this many digits is read as this huge value (callers cap it).
_MAX_RETRY_AFTER_DIGITS = 9
_HUGE_RETRY_AFTER = 1_000_000_000


def _encode(value: str) -> str:
    return quote(value, safe="")


def parse_query(text: str) -> dict[str, str]:
    """Split ``k1=v1&k2&k3=`` into a dict of decoded values (``k2`` maps to ``""``).

    Duplicated keys are refused: the protocol never sends them and guessing would hide a bug.
    """
    properties: dict[str, str] = {}
    if not text:
        return properties
    for part in text.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        key = unquote(key)
        if not key:
            raise DpsParseError(f"empty key in query {text[:80]!r}")
        if key in properties:
            raise DpsParseError(f"duplicate key {key!r} in query")
        properties[key] = unquote(value)
    return properties


def build_query(properties: dict[str, str]) -> str:
    """Join a dict into ``k=v&...``, percent-encoding the values (keys are protocol constants)."""
    return "&".join(f"{key}={_encode(value)}" for key, value in properties.items())


def register_topic(rid: str) -> str:
    """Topic a device publishes its registration request to."""
    return REGISTER_PREFIX + build_query({"$rid": rid})


def poll_topic(rid: str, operation_id: str) -> str:
    """Topic a device publishes an operation-status query to."""
    return POLL_PREFIX + build_query({"$rid": rid, "operationId": operation_id})


def parse_retry_after(value: str | None) -> int | None:
    """A ``retry-after`` value in whole seconds, or None when absent, empty or not a number."""
    if value is None:
        return None
    text = value.strip()
    if not text or not text.isascii() or not text.isdigit():
        return None
    text = text.lstrip("0") or "0"
    if len(text) > _MAX_RETRY_AFTER_DIGITS:
        return _HUGE_RETRY_AFTER
    return int(text)


@dataclass(frozen=True)
class ResponseTopic:
    """What a ``$dps/registrations/res/{status}/?...`` topic says."""

    status: int
    rid: str | None
    retry_after: int | None
    properties: dict[str, str] = field(default_factory=dict)


def response_topic(status: int, rid: str, retry_after: int | None = None) -> str:
    """Topic the service answers on (used by the emulator and by tests)."""
    if isinstance(status, bool) or not isinstance(status, int) or not 0 <= status <= 99999:
        raise DpsParseError("status must be an integer from 0 to 99999")
    props = {"$rid": rid}
    if retry_after is not None:
        props["retry-after"] = str(int(retry_after))
    return f"{RESPONSE_PREFIX}{status}/?{build_query(props)}"


def parse_response_topic(topic: str) -> ResponseTopic:
    """Parse a response topic; :class:`DpsParseError` if it is not one."""
    if not isinstance(topic, str) or not topic.startswith(RESPONSE_PREFIX):
        raise DpsParseError(f"not a DPS response topic: {str(topic)[:80]!r}")
    rest = topic[len(RESPONSE_PREFIX) :]
    status_text, sep, tail = rest.partition("/")
    if not sep:
        raise DpsParseError("DPS response topic has no '/' after the status")
    if not status_text.isascii() or not status_text.isdigit() or len(status_text) > 5:
        raise DpsParseError(f"DPS response status is not a number: {status_text[:20]!r}")
    query = tail[1:] if tail.startswith("?") else tail
    properties = parse_query(query)
    return ResponseTopic(
        status=int(status_text),
        rid=properties.get("$rid"),
        retry_after=parse_retry_after(properties.get("retry-after")),
        properties=properties,
    )


@dataclass(frozen=True)
class RequestTopic:
    """A device request as the service sees it: a register or an operation-status poll."""

    kind: Literal["register", "poll"]
    rid: str
    operation_id: str | None
    properties: dict[str, str] = field(default_factory=dict)


def parse_request_topic(topic: str) -> RequestTopic:
    """Parse a register or poll topic (the emulator's side); :class:`DpsParseError` otherwise."""
    if not isinstance(topic, str):
        raise DpsParseError("a topic must be a string")
    kind: Literal["register", "poll"]
    if topic.startswith(REGISTER_PREFIX):
        kind, query = "register", topic[len(REGISTER_PREFIX) :]
    elif topic.startswith(POLL_PREFIX):
        kind, query = "poll", topic[len(POLL_PREFIX) :]
    else:
        raise DpsParseError(f"not a DPS request topic: {topic[:80]!r}")
    properties = parse_query(query)
    rid = properties.get("$rid")
    if rid is None:
        raise DpsParseError("DPS request topic has no $rid")
    operation_id = properties.get("operationId")
    if kind == "poll" and not operation_id:
        raise DpsParseError("operation status request has no operationId")
    return RequestTopic(kind=kind, rid=rid, operation_id=operation_id, properties=properties)


@dataclass(frozen=True)
class Username:
    """The parts of a DPS CONNECT username."""

    id_scope: str
    registration_id: str
    api_version: str
    properties: dict[str, str] = field(default_factory=dict)


def username(
    id_scope: str,
    registration_id: str,
    api_version: str = DEFAULT_API_VERSION,
    client_version: str | None = None,
) -> str:
    """``{idScope}/registrations/{registrationId}/api-version={v}[&ClientVersion={agent}]``."""
    text = f"{id_scope}/registrations/{registration_id}/api-version={api_version}"
    if client_version:
        text += f"&ClientVersion={_encode(client_version)}"
    return text


def parse_username(text: str) -> Username:
    """Parse a DPS CONNECT username; :class:`DpsParseError` if it is not one."""
    if not isinstance(text, str):
        raise DpsParseError("a username must be a string")
    id_scope, sep, rest = text.partition("/registrations/")
    if not sep or not id_scope or "/" in id_scope:
        raise DpsParseError(
            "DPS username must look like {idScope}/registrations/{id}/api-version=.."
        )
    registration_id, sep, query = rest.rpartition("/")
    if not sep or not registration_id:
        raise DpsParseError("DPS username has no registration id")
    query = query[1:] if query.startswith("?") else query
    properties = parse_query(query)
    api_version = properties.get("api-version")
    if not api_version:
        raise DpsParseError("DPS username has no api-version")
    return Username(
        id_scope=id_scope,
        registration_id=registration_id,
        api_version=api_version,
        properties=properties,
    )
