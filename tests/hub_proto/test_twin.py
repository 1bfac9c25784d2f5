"""Tests of hub_proto.twin: Azure's limits, its size rule, merge patches, JSON helpers."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub_proto import (
    HubParseError,
    apply_patch,
    decode_json_object,
    encode_json,
    twin_size,
    validate_reported_patch,
    validate_section,
)
from hub_proto.twin import MAX_INTEGER, MAX_REPORTED_SIZE, MIN_INTEGER

SETTINGS = settings(max_examples=150, deadline=None)


def nested(depth: int, leaf: Any = "value") -> dict[str, Any]:
    """``depth`` nested objects below the section, the innermost holding ``leaf``."""
    doc: Any = {"property": leaf}
    for level in range(depth, 0, -1):
        doc = {f"l{level}": doc}
    return dict(doc)


# -- depth ---------------------------------------------------------------------------------------


def test_depth_10_is_accepted_and_11_rejected() -> None:
    # Azure's example: objects "one" .. "ten" below the section, "property": value in "ten".
    validate_reported_patch(nested(10))
    with pytest.raises(HubParseError, match="deeper"):
        validate_reported_patch(nested(11))


def test_arrays_count_as_a_level() -> None:
    ok = nested(9, leaf=[1, 2])
    validate_reported_patch(ok)
    with pytest.raises(HubParseError):
        validate_reported_patch(nested(10, leaf=[[1]]))


# -- keys ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["a.b", "$a", "a b", "tab\t", "nul\x00", "del\x7f", "c1\x85", "", "$version"]
)
def test_bad_keys(key: str) -> None:
    with pytest.raises(HubParseError):
        validate_reported_patch({key: 1})
    with pytest.raises(HubParseError):
        validate_reported_patch({"ok": {key: 1}})


def test_key_length_boundary() -> None:
    validate_reported_patch({"k" * 1024: 1})
    validate_reported_patch({"\u00e9" * 512: 1})  # 1024 bytes of UTF-8
    with pytest.raises(HubParseError):
        validate_reported_patch({"k" * 1025: 1})
    with pytest.raises(HubParseError):
        validate_reported_patch({"\u00e9" * 513: 1})
    with pytest.raises(HubParseError):
        validate_reported_patch({1: 1})  # type: ignore[dict-item]


@pytest.mark.parametrize("key", ["a-b", "a_b", "A1", "\u00e9\u2603", "a:b", "a#b"])
def test_good_keys(key: str) -> None:
    validate_reported_patch({key: {key: True}})


# -- values --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [MIN_INTEGER, MAX_INTEGER, 0, -1.5, 1e300, True, False, None, "x" * 4096, [], {}, [1, "a"]],
)
def test_good_values(value: Any) -> None:
    validate_reported_patch({"v": value})


@pytest.mark.parametrize(
    "value",
    [MIN_INTEGER - 1, MAX_INTEGER + 1, float("nan"), float("inf"), "x" * 4097, b"x", (1,), {1}],
)
def test_bad_values(value: Any) -> None:
    with pytest.raises(HubParseError):
        validate_reported_patch({"v": value})


def test_nulls_only_in_patches() -> None:
    validate_section({"a": None}, patch=True)
    with pytest.raises(HubParseError):
        validate_section({"a": None})


def test_not_an_object() -> None:
    for bad in ([], "x", None, 1):
        with pytest.raises(HubParseError):
            validate_reported_patch(bad)  # type: ignore[arg-type]
        with pytest.raises(HubParseError):
            twin_size(bad)  # type: ignore[arg-type]


# -- size ----------------------------------------------------------------------------------------


def test_size_rule() -> None:
    assert twin_size({}) == 0
    assert twin_size({"ab": "cde"}) == 5
    assert twin_size({"n": 1, "f": 2.5, "b": True}) == 1 + 8 + 1 + 8 + 1 + 4
    assert twin_size({"o": {"in": "x"}}) == 1 + 2 + 1
    assert twin_size({"s": "a\x01\x9fb"}) == 1 + 2  # control characters do not count
    assert twin_size({"s": "\u2603"}) == 2  # characters, not bytes
    assert twin_size({"l": [1, "ab"]}) == 1 + 8 + 2
    assert twin_size({"$version": 4, "$metadata": {"x": "y"}, "a": 1}) == 9


def _sized(total: int) -> dict[str, str]:
    """A section of exactly ``total`` bytes by Azure's rule, made of 4 KB strings."""
    doc: dict[str, str] = {}
    i = 0
    while total > 0:
        key = f"k{i:04d}"
        value_len = min(4096, total - len(key))
        doc[key] = "x" * value_len
        total -= len(key) + value_len
        i += 1
    return doc


@pytest.mark.parametrize("size", [MAX_REPORTED_SIZE - 1, MAX_REPORTED_SIZE])
def test_size_at_limit_accepted(size: int) -> None:
    doc = _sized(size)
    assert twin_size(doc) == size
    assert validate_reported_patch(doc) == size


@pytest.mark.parametrize("size", [MAX_REPORTED_SIZE + 1, MAX_REPORTED_SIZE + 100])
def test_size_over_limit_rejected(size: int) -> None:
    doc = _sized(size)
    assert twin_size(doc) == size
    with pytest.raises(HubParseError, match="exceeds"):
        validate_reported_patch(doc)


def test_tags_limit() -> None:
    doc = _sized(8 * 1024 + 1)
    with pytest.raises(HubParseError):
        validate_section(doc, max_size=8 * 1024)


# -- apply_patch ---------------------------------------------------------------------------------

json_leaves = st.one_of(
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.text(max_size=5),
    st.floats(allow_nan=False, allow_infinity=False),
)
keys = st.text("abcd", min_size=1, max_size=2)
json_values = st.recursive(
    json_leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(keys, inner, max_size=3)),
    max_leaves=10,
)
docs = st.dictionaries(keys, json_values, max_size=4)
patches = st.dictionaries(
    keys,
    st.recursive(
        st.one_of(st.none(), json_leaves),
        lambda inner: st.dictionaries(keys, inner, max_size=3),
        max_leaves=8,
    ),
    max_size=4,
)


def reference_merge(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch, written from the RFC's pseudo-code."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = reference_merge(result.get(key), value)
    return result


@SETTINGS
@given(doc=docs, patch=patches)
def test_apply_patch_matches_rfc_7396(doc: dict[str, Any], patch: dict[str, Any]) -> None:
    expected = reference_merge(copy.deepcopy(doc), patch)
    target = copy.deepcopy(doc)
    assert apply_patch(target, patch) is target
    assert target == expected


@SETTINGS
@given(doc=docs, patch=patches)
def test_apply_patch_does_not_alias(doc: dict[str, Any], patch: dict[str, Any]) -> None:
    before = json.dumps(patch, sort_keys=True)
    target = apply_patch(copy.deepcopy(doc), patch)
    for value in target.values():
        if isinstance(value, dict):
            value["zz"] = 1  # mutate the result...
    assert json.dumps(patch, sort_keys=True) == before  # ...the patch is untouched


def test_apply_patch_examples() -> None:
    doc: dict[str, Any] = {"a": 1, "o": {"x": 1, "y": 2}, "$version": 3}
    apply_patch(doc, {"a": None, "o": {"x": None, "z": 3}, "n": {"p": None, "q": 1}})
    assert doc == {"o": {"y": 2, "z": 3}, "$version": 3, "n": {"q": 1}}
    with pytest.raises(HubParseError):
        apply_patch([], {})  # type: ignore[arg-type]


# -- JSON helpers --------------------------------------------------------------------------------


@SETTINGS
@given(doc=docs)
def test_json_round_trip(doc: dict[str, Any]) -> None:
    assert decode_json_object(encode_json(doc)) == doc


@pytest.mark.parametrize(
    "payload", [b"", b"[]", b"1", b"null", b"{", b"\xff", b'"x"', b"[" * 100000]
)
def test_decode_json_object_rejects(payload: bytes) -> None:
    with pytest.raises(HubParseError):
        decode_json_object(payload)


@SETTINGS
@given(payload=st.binary(max_size=64))
def test_decode_json_arbitrary_bytes(payload: bytes) -> None:
    with contextlib.suppress(HubParseError):
        assert isinstance(decode_json_object(payload), dict)


@SETTINGS
@given(value=st.one_of(json_values, st.dictionaries(st.text(), json_values), st.text()))
def test_validate_arbitrary_json_only_parse_error(value: Any) -> None:
    with contextlib.suppress(HubParseError):
        validate_reported_patch(value)
    with contextlib.suppress(HubParseError):
        twin_size(value)


def test_encode_json_rejects() -> None:
    for bad in ({"a": float("nan")}, {"a": object()}, {"a": b"x"}):
        with pytest.raises(HubParseError):
            encode_json(bad)
