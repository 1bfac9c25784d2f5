"""Shared access signature (SAS) tokens for DPS and IoT Hub: build, parse, verify, derive keys.

Standard library only. The HMAC is taken from a :class:`Signer`, so a key in memory and a key
inside a TPM are interchangeable.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import quote, unquote

from .errors import SasError

#: Azure's services tolerate this much clock difference between device and service (seconds).
MAX_CLOCK_SKEW = 300
#: Key name DPS expects in registration SAS tokens.
DPS_KEY_NAME = "registration"


class Signer(Protocol):
    """Anything that can HMAC-SHA256 a message with a device key it may keep to itself."""

    def sign(self, data: bytes) -> bytes:
        """Return HMAC-SHA256 of ``data`` under the device key."""
        ...


def decode_key(key_b64: str) -> bytes:
    """Decode a base64 symmetric key, with or without padding; :class:`SasError` if it is not."""
    if not isinstance(key_b64, str):
        raise SasError("a symmetric key must be a base64 string")
    text = key_b64.strip()
    text += "=" * (-len(text) % 4)
    try:
        key = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SasError("the symmetric key is not valid base64") from exc
    if not key:
        raise SasError("the symmetric key is empty")
    return key


@dataclass(frozen=True)
class KeySigner:
    """A :class:`Signer` holding a raw symmetric key in memory."""

    key: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes) or not self.key:
            raise SasError("a KeySigner needs a non-empty key")

    @classmethod
    def from_base64(cls, key_b64: str) -> KeySigner:
        """Build a signer from a base64 key as shown in the Azure portal."""
        return cls(decode_key(key_b64))

    def sign(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data``."""
        return hmac.new(self.key, data, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return "KeySigner(key=<hidden>)"


def url_encode(text: str) -> str:
    """Percent-encode everything but RFC 3986 unreserved characters, with upper-case hex."""
    return quote(text, safe="")


def dps_resource_uri(id_scope: str, registration_id: str) -> str:
    """The resource a DPS token is for: ``{idScope}/registrations/{registrationId}``."""
    return f"{id_scope}/registrations/{registration_id}"


def hub_resource_uri(hub_host: str, device_id: str, module_id: str | None = None) -> str:
    """The resource a hub device (or module) token is for: ``{host}/devices/{id}[/modules/{m}]``."""
    base = f"{hub_host}/devices/{device_id}"
    return f"{base}/modules/{module_id}" if module_id else base


def string_to_sign(encoded_resource: str, expiry: int) -> bytes:
    """The exact bytes that are HMAC'd: the (already encoded) resource, a newline, the expiry."""
    return f"{encoded_resource}\n{expiry}".encode()


def generate_sas_token(
    resource_uri: str,
    signer: Signer,
    expiry: int,
    key_name: str | None = None,
) -> str:
    """Build ``SharedAccessSignature sr=..&sig=..&se=..[&skn=..]`` for ``resource_uri``.

    ``expiry`` is absolute (seconds since the Unix epoch): the caller computes it from its clock.
    """
    if isinstance(expiry, bool) or not isinstance(expiry, int) or not 0 <= expiry < 10**12:
        raise SasError("expiry must be a whole number of seconds since the epoch")
    sr = url_encode(resource_uri)
    signature = base64.b64encode(signer.sign(string_to_sign(sr, expiry))).decode("ascii")
    token = f"SharedAccessSignature sr={sr}&sig={url_encode(signature)}&se={expiry}"
    if key_name:
        token += f"&skn={url_encode(key_name)}"
    return token


def derive_device_key(group_key_b64: str, registration_id: str) -> str:
    """The device key of a group enrollment: base64(HMAC-SHA256(group key, registration id))."""
    digest = hmac.new(
        decode_key(group_key_b64), registration_id.encode("utf-8"), hashlib.sha256
    ).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass(frozen=True)
class SasToken:
    """A parsed SAS token; ``sr_raw`` is the resource exactly as sent, the text that is signed."""

    sr_raw: str
    signature: bytes
    expiry: int
    key_name: str | None

    @property
    def resource(self) -> str:
        """The decoded resource URI."""
        return unquote(self.sr_raw)


def parse_sas_token(token: str) -> SasToken:
    """Parse a ``SharedAccessSignature`` token; fields may come in any order."""
    if not isinstance(token, str):
        raise SasError("a SAS token must be a string")
    prefix = "SharedAccessSignature "
    if not token.startswith(prefix):
        raise SasError("a SAS token must start with 'SharedAccessSignature '")
    fields: dict[str, str] = {}
    for part in token[len(prefix) :].split("&"):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise SasError(f"malformed SAS token field {part[:40]!r}")
        if name in fields:
            raise SasError(f"duplicate SAS token field {name!r}")
        fields[name] = value
    for required in ("sr", "sig", "se"):
        if required not in fields:
            raise SasError(f"the SAS token has no {required!r} field")
    se = fields["se"]
    if not se.isascii() or not se.isdigit() or len(se) > 12:
        raise SasError("the SAS token expiry 'se' is not a number of seconds")
    sig_text = unquote(fields["sig"])
    try:
        signature = base64.b64decode(sig_text + "=" * (-len(sig_text) % 4), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SasError("the SAS token signature is not base64") from exc
    skn = fields.get("skn")
    return SasToken(
        sr_raw=fields["sr"],
        signature=signature,
        expiry=int(se),
        key_name=unquote(skn) if skn is not None else None,
    )


def verify_sas_token(
    token: SasToken,
    signer: Signer,
    expected_resource: str,
    now: float,
    *,
    max_skew: int = MAX_CLOCK_SKEW,
) -> None:
    """Check a token the way Azure's services do; raise :class:`SasError` saying what is wrong.

    The HMAC is checked over the raw ``sr`` text (so any escaping case, or none, works); the decoded
    resource must equal ``expected_resource`` case-insensitively; the expiry may be at most
    ``max_skew`` seconds in the past.
    """
    if token.resource.lower() != expected_resource.lower():
        raise SasError(f"the token is for {token.resource!r}, not for {expected_resource!r}")
    expected = signer.sign(string_to_sign(token.sr_raw, token.expiry))
    if not hmac.compare_digest(expected, token.signature):
        raise SasError("the token signature does not match the key")
    if token.expiry + max_skew < now:
        raise SasError("the token has expired")
