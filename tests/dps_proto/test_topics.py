"""Tests of dps_proto.topics: request/response topics, retry-after and the CONNECT username."""

from __future__ import annotations

import contextlib
import string
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dps_proto import (
    DEFAULT_API_VERSION,
    RESPONSE_SUBSCRIBE_TOPIC,
    DpsParseError,
    parse_request_topic,
    parse_response_topic,
    parse_username,
    poll_topic,
    register_topic,
    response_topic,
    username,
)
from dps_proto.topics import build_query, parse_query, parse_retry_after

SETTINGS = settings(max_examples=150, deadline=None)

_UNRESERVED = set(string.ascii_letters + string.digits + "-._~")


def ref_encode(text: str) -> str:
    """Percent-encoding written from scratch (upper-case hex)."""
    return "".join(chr(b) if chr(b) in _UNRESERVED else f"%{b:02X}" for b in text.encode("utf-8"))


# -- strategies --------------------------------------------------------------------------------

#: rids of any text, including the characters that are special in topics and queries
rids = st.one_of(
    st.text(),
    st.text("&=%#+/?$ \u00e9\u2603\U0001f600", min_size=1),
    st.uuids().map(str),
    st.integers(1, 65535).map(str),
)
hex16 = st.text("0123456789abcdef", min_size=16, max_size=16)
operation_ids = st.builds(
    lambda d, h, u: f"{d}.{h}.{u}", st.integers(0, 9), hex16, st.uuids().map(str)
)
extra_keys = st.dictionaries(
    st.text(string.ascii_letters + "-_", min_size=1, max_size=8).filter(
        lambda k: k not in ("rid", "operationId")
    ),
    st.text(max_size=10),
    max_size=3,
)

OP_ID = "4.d0a671905ea5b2c8.42d78160-4c78-479e-8be7-61d5e55dac0d"


def query(pairs: list[tuple[str, str]]) -> str:
    return "&".join(f"{k}={ref_encode(v)}" for k, v in pairs)


# -- literal formats ---------------------------------------------------------------------------


def test_literal_topics() -> None:
    assert RESPONSE_SUBSCRIBE_TOPIC == "$dps/registrations/res/#"
    assert register_topic("1") == "$dps/registrations/PUT/iotdps-register/?$rid=1"
    assert poll_topic("2", OP_ID) == (
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=2&operationId=" + OP_ID
    )
    assert response_topic(202, "1", 3) == "$dps/registrations/res/202/?$rid=1&retry-after=3"
    assert response_topic(200, "1") == "$dps/registrations/res/200/?$rid=1"
    # special characters are percent-encoded
    assert register_topic("a&b=c") == "$dps/registrations/PUT/iotdps-register/?$rid=a%26b%3Dc"


def test_response_topic_rejects_bad_status() -> None:
    for bad in (-1, "200", 2.0, None):
        with pytest.raises(DpsParseError):
            response_topic(bad, "1")  # type: ignore[arg-type]


# -- response topics ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "status", "rid", "retry_after"),
    [
        ("$dps/registrations/res/202/?$rid=1&retry-after=3", 202, "1", 3),
        ("$dps/registrations/res/202/?retry-after=120&$rid=1", 202, "1", 120),
        ("$dps/registrations/res/200/?$rid=1", 200, "1", None),
        ("$dps/registrations/res/401/?$rid=1", 401, "1", None),
        ("$dps/registrations/res/429/?$rid=abc&retry-after=0", 429, "abc", 0),
        ("$dps/registrations/res/0200/?$rid=1", 200, "1", None),  # leading zero
        ("$dps/registrations/res/200/", 200, None, None),  # no query at all
        ("$dps/registrations/res/200/?", 200, None, None),
        ("$dps/registrations/res/200/?$rid", 200, "", None),
        ("$dps/registrations/res/200/?$rid=", 200, "", None),
        ("$dps/registrations/res/200/?&$rid=1&", 200, "1", None),
        ("$dps/registrations/res/200/?%24rid=1", 200, "1", None),  # encoded key
        ("$dps/registrations/res/200/?$rid=a%26b%3Dc%25", 200, "a&b=c%", None),
        ("$dps/registrations/res/200/?$rid=a+b", 200, "a+b", None),  # '+' is not a space
        ("$dps/registrations/res/99999/?$rid=1", 99999, "1", None),
        ("$dps/registrations/res/0/?$rid=1", 0, "1", None),
    ],
)
def test_parse_response_topic_examples(
    topic: str, status: int, rid: str | None, retry_after: int | None
) -> None:
    parsed = parse_response_topic(topic)
    assert (parsed.status, parsed.rid, parsed.retry_after) == (status, rid, retry_after)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "$dps/registrations/res",
        "$dps/registrations/res/",
        "$dps/registrations/res/200",  # no '/' after the status
        "$dps/registrations/res/200?$rid=1",
        "$dps/registrations/res//?$rid=1",
        "$dps/registrations/res/abc/?$rid=1",
        "$dps/registrations/res/-200/?$rid=1",
        "$dps/registrations/res/+200/?$rid=1",
        "$dps/registrations/res/ 200/?$rid=1",
        "$dps/registrations/res/2.0/?$rid=1",
        "$dps/registrations/res/\u0662\u0660\u0660/?$rid=1",  # Arabic-Indic digits
        "$dps/registrations/res/100000/?$rid=1",  # more than 5 digits
        "$dps/registrations/res/200/?$rid=1&$rid=2",  # duplicated key
        "$dps/registrations/res/200/?$rid=1&%24rid=2",  # duplicated after decoding
        "$dps/registrations/res/202/?retry-after=1&retry-after=2&$rid=1",
        "$dps/registrations/res/200/?=1",  # empty key
        "$dps/registrations/unknown",
        "$DPS/registrations/res/200/?$rid=1",
        "$iothub/twin/res/200/?$rid=1",
        "devices/d/messages/devicebound/",
        "$dps/registrations/PUT/iotdps-register/?$rid=1",
    ],
)
def test_parse_response_topic_rejects(topic: str) -> None:
    with pytest.raises(DpsParseError):
        parse_response_topic(topic)


@pytest.mark.parametrize("bad", [None, b"$dps/registrations/res/200/?$rid=1", 200])
def test_parsers_reject_non_strings(bad: object) -> None:
    for parser in (parse_response_topic, parse_request_topic, parse_username):
        with pytest.raises(DpsParseError):
            parser(bad)  # type: ignore[operator]


@SETTINGS
@given(
    status=st.one_of(st.integers(100, 599), st.integers(0, 65535), st.integers(0, 99999)),
    rid=rids,
    retry_after=st.one_of(st.none(), st.integers(0, 999_999_999)),
)
def test_response_topic_round_trip(status: int, rid: str, retry_after: int | None) -> None:
    parsed = parse_response_topic(response_topic(status, rid, retry_after))
    assert parsed.status == status
    assert parsed.rid == rid
    assert parsed.retry_after == retry_after
    expected = {"$rid": rid}
    if retry_after is not None:
        expected["retry-after"] = str(retry_after)
    assert parsed.properties == expected


@SETTINGS
@given(
    status=st.integers(0, 99999),
    rid=rids,
    retry_after=st.one_of(st.none(), st.integers(0, 10**6)),
    extra=extra_keys,
    data=st.data(),
)
def test_response_query_keys_in_any_order(
    status: int,
    rid: str,
    retry_after: int | None,
    extra: dict[str, str],
    data: st.DataObject,
) -> None:
    pairs = [("$rid", rid), *extra.items()]
    if retry_after is not None:
        pairs.append(("retry-after", str(retry_after)))
    pairs = data.draw(st.permutations(pairs))
    leading = data.draw(st.sampled_from(["?", ""]))
    parsed = parse_response_topic(f"$dps/registrations/res/{status}/{leading}{query(pairs)}")
    assert (parsed.status, parsed.rid, parsed.retry_after) == (status, rid, retry_after)
    assert parsed.properties == dict(pairs)


@SETTINGS
@given(rid=rids, data=st.data())
def test_response_duplicated_keys_rejected(rid: str, data: st.DataObject) -> None:
    key = data.draw(st.sampled_from(["$rid", "retry-after", "x"]))
    dup_spelling = data.draw(st.sampled_from([key, ref_encode(key)]))
    pairs = [f"$rid={ref_encode(rid)}"] if key != "$rid" else []
    pairs += [f"{key}=1", f"{dup_spelling}=2"]
    pairs = data.draw(st.permutations(pairs))
    with pytest.raises(DpsParseError, match="duplicate"):
        parse_response_topic("$dps/registrations/res/200/?" + "&".join(pairs))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, None),  # absent
        ("", None),  # empty 'retry-after='
        ("0", 0),
        ("1", 1),
        ("3", 3),
        ("300", 300),
        ("301", 301),  # capping is the state machine's job, not the parser's
        ("000", 0),
        ("999999999", 999_999_999),  # 9 digits: still a number
        ("1000000000", 1_000_000_000),  # 10+ digits: huge, callers cap it
        (str(2**32), 1_000_000_000),
        (str(2**32 + 1), 1_000_000_000),
        (str(2**64), 1_000_000_000),
        ("-1", None),
        ("-0", None),
        ("+3", None),
        ("3.5", None),
        ("1e3", None),
        ("0x10", None),
        ("abc", None),
        ("3s", None),
        ("\u0663", None),  # non-ASCII digit
        (" 3 ", 3),  # surrounding white space is tolerated
    ],
)
def test_parse_retry_after(raw: str | None, expected: int | None) -> None:
    assert parse_retry_after(raw) == expected


@pytest.mark.parametrize(
    ("suffix", "expected"),
    [
        ("", None),
        ("&retry-after", None),
        ("&retry-after=", None),
        ("&retry-after=0", 0),
        ("&retry-after=7", 7),
        ("&retry-after=4294967297", 1_000_000_000),  # > 2**32
        ("&retry-after=-5", None),
        ("&retry-after=soon", None),
        ("&retry-after=%33", 3),  # percent-encoded digit
        ("&Retry-After=3", None),  # keys are case-sensitive
    ],
)
def test_retry_after_in_topic(suffix: str, expected: int | None) -> None:
    parsed = parse_response_topic("$dps/registrations/res/202/?$rid=1" + suffix)
    assert parsed.rid == "1"
    assert parsed.retry_after == expected


def test_negative_retry_after_is_built_but_parses_as_none() -> None:
    topic = response_topic(429, "1", -5)
    assert topic.endswith("retry-after=-5")
    assert parse_response_topic(topic).retry_after is None


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_parse_retry_after_arbitrary_text(text: str) -> None:
    value = parse_retry_after(text)
    assert value is None or (isinstance(value, int) and 0 <= value <= 10**9)


# -- request topics ----------------------------------------------------------------------------


@SETTINGS
@given(rid=rids)
def test_register_topic_round_trip(rid: str) -> None:
    parsed = parse_request_topic(register_topic(rid))
    assert parsed.kind == "register"
    assert parsed.rid == rid
    assert parsed.operation_id is None
    assert parsed.properties == {"$rid": rid}


@SETTINGS
@given(rid=rids, operation_id=st.one_of(operation_ids, st.text(min_size=1)))
def test_poll_topic_round_trip(rid: str, operation_id: str) -> None:
    topic = poll_topic(rid, operation_id)
    parsed = parse_request_topic(topic)
    assert parsed.kind == "poll"
    assert parsed.rid == rid
    assert parsed.operation_id == operation_id
    assert parsed.properties == {"$rid": rid, "operationId": operation_id}


@SETTINGS
@given(operation_id=operation_ids)
def test_observed_operation_ids_are_not_escaped(operation_id: str) -> None:
    assert poll_topic("1", operation_id).endswith("&operationId=" + operation_id)


@SETTINGS
@given(
    kind=st.sampled_from(["register", "poll"]),
    rid=rids,
    operation_id=operation_ids,
    extra=extra_keys,
    data=st.data(),
)
def test_request_query_keys_in_any_order(
    kind: str, rid: str, operation_id: str, extra: dict[str, str], data: st.DataObject
) -> None:
    prefix = {
        "register": "$dps/registrations/PUT/iotdps-register/?",
        "poll": "$dps/registrations/GET/iotdps-get-operationstatus/?",
    }[kind]
    pairs = [("$rid", rid), *extra.items()]
    if kind == "poll":
        pairs.append(("operationId", operation_id))
    pairs = data.draw(st.permutations(pairs))
    parsed = parse_request_topic(prefix + query(pairs))
    assert parsed.kind == kind
    assert parsed.rid == rid
    assert parsed.operation_id == (operation_id if kind == "poll" else None)
    assert parsed.properties == dict(pairs)


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "$dps/registrations/PUT/iotdps-register/",  # no '?'
        "$dps/registrations/PUT/iotdps-register/?",  # no $rid
        "$dps/registrations/PUT/iotdps-register/?x=1",
        "$dps/registrations/PUT/iotdps-register/?$rid=1&$rid=2",
        "$dps/registrations/PUT/iotdps-register/?$rid=1&%24rid=1",
        "$dps/registrations/PUT/iotdps-register/?=1&$rid=1",
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1",  # no operationId
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=",
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId",
        "$dps/registrations/GET/iotdps-get-operationstatus/?operationId=" + OP_ID,
        "$dps/registrations/GET/iotdps-get-operationstatus/?$rid=1&operationId=a&operationId=b",
        "$dps/registrations/res/200/?$rid=1",
        "$dps/registrations/PUT/other/?$rid=1",
        "$dps/registrations/put/iotdps-register/?$rid=1",
        "devices/d/messages/events/",
    ],
)
def test_parse_request_topic_rejects(topic: str) -> None:
    with pytest.raises(DpsParseError):
        parse_request_topic(topic)


def test_register_topic_may_carry_an_operation_id() -> None:
    parsed = parse_request_topic("$dps/registrations/PUT/iotdps-register/?operationId=x&$rid=7")
    assert (parsed.kind, parsed.rid, parsed.operation_id) == ("register", "7", "x")


# -- query helpers -----------------------------------------------------------------------------


def test_parse_query_shapes() -> None:
    assert parse_query("") == {}
    assert parse_query("&&") == {}
    assert parse_query("k") == {"k": ""}
    assert parse_query("k=") == {"k": ""}
    assert parse_query("k=v=w") == {"k": "v=w"}
    assert parse_query("a=1&b=%26&c=%3d") == {"a": "1", "b": "&", "c": "="}
    with pytest.raises(DpsParseError):
        parse_query("a=1&a=2")
    with pytest.raises(DpsParseError):
        parse_query("=v")


@SETTINGS
@given(props=st.dictionaries(st.text(string.ascii_letters + "$-", min_size=1), st.text()))
def test_build_query_round_trip(props: dict[str, str]) -> None:
    assert parse_query(build_query(props)) == props


# -- username ----------------------------------------------------------------------------------

id_scopes = st.builds(lambda h: "0ne" + h, st.text("0123456789ABCDEF", min_size=8, max_size=8))
registration_ids = st.text(string.ascii_letters + string.digits + "-._:", min_size=1, max_size=128)
api_versions = st.sampled_from(
    [DEFAULT_API_VERSION, "2021-06-01", "2021-10-01", "2025-07-01-preview"]
)


def test_username_literal() -> None:
    assert username("0neFEEDC0DE", "myRegistrationId") == (
        "0neFEEDC0DE/registrations/myRegistrationId/api-version=2019-03-31"
    )
    assert username("0ne", "dev", "2021-06-01", "azure-iot-device/2.0 (py)") == (
        "0ne/registrations/dev/api-version=2021-06-01&ClientVersion=azure-iot-device%2F2.0%20%28py%29"
    )
    # an empty client version is left out
    assert (
        username("0ne", "dev", client_version="") == "0ne/registrations/dev/api-version=2019-03-31"
    )


@SETTINGS
@given(
    scope=id_scopes,
    reg_id=registration_ids,
    api_version=api_versions,
    client_version=st.one_of(st.none(), st.text(min_size=1)),
)
def test_username_round_trip(
    scope: str, reg_id: str, api_version: str, client_version: str | None
) -> None:
    parsed = parse_username(username(scope, reg_id, api_version, client_version))
    assert parsed.id_scope == scope
    assert parsed.registration_id == reg_id
    assert parsed.api_version == api_version
    expected = {"api-version": api_version}
    if client_version:
        expected["ClientVersion"] = client_version
    assert parsed.properties == expected


@pytest.mark.parametrize(
    ("text", "reg_id", "api", "client"),
    [
        # the C SDK's format, unencoded version number
        (
            "0ne/registrations/dev/api-version=2021-06-01&ClientVersion=1.15.0",
            "dev",
            "2021-06-01",
            "1.15.0",
        ),
        # Node/Python/C# SDKs percent-encode their user agent
        (
            "0ne/registrations/d/api-version=2019-03-31&ClientVersion=azure-iot-device%2F2.13.0",
            "d",
            "2019-03-31",
            "azure-iot-device/2.13.0",
        ),
        # ClientVersion first, and a '?' some clients put before the query
        ("0ne/registrations/d/?ClientVersion=x&api-version=2019-03-31", "d", "2019-03-31", "x"),
    ],
)
def test_parse_username_sdk_forms(text: str, reg_id: str, api: str, client: str) -> None:
    parsed = parse_username(text)
    assert (parsed.id_scope, parsed.registration_id, parsed.api_version) == ("0ne", reg_id, api)
    assert parsed.properties["ClientVersion"] == client


@pytest.mark.parametrize(
    "text",
    [
        "",
        "0ne/devices/d/api-version=1",
        "/registrations/d/api-version=1",  # empty scope
        "a/b/registrations/d/api-version=1",  # '/' in scope
        "0ne/registrations/",
        "0ne/registrations/api-version=1",  # no registration id
        "0ne/registrations//api-version=1",
        "0ne/registrations/d",  # no api-version
        "0ne/registrations/d/",
        "0ne/registrations/d/api-version=",
        "0ne/registrations/d/ClientVersion=1",
        "0ne/registrations/d/api-version=1&api-version=2",
    ],
)
def test_parse_username_rejects(text: str) -> None:
    with pytest.raises(DpsParseError):
        parse_username(text)


# -- arbitrary input -> only DpsParseError -----------------------------------------------------

PREFIXES = [
    "",
    "$dps/registrations/res/",
    "$dps/registrations/res/200/?",
    "$dps/registrations/res/202/?$rid=1&",
    "$dps/registrations/PUT/iotdps-register/?",
    "$dps/registrations/GET/iotdps-get-operationstatus/?",
    "0ne/registrations/",
    "0ne/registrations/dev/api-version=",
]
topic_like = st.builds(
    lambda prefix, text: prefix + text,
    st.sampled_from(PREFIXES),
    st.one_of(st.text(), st.text("0123456789/?&=%$#+ abcdefgiloprt-", max_size=40)),
)

PARSERS: list[Callable[[str], object]] = [
    parse_response_topic,
    parse_request_topic,
    parse_username,
    parse_query,
]


@settings(max_examples=500, deadline=None)
@given(text=topic_like)
def test_arbitrary_text_raises_only_parse_error(text: str) -> None:
    for parser in PARSERS:
        with contextlib.suppress(DpsParseError):
            parser(text)
    parse_retry_after(text)
