"""Tests of dps_proto.sas: token building, parsing and verification, and group-derived keys."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import string
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dps_proto import (
    KeySigner,
    SasError,
    SasToken,
    derive_device_key,
    dps_resource_uri,
    generate_sas_token,
    hub_resource_uri,
    parse_sas_token,
    verify_sas_token,
)
from dps_proto.errors import DpsError
from dps_proto.sas import DPS_KEY_NAME, MAX_CLOCK_SKEW, decode_key, string_to_sign, url_encode

SETTINGS = settings(max_examples=150, deadline=None)

# -- an independent reference implementation ---------------------------------------------------

_UNRESERVED = set(string.ascii_letters + string.digits + "-._~")


def ref_encode(text: str, *, lower: bool = False) -> str:
    """RFC 3986 percent-encoding written from scratch (upper-case hex unless ``lower``)."""
    out = []
    for byte in text.encode("utf-8"):
        char = chr(byte)
        if char in _UNRESERVED:
            out.append(char)
        else:
            out.append(f"%{byte:02x}" if lower else f"%{byte:02X}")
    return "".join(out)


def ref_sign(key: bytes, sr_raw: str, expiry: int) -> bytes:
    return hmac.new(key, f"{sr_raw}\n{expiry}".encode(), hashlib.sha256).digest()


def ref_token(
    key: bytes, sr_raw: str, expiry: int, skn: str | None = None, *, order: str = "sr sig se skn"
) -> str:
    sig = base64.b64encode(ref_sign(key, sr_raw, expiry)).decode()
    fields = {"sr": sr_raw, "sig": ref_encode(sig), "se": str(expiry)}
    if skn is not None:
        fields["skn"] = skn
    parts = [f"{name}={fields[name]}" for name in order.split() if name in fields]
    return "SharedAccessSignature " + "&".join(parts)


# -- strategies --------------------------------------------------------------------------------

REG_ID_CHARS = string.ascii_lowercase + string.ascii_uppercase + string.digits + "-._:"
registration_ids = st.text(REG_ID_CHARS, min_size=1, max_size=128)
#: ids with every character the reference lists as worth trying in a resource
odd_ids = st.text(REG_ID_CHARS + "% /+=@$&?#", min_size=1, max_size=40)
keys = st.binary(min_size=16, max_size=64)
expiries = st.integers(min_value=0, max_value=10**12 - 1)

# -- format-only vectors of the Embedded C SDK (test_az_iot_provisioning_client_sas.c) ---------

ESDK_SCOPE = "0neFEEDC0DE"
ESDK_REG_ID = "myRegistrationId"
ESDK_EXPIRY = 1578941692
ESDK_STRING_TO_SIGN = "0neFEEDC0DE%2fregistrations%2fmyRegistrationId\n1578941692"
ESDK_SIG = "cS1eHM%2FlDjsRsrZV9508wOFrgmZk4g8FNg8NwHVSiSQ"
ESDK_PASSWORD = (
    "SharedAccessSignature sr=0neFEEDC0DE%2fregistrations%2fmyRegistrationId"
    f"&sig={ESDK_SIG}&se=1578941692"
)
HUB_HOST = "myiothub.azure-devices.net"


def test_esdk_dps_string_to_sign_matches_with_upper_case_escapes() -> None:
    sr = url_encode(dps_resource_uri(ESDK_SCOPE, ESDK_REG_ID))
    assert sr == "0neFEEDC0DE%2Fregistrations%2FmyRegistrationId"
    built = string_to_sign(sr, ESDK_EXPIRY)
    assert built == ESDK_STRING_TO_SIGN.replace("%2f", "%2F").encode()
    assert built.lower() == ESDK_STRING_TO_SIGN.lower().encode()


def test_esdk_hub_strings_to_sign() -> None:
    device = url_encode(hub_resource_uri(HUB_HOST, "my_device"))
    assert string_to_sign(device, ESDK_EXPIRY) == (
        b"myiothub.azure-devices.net%2Fdevices%2Fmy_device\n1578941692"
    )
    module = url_encode(hub_resource_uri(HUB_HOST, "my_device", "my_module"))
    assert string_to_sign(module, ESDK_EXPIRY) == (
        b"myiothub.azure-devices.net%2Fdevices%2Fmy_device%2Fmodules%2Fmy_module\n1578941692"
    )


def test_resource_uris() -> None:
    assert dps_resource_uri("0ne00000001", "dev-1") == "0ne00000001/registrations/dev-1"
    assert hub_resource_uri("h.azure-devices.net", "d") == "h.azure-devices.net/devices/d"
    assert hub_resource_uri("h", "d", None) == "h/devices/d"
    assert hub_resource_uri("h", "d", "m") == "h/devices/d/modules/m"


@pytest.mark.parametrize("skn", [None, "iothubowner"])
def test_parse_esdk_password(skn: str | None) -> None:
    token = ESDK_PASSWORD + (f"&skn={skn}" if skn else "")
    parsed = parse_sas_token(token)
    assert parsed.sr_raw == "0neFEEDC0DE%2fregistrations%2fmyRegistrationId"
    assert parsed.resource == "0neFEEDC0DE/registrations/myRegistrationId"
    assert parsed.expiry == ESDK_EXPIRY
    assert parsed.key_name == skn
    # the fixed signature is unpadded base64 with an encoded '/'
    assert parsed.signature == base64.b64decode(unquote(ESDK_SIG) + "=")
    assert len(parsed.signature) == 32


def test_generated_token_equals_independent_computation() -> None:
    key = bytes(range(32))
    signer = KeySigner(key)
    resource = dps_resource_uri(ESDK_SCOPE, ESDK_REG_ID)
    token = generate_sas_token(resource, signer, ESDK_EXPIRY, DPS_KEY_NAME)
    sr = "0neFEEDC0DE%2Fregistrations%2FmyRegistrationId"
    sig = base64.b64encode(ref_sign(key, sr, ESDK_EXPIRY)).decode()
    assert token == (
        f"SharedAccessSignature sr={sr}&sig={ref_encode(sig)}&se={ESDK_EXPIRY}&skn=registration"
    )
    without_skn = generate_sas_token(resource, signer, ESDK_EXPIRY)
    assert without_skn == token.removesuffix("&skn=registration")


@SETTINGS
@given(
    key=keys,
    scope=st.text(string.ascii_letters + string.digits, min_size=1, max_size=12),
    reg_id=odd_ids,
    expiry=expiries,
    skn=st.sampled_from([None, "registration", "a b&c"]),
)
def test_generate_matches_reference_and_round_trips(
    key: bytes, scope: str, reg_id: str, expiry: int, skn: str | None
) -> None:
    resource = dps_resource_uri(scope, reg_id)
    token = generate_sas_token(resource, KeySigner(key), expiry, skn)
    sr = ref_encode(resource)
    sig = base64.b64encode(ref_sign(key, sr, expiry)).decode()
    expected = f"SharedAccessSignature sr={sr}&sig={ref_encode(sig)}&se={expiry}"
    if skn:
        expected += f"&skn={ref_encode(skn)}"
    assert token == expected
    parsed = parse_sas_token(token)
    assert parsed == SasToken(sr, base64.b64decode(sig), expiry, skn)
    assert parsed.resource == resource
    verify_sas_token(parsed, KeySigner(key), resource, now=expiry)


def test_generate_rejects_bad_expiry() -> None:
    signer = KeySigner(b"k" * 32)
    for expiry in (-1, 1.5, "123", None):
        with pytest.raises(SasError):
            generate_sas_token("a/registrations/b", signer, expiry)  # type: ignore[arg-type]


# -- group-derived device keys -----------------------------------------------------------------


@SETTINGS
@given(group_key=keys, reg_id=registration_ids, padded=st.booleans())
def test_derived_key_matches_reference(group_key: bytes, reg_id: str, padded: bool) -> None:
    group_b64 = base64.b64encode(group_key).decode()
    if not padded:
        group_b64 = group_b64.rstrip("=")
    expected = base64.b64encode(
        hmac.new(group_key, reg_id.encode("utf-8"), hashlib.sha256).digest()
    ).decode()
    derived = derive_device_key(group_b64, reg_id)
    assert derived == expected
    assert len(base64.b64decode(derived)) == 32


def test_derived_key_rejects_bad_group_key() -> None:
    for bad in ("", "!!!!", "A", "abc$", "ab cd"):
        with pytest.raises(SasError):
            derive_device_key(bad, "dev")


# -- decode_key --------------------------------------------------------------------------------


@SETTINGS
@given(key=st.binary(min_size=1, max_size=64), strip_padding=st.booleans(), ws=st.booleans())
def test_decode_key_with_and_without_padding(key: bytes, strip_padding: bool, ws: bool) -> None:
    text = base64.b64encode(key).decode()
    if strip_padding:
        text = text.rstrip("=")
    if ws:
        text = f"  {text}\n"
    assert decode_key(text) == key
    assert KeySigner.from_base64(text).key == key


@pytest.mark.parametrize(
    "bad", ["", "   ", "====", "A", "AAAAA", "QUJD!", "QU JD", "QUJD\u00e9", "-_-_"]
)
def test_decode_key_rejects(bad: str) -> None:
    with pytest.raises(SasError):
        decode_key(bad)


@pytest.mark.parametrize("bad", [None, b"QUJD", 123])
def test_decode_key_rejects_non_strings(bad: object) -> None:
    with pytest.raises(SasError):
        decode_key(bad)  # type: ignore[arg-type]


@SETTINGS
@given(text=st.text(max_size=100))
def test_decode_key_arbitrary_text_raises_only_sas_error(text: str) -> None:
    try:
        key = decode_key(text)
    except SasError:
        return
    assert isinstance(key, bytes) and key


def test_key_signer() -> None:
    with pytest.raises(SasError):
        KeySigner(b"")
    with pytest.raises(SasError):
        KeySigner("not bytes")  # type: ignore[arg-type]
    signer = KeySigner(b"secret-key-bytes")
    assert signer.sign(b"data") == hmac.new(b"secret-key-bytes", b"data", hashlib.sha256).digest()
    assert "secret" not in repr(signer)
    assert "hidden" in repr(signer)


# -- parse_sas_token ---------------------------------------------------------------------------

FIELD_NAMES = ["sr", "sig", "se", "skn"]


@SETTINGS
@given(
    sr_raw=st.text(string.ascii_letters + string.digits + "%-._~", min_size=1, max_size=60),
    signature=st.binary(min_size=1, max_size=64),
    expiry=expiries,
    skn=st.one_of(st.none(), st.text(max_size=20)),
    order=st.permutations(FIELD_NAMES),
    sig_style=st.sampled_from(["encoded", "raw", "unpadded"]),
)
def test_parse_fields_in_any_order(
    sr_raw: str,
    signature: bytes,
    expiry: int,
    skn: str | None,
    order: list[str],
    sig_style: str,
) -> None:
    sig = base64.b64encode(signature).decode()
    if sig_style == "encoded":
        sig = ref_encode(sig)
    elif sig_style == "unpadded":
        sig = ref_encode(sig.rstrip("="))
    # "raw": '+', '/' and '=' unencoded; '=' only splits the field name from its value once
    fields = {"sr": sr_raw, "sig": sig, "se": str(expiry)}
    if skn is not None:
        fields["skn"] = ref_encode(skn)
    token = "SharedAccessSignature " + "&".join(
        f"{name}={fields[name]}" for name in order if name in fields
    )
    parsed = parse_sas_token(token)
    assert parsed == SasToken(sr_raw, signature, expiry, skn)


def test_parse_signature_with_plus_slash_and_padding() -> None:
    signature = b"\xfb\xff\xbf"  # base64 "+/+/"
    two = b"\xfb\xef"  # base64 "++8="
    for sig_bytes, sig_text in ((signature, "+/+/"), (two, "++8=")):
        assert base64.b64encode(sig_bytes).decode() == sig_text
        for rendered in (sig_text, ref_encode(sig_text), ref_encode(sig_text, lower=True)):
            parsed = parse_sas_token(f"SharedAccessSignature sr=a&sig={rendered}&se=1")
            assert parsed.signature == sig_bytes
            # '+' is a literal plus, never a space
            assert parsed.key_name is None


@pytest.mark.parametrize(
    "token",
    [
        "",
        "SharedAccessSignature",
        "SharedAccessSignature ",
        "sharedaccesssignature sr=a&sig=AAAA&se=1",
        "SharedAccessSignature  sr=a&sig=AAAA&se=1",
        "SharedAccessSignature sr=a&sig=AAAA",
        "SharedAccessSignature sig=AAAA&se=1",
        "SharedAccessSignature sr=a&se=1",
        "SharedAccessSignature sr=a&sig=AAAA&se=1&",
        "SharedAccessSignature sr=a&&sig=AAAA&se=1",
        "SharedAccessSignature sr=a&sig=AAAA&se=1&skn",
        "SharedAccessSignature sr=a&sig=AAAA&se=1&=x",
        "SharedAccessSignature sr=a&sig=AAAA&se=1&sr=b",
        "SharedAccessSignature sr=a&sig=AAAA&se=-1",
        "SharedAccessSignature sr=a&sig=AAAA&se=1.5",
        "SharedAccessSignature sr=a&sig=AAAA&se=",
        "SharedAccessSignature sr=a&sig=AAAA&se=\u0661",
        "SharedAccessSignature sr=a&sig=AAAA&se=1234567890123",
        "SharedAccessSignature sr=a&sig=A&se=1",
        "SharedAccessSignature sr=a&sig=AA!A&se=1",
        "SharedAccessSignature sr=a&sig=%zz&se=1",
        "SharedAccessSignature sr=a&sig=\u00e9\u00e9\u00e9\u00e9&se=1",
    ],
)
def test_parse_rejects(token: str) -> None:
    with pytest.raises(SasError):
        parse_sas_token(token)


@pytest.mark.parametrize("bad", [None, b"SharedAccessSignature sr=a&sig=AAAA&se=1", 42])
def test_parse_rejects_non_strings(bad: object) -> None:
    with pytest.raises(SasError):
        parse_sas_token(bad)  # type: ignore[arg-type]


token_like = st.one_of(
    st.text(),
    st.text().map(lambda s: "SharedAccessSignature " + s),
    st.lists(
        st.tuples(
            st.sampled_from(["sr", "sig", "se", "skn", "x", ""]),
            st.sampled_from(["=", ""]),
            st.text(string.printable + "\u00e9\u2603", max_size=20),
        ),
        max_size=6,
    ).map(lambda parts: "SharedAccessSignature " + "&".join(a + b + c for a, b, c in parts)),
)


@settings(max_examples=400, deadline=None)
@given(text=token_like, key=keys, resource=st.text(max_size=30), now=st.floats(-1e13, 1e13))
def test_arbitrary_text_raises_only_sas_error(
    text: str, key: bytes, resource: str, now: float
) -> None:
    try:
        parsed = parse_sas_token(text)
    except SasError:
        return
    except DpsError as exc:  # pragma: no cover - a failure message, not a branch
        pytest.fail(f"wrong error type {type(exc).__name__}")
    assert isinstance(parsed, SasToken)
    with contextlib.suppress(SasError):
        verify_sas_token(parsed, KeySigner(key), resource, now)


# -- verify_sas_token --------------------------------------------------------------------------

SCOPE = "0ne0012ABCD"
REG = "my-device.01"
RESOURCE = dps_resource_uri(SCOPE, REG)
KEY = base64.b64decode("c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0zMmJ5dGVzIQ==")
EXPIRY = 1_700_000_000


@pytest.mark.parametrize(
    "sr_raw",
    [
        "0ne0012ABCD%2Fregistrations%2Fmy-device.01",  # upper-case escapes (our encoder)
        "0ne0012ABCD%2fregistrations%2fmy-device.01",  # lower-case escapes (ESDK/CSDK)
        "0ne0012ABCD/registrations/my-device.01",  # not encoded at all
        "0ne0012abcd%2fregistrations%2fmy-device.01",  # lower-cased resource (the docs' advice)
        "%30ne0012ABCD%2Fregistrations%2Fmy%2Ddevice%2E01",  # needlessly escaped characters
    ],
)
@pytest.mark.parametrize("skn", [None, "registration"])
def test_verify_accepts_any_escaping_signed_over_raw_text(sr_raw: str, skn: str | None) -> None:
    token = ref_token(KEY, sr_raw, EXPIRY, skn)
    verify_sas_token(parse_sas_token(token), KeySigner(KEY), RESOURCE, now=EXPIRY - 100)


def test_verify_rejects_signature_over_differently_escaped_text() -> None:
    # signed over lower-case escapes but presented with upper-case ones
    sig = base64.b64encode(ref_sign(KEY, "0ne0012ABCD%2fregistrations%2fmy-device.01", EXPIRY))
    token = (
        "SharedAccessSignature sr=0ne0012ABCD%2Fregistrations%2Fmy-device.01"
        f"&sig={ref_encode(sig.decode())}&se={EXPIRY}"
    )
    with pytest.raises(SasError, match="signature"):
        verify_sas_token(parse_sas_token(token), KeySigner(KEY), RESOURCE, now=EXPIRY)


@pytest.mark.parametrize(
    "resource",
    [
        dps_resource_uri(SCOPE, "other-device"),
        dps_resource_uri("0ne0000FFFF", REG),
        RESOURCE + "x",
        RESOURCE[:-1],
        "",
    ],
)
def test_verify_rejects_wrong_resource(resource: str) -> None:
    token = parse_sas_token(generate_sas_token(RESOURCE, KeySigner(KEY), EXPIRY))
    with pytest.raises(SasError, match="not for"):
        verify_sas_token(token, KeySigner(KEY), resource, now=EXPIRY)


def test_verify_resource_is_case_insensitive() -> None:
    token = parse_sas_token(generate_sas_token(RESOURCE, KeySigner(KEY), EXPIRY))
    verify_sas_token(token, KeySigner(KEY), RESOURCE.upper(), now=EXPIRY)


def test_verify_rejects_wrong_key_and_tampering() -> None:
    good = generate_sas_token(RESOURCE, KeySigner(KEY), EXPIRY)
    with pytest.raises(SasError, match="signature"):
        verify_sas_token(parse_sas_token(good), KeySigner(KEY + b"!"), RESOURCE, now=EXPIRY)
    # a different expiry with the same signature
    tampered = good.replace(f"se={EXPIRY}", f"se={EXPIRY + 3600}")
    with pytest.raises(SasError, match="signature"):
        verify_sas_token(parse_sas_token(tampered), KeySigner(KEY), RESOURCE, now=EXPIRY)
    # the derived key of another registration id does not verify
    group = base64.b64encode(b"g" * 32).decode()
    mine = KeySigner.from_base64(derive_device_key(group, REG))
    other = KeySigner.from_base64(derive_device_key(group, REG + "x"))
    token = parse_sas_token(generate_sas_token(RESOURCE, mine, EXPIRY))
    verify_sas_token(token, mine, RESOURCE, now=EXPIRY)
    with pytest.raises(SasError):
        verify_sas_token(token, other, RESOURCE, now=EXPIRY)


@pytest.mark.parametrize(
    ("offset", "ok"),
    [
        (-3600, True),
        (0, True),
        (1, True),
        (299.5, True),
        (MAX_CLOCK_SKEW, True),
        (MAX_CLOCK_SKEW + 0.001, False),
        (MAX_CLOCK_SKEW + 1, False),
        (86400, False),
    ],
)
def test_verify_expiry_with_skew(offset: float, ok: bool) -> None:
    assert MAX_CLOCK_SKEW == 300
    token = parse_sas_token(generate_sas_token(RESOURCE, KeySigner(KEY), EXPIRY))
    if ok:
        verify_sas_token(token, KeySigner(KEY), RESOURCE, now=EXPIRY + offset)
    else:
        with pytest.raises(SasError, match="expired"):
            verify_sas_token(token, KeySigner(KEY), RESOURCE, now=EXPIRY + offset)


def test_verify_custom_skew() -> None:
    token = parse_sas_token(generate_sas_token(RESOURCE, KeySigner(KEY), EXPIRY))
    verify_sas_token(token, KeySigner(KEY), RESOURCE, now=EXPIRY, max_skew=0)
    with pytest.raises(SasError):
        verify_sas_token(token, KeySigner(KEY), RESOURCE, now=EXPIRY + 1, max_skew=0)


@SETTINGS
@given(
    key=keys,
    reg_id=odd_ids,
    expiry=expiries,
    lower=st.booleans(),
    order=st.sampled_from(["sr sig se skn", "se skn sig sr", "skn sr se sig", "sig se sr skn"]),
    skn=st.sampled_from([None, "registration"]),
    now_offset=st.floats(-1e6, MAX_CLOCK_SKEW),
)
def test_verify_accepts_reference_tokens(
    key: bytes,
    reg_id: str,
    expiry: int,
    lower: bool,
    order: str,
    skn: str | None,
    now_offset: float,
) -> None:
    resource = dps_resource_uri(SCOPE, reg_id)
    token = ref_token(key, ref_encode(resource, lower=lower), expiry, skn, order=order)
    parsed = parse_sas_token(token)
    assert parsed.resource == resource
    verify_sas_token(parsed, KeySigner(key), resource, now=expiry + now_offset)
    with pytest.raises(SasError):
        verify_sas_token(parsed, KeySigner(key[::-1] + b"x"), resource, now=expiry)
