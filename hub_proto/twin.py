"""Twin documents: Azure's limits on properties, its size rule, and applying a patch.

Used by the device (its local copy of the twin, and checking a reported patch before sending it)
and by the emulator's twin store (checking a merged section before accepting it).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from typing import Any

from .errors import HubParseError

#: Azure's limits (``iot-hub-devguide-device-twins.md``).
MAX_KEY_BYTES = 1024
MAX_STRING_BYTES = 4096
MAX_DEPTH = 10
MAX_REPORTED_SIZE = 32 * 1024
MAX_DESIRED_SIZE = 32 * 1024
MAX_TAGS_SIZE = 8 * 1024
MIN_INTEGER = -4503599627370496
MAX_INTEGER = 4503599627370495
#: Read-only members the service adds; they are neither checked nor counted.
READ_ONLY_KEYS = frozenset(["$version", "$metadata"])


def _is_control(ch: str) -> bool:
    code = ord(ch)
    return code < 0x20 or 0x7F <= code <= 0x9F


def check_key(key: object) -> str:
    """A property name Azure accepts: a string of at most 1 KB of UTF-8 without ``.``, ``$``,
    space or control characters."""
    if not isinstance(key, str) or not key:
        raise HubParseError("twin property names must be non-empty strings")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise HubParseError("twin property name is not valid Unicode") from exc
    if size > MAX_KEY_BYTES:
        raise HubParseError(f"twin property name longer than {MAX_KEY_BYTES} bytes")
    for ch in key:
        if ch in ".$ " or _is_control(ch):
            raise HubParseError(f"twin property name {key[:40]!r} contains {ch!r}")
    return key


def _string_size(text: str) -> int:
    """Azure counts the characters of a string, leaving out C0 and C1 control characters."""
    return sum(1 for ch in text if not _is_control(ch))


def _check_value(value: object, depth: int, allow_null: bool) -> int:
    """Check one value at ``depth`` (1 for a direct member of the section) and return its size."""
    if value is None:
        if not allow_null:
            raise HubParseError("null is only allowed in a patch (it deletes the member)")
        return 0
    if isinstance(value, bool):
        return 4
    if isinstance(value, int):
        if not MIN_INTEGER <= value <= MAX_INTEGER:
            raise HubParseError(f"integer {value} outside Azure's range")
        return 8
    if isinstance(value, float):
        if not math.isfinite(value):
            raise HubParseError("twin numbers must be finite")
        return 8
    if isinstance(value, str):
        try:
            size = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise HubParseError("twin string is not valid Unicode") from exc
        if size > MAX_STRING_BYTES:
            raise HubParseError(f"twin string longer than {MAX_STRING_BYTES} bytes")
        return _string_size(value)
    if isinstance(value, (dict, list)):
        if depth > MAX_DEPTH:
            raise HubParseError(f"twin document deeper than {MAX_DEPTH} levels")
        if isinstance(value, list):
            return sum(_check_value(item, depth + 1, allow_null) for item in value)
        return _check_members(value, depth, allow_null)
    raise HubParseError(f"a twin value cannot be a {type(value).__name__}")


def _check_members(obj: Mapping[Any, Any], depth: int, allow_null: bool) -> int:
    total = 0
    for key, value in obj.items():
        if depth == 0 and key in READ_ONLY_KEYS:
            continue
        total += _string_size(check_key(key)) + _check_value(value, depth + 1, allow_null)
    return total


def twin_size(section: Mapping[str, Any]) -> int:
    """The size Azure gives a twin section (tags, desired or reported), checking it on the way.

    Azure's rule: for every member, the length of its key plus the size of its value; strings
    count characters without C0/C1 control characters, numbers 8, booleans 4, objects the sum of
    their members. Azure does not say how arrays and nulls count: arrays count the sum of their
    items, nulls 0. ``$version`` and ``$metadata`` at the top are not counted.
    """
    if not isinstance(section, Mapping):
        raise HubParseError("a twin section must be a JSON object")
    return _check_members(section, 0, allow_null=True)


def validate_section(
    section: Mapping[str, Any], *, max_size: int = MAX_REPORTED_SIZE, patch: bool = False
) -> int:
    """Check a twin section or patch against every limit and return its size.

    Limits: names (see :func:`check_key`), strings ≤ 4 KB of UTF-8, integers in Azure's range,
    finite numbers, objects nested at most 10 levels below the section, size ≤ ``max_size`` by
    :func:`twin_size`'s rule. ``null`` is only accepted when ``patch`` is true.
    """
    if not isinstance(section, Mapping):
        raise HubParseError("a twin section must be a JSON object")
    size = _check_members(section, 0, allow_null=patch)
    if size > max_size:
        raise HubParseError(f"twin section of {size} bytes exceeds the {max_size}-byte limit")
    return size


def validate_reported_patch(patch: Mapping[str, Any]) -> int:
    """Check a reported-properties patch a device is about to send (nulls allowed, ≤ 32 KB, no
    ``$`` keys, so no ``$version`` either); return its size."""
    if not isinstance(patch, Mapping):
        raise HubParseError("a reported patch must be a JSON object")
    for key in patch:
        if key in READ_ONLY_KEYS:
            raise HubParseError(f"a reported patch may not set {key}")
    return validate_section(patch, max_size=MAX_REPORTED_SIZE, patch=True)


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    return copy.deepcopy(value)


def apply_patch(target: dict[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``patch`` into ``target`` in place (JSON merge patch) and return ``target``.

    Objects merge member by member, ``null`` deletes a member, anything else replaces it. Values
    are copied, so later changes to ``patch`` do not leak into ``target``.
    """
    if not isinstance(target, dict) or not isinstance(patch, Mapping):
        raise HubParseError("a twin patch and its target must be JSON objects")
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, Mapping):
            current = target.get(key)
            if isinstance(current, dict):
                apply_patch(current, value)
            else:
                target[key] = _without_nulls(dict(value))
        else:
            target[key] = copy.deepcopy(value)
    return target


def encode_json(value: Any) -> bytes:
    """Compact UTF-8 JSON; :class:`HubParseError` if ``value`` cannot be JSON."""
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode(
            "utf-8"
        )
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise HubParseError(f"cannot encode as JSON: {exc}") from exc


def decode_json_object(payload: bytes) -> dict[str, Any]:
    """Decode a JSON object body; :class:`HubParseError` for anything else."""
    if not isinstance(payload, (bytes, bytearray)):
        raise HubParseError("a JSON body must be bytes")
    try:
        value = json.loads(bytes(payload).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HubParseError(f"body is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise HubParseError("body is not a JSON object")
    return value
