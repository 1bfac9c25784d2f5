"""Tests of hub_proto.properties: property bags with RFC 3986 percent-encoding."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub_proto import HubParseError, decode_properties, encode_properties
from hub_proto.properties import encode_component

from .strategies import SPECIAL, bags

SETTINGS = settings(max_examples=200, deadline=None)


def test_literal_encoding() -> None:
    assert encode_properties({}) == ""
    assert encode_properties({"a": "1", "b": None, "c": ""}) == "a=1&b&c="
    assert encode_properties({"$.mid": "x y"}) == "%24.mid=x%20y"
    assert encode_properties({"k": "&=/?%#+"}) == "k=%26%3D%2F%3F%25%23%2B"
    assert encode_properties({"\u00e9": "\u2603"}) == "%C3%A9=%E2%98%83"
    assert encode_component("A-z0.9_~") == "A-z0.9_~"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("?", {}),
        ("&&", {}),
        ("?prop1&prop2=&prop3=a%20string", {"prop1": None, "prop2": "", "prop3": "a string"}),
        ("k=v=w", {"k": "v=w"}),
        ("a=1&b=%26&c=%3d", {"a": "1", "b": "&", "c": "="}),
        ("%24.mid=1", {"$.mid": "1"}),
        ("$.mid=1", {"$.mid": "1"}),
        ("a=b+c", {"a": "b+c"}),  # '+' is not a space
        ("a=%zz", {"a": "%zz"}),  # a broken escape stays as it is
        ("a=%E9", {"a": "\ufffd"}),  # invalid UTF-8 is replaced, not an exception
        ("?a=1&", {"a": "1"}),
    ],
)
def test_decode_examples(text: str, expected: dict[str, str | None]) -> None:
    assert decode_properties(text) == expected


@pytest.mark.parametrize("text", ["=v", "a=1&a=2", "a&a=", "%24.mid=1&$.mid=2", "a=1&%61=2", "?=x"])
def test_decode_rejects(text: str) -> None:
    with pytest.raises(HubParseError):
        decode_properties(text)


@pytest.mark.parametrize("props", [{"": "v"}, {"k": 1}, {1: "v"}, {"\ud800": "v"}, {"k": "\udfff"}])
def test_encode_rejects(props: dict[object, object]) -> None:
    with pytest.raises(HubParseError):
        encode_properties(props)  # type: ignore[arg-type]


def test_decode_rejects_non_strings() -> None:
    with pytest.raises(HubParseError):
        decode_properties(b"a=1")  # type: ignore[arg-type]


@SETTINGS
@given(bag=bags, leading=st.sampled_from(["", "?"]))
def test_round_trip(bag: dict[str, str | None], leading: str) -> None:
    assert decode_properties(leading + encode_properties(bag)) == bag


@SETTINGS
@given(bag=bags)
def test_encoded_bag_has_no_raw_specials(bag: dict[str, str | None]) -> None:
    encoded = encode_properties(bag)
    assert not set(encoded) & set("/?#+ $") - {"="}
    assert encoded.isascii()


@SETTINGS
@given(key=st.text(min_size=1), value=st.text())
def test_key_vs_key_equals(key: str, value: str) -> None:
    assert decode_properties(encode_properties({key: None})) == {key: None}
    assert decode_properties(encode_properties({key: ""})) == {key: ""}


@SETTINGS
@given(text=st.one_of(st.text(), st.text(SPECIAL + "=&%0123456789abcdefABCDEF")))
def test_arbitrary_input_only_parse_error(text: str) -> None:
    try:
        decoded = decode_properties(text)
    except HubParseError:
        return
    assert all(isinstance(k, str) and k for k in decoded)
