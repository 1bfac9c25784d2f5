"""Hypothesis strategies shared by the hub_proto tests."""

from __future__ import annotations

import string

from hypothesis import strategies as st

from hub_proto.message import RESERVED_KEYS, Message

ID_ALPHABET = string.ascii_letters + string.digits + "-:.+%_#*?!(),=@;$'"
#: Characters that are special somewhere in topics, bags or queries.
SPECIAL = "&=/?%#+$ .\u00e9\u2603\U0001f600"

device_ids = st.text(ID_ALPHABET, min_size=1, max_size=128)
#: Arbitrary unicode (no lone surrogates: they cannot be UTF-8) plus a dense special-char mix.
texts = st.one_of(st.text(), st.text(SPECIAL, min_size=1))
nonempty_texts = st.one_of(st.text(min_size=1), st.text(SPECIAL, min_size=1))
rids = st.one_of(nonempty_texts, st.integers(1, 65535).map(str), st.uuids().map(str))
versions = st.one_of(st.integers(0, 1000), st.integers(0, 2**63 - 1))

bags = st.dictionaries(nonempty_texts, st.one_of(st.none(), texts), max_size=6)

app_keys = nonempty_texts.filter(lambda k: k not in RESERVED_KEYS)
optional_texts = st.one_of(st.none(), texts)

messages = st.builds(
    Message,
    payload=st.binary(max_size=64),
    properties=st.dictionaries(app_keys, texts, max_size=5),
    message_id=optional_texts,
    correlation_id=optional_texts,
    user_id=optional_texts,
    content_type=st.one_of(st.none(), st.sampled_from(["application/json", "text/plain"])),
    content_encoding=st.one_of(st.none(), st.just("utf-8")),
    creation_time=st.one_of(st.none(), st.just("2021-04-21T11:30:16Z")),
    expiry_time=optional_texts,
    component=optional_texts,
    output_name=optional_texts,
)
