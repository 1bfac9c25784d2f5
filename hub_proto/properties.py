"""Property bags (``k1=v1&k2&k3=``) of telemetry and C2D topics: encode and decode.

Keys and values are percent-encoded as RFC 3986 says (everything but unreserved characters, with
upper-case hex) and decoded with :func:`urllib.parse.unquote` (so ``$`` and ``%24`` are the same
key, and ``+`` stays a plus sign). ``key`` (no ``=``) decodes to None, ``key=`` to ``""``.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import quote, unquote

from .errors import HubParseError


def encode_component(text: str) -> str:
    """Percent-encode one key or value (nothing is left unescaped but ``A-Za-z0-9-._~``)."""
    try:
        return quote(text, safe="")
    except UnicodeEncodeError as exc:
        raise HubParseError("property text is not valid Unicode (lone surrogate)") from exc


def encode_properties(properties: Mapping[str, str | None]) -> str:
    """Join a mapping into a bag: ``None`` values become a bare ``key``, ``""`` becomes ``key=``."""
    parts: list[str] = []
    for key, value in properties.items():
        if not isinstance(key, str) or not key:
            raise HubParseError("property keys must be non-empty strings")
        if value is None:
            parts.append(encode_component(key))
        elif isinstance(value, str):
            parts.append(f"{encode_component(key)}={encode_component(value)}")
        else:
            raise HubParseError(f"property {key!r} has a value that is not a string")
    return "&".join(parts)


def decode_properties(text: str) -> dict[str, str | None]:
    """Split a bag into a dict of decoded keys and values; an optional leading ``?`` is skipped.

    Empty segments (``&&``) are ignored; an empty key or a key given twice (after decoding) raises
    :class:`HubParseError`.
    """
    if not isinstance(text, str):
        raise HubParseError("a property bag must be a string")
    if text.startswith("?"):
        text = text[1:]
    properties: dict[str, str | None] = {}
    if not text:
        return properties
    for part in text.split("&"):
        if not part:
            continue
        raw_key, sep, raw_value = part.partition("=")
        key = unquote(raw_key)
        if not key:
            raise HubParseError(f"empty key in property bag {text[:80]!r}")
        if key in properties:
            raise HubParseError(f"duplicate key {key[:40]!r} in property bag")
        properties[key] = unquote(raw_value) if sep else None
    return properties
