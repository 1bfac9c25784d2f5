"""tpm.blob: the activation blob's six TPM2Bs, strict parsing, only TpmBlobError on bad bytes."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tpm import marshal as m
from tpm.blob import ActivationBlob, build_activation_blob, parse_activation_blob
from tpm.errors import TpmBlobError

ID_PUBLIC = m.build_public(
    m.keyedhash_public(bytes(range(32)), object_attributes=m.SIGN_ENCRYPT | m.USER_WITH_AUTH)
)
SAMPLE = ActivationBlob(
    id_object=m.tpm2b(b"\x00\x02ab" + b"enc"),
    encrypted_secret=m.tpm2b(b"S" * 5),
    duplicate=m.tpm2b(b"\x00\x01hdup"),
    sym_seed=m.tpm2b(b"s" * 3),
    public=ID_PUBLIC,
    data=m.tpm2b(b"uri"),
)
SAMPLE_BYTES = build_activation_blob(SAMPLE)
WITHOUT_DATA = SAMPLE_BYTES[: -len(SAMPLE.data)]

payloads = st.binary(min_size=1, max_size=300).map(m.tpm2b)
blobs = st.builds(
    ActivationBlob,
    id_object=payloads,
    encrypted_secret=payloads,
    duplicate=payloads,
    sym_seed=payloads,
    public=st.just(ID_PUBLIC),
    data=st.binary(max_size=64).map(m.tpm2b),
)


def test_sample_layout() -> None:
    assert b"".join(dataclasses.astuple(SAMPLE)) == SAMPLE_BYTES
    assert parse_activation_blob(SAMPLE_BYTES) == SAMPLE


@given(blobs)
def test_round_trip(blob: ActivationBlob) -> None:
    data = build_activation_blob(blob)
    assert parse_activation_blob(data) == blob
    assert build_activation_blob(parse_activation_blob(data)) == data


def test_missing_data_reads_as_empty() -> None:
    blob = parse_activation_blob(WITHOUT_DATA)
    assert blob.data == b"\x00\x00"
    assert blob == dataclasses.replace(SAMPLE, data=b"\x00\x00")
    assert build_activation_blob(blob) == WITHOUT_DATA + b"\x00\x00"


def test_empty_data_round_trips() -> None:
    data = WITHOUT_DATA + b"\x00\x00"
    assert build_activation_blob(parse_activation_blob(data)) == data


@pytest.mark.parametrize("cut", range(len(SAMPLE_BYTES)))
def test_every_truncation_is_rejected_except_before_data(cut: int) -> None:
    if cut == len(WITHOUT_DATA):
        assert parse_activation_blob(SAMPLE_BYTES[:cut]).data == b"\x00\x00"
    else:
        with pytest.raises(TpmBlobError):
            parse_activation_blob(SAMPLE_BYTES[:cut])


@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00", b"garbage"])
def test_trailing_bytes_are_rejected(extra: bytes) -> None:
    with pytest.raises(TpmBlobError, match="trailing"):
        parse_activation_blob(SAMPLE_BYTES + extra)


@pytest.mark.parametrize("field", ["id_object", "encrypted_secret", "duplicate", "sym_seed"])
def test_empty_required_field_is_rejected(field: str) -> None:
    blob = dataclasses.replace(SAMPLE, **{field: b"\x00\x00"})
    raw = b"".join(dataclasses.astuple(blob))
    with pytest.raises(TpmBlobError, match=f"{field} is empty"):
        parse_activation_blob(raw)
    with pytest.raises(TpmBlobError, match=f"{field} is empty"):
        build_activation_blob(blob)


def test_public_must_be_a_tpm2b_public() -> None:
    blob = dataclasses.replace(SAMPLE, public=m.tpm2b(b"not a public area"))
    with pytest.raises(TpmBlobError):
        parse_activation_blob(b"".join(dataclasses.astuple(blob)))
    with pytest.raises(TpmBlobError):
        build_activation_blob(blob)


@pytest.mark.parametrize("offset", [0, len(SAMPLE.id_object)])
def test_size_beyond_buffer_is_rejected(offset: int) -> None:
    raw = bytearray(SAMPLE_BYTES)
    raw[offset : offset + 2] = b"\xff\xff"
    with pytest.raises(TpmBlobError, match="truncated"):
        parse_activation_blob(bytes(raw))


@pytest.mark.parametrize(
    "bad",
    [b"", b"\x00", b"\x00\x03ab", b"\x00\x01ab", b"ab"],
    ids=["empty", "1", "short", "long", "x"],
)
def test_build_rejects_fields_that_are_not_one_tpm2b(bad: bytes) -> None:
    for field in ("id_object", "data"):
        with pytest.raises(TpmBlobError):
            build_activation_blob(dataclasses.replace(SAMPLE, **{field: bad}))


@given(st.binary(max_size=600))
def test_arbitrary_bytes_raise_only_blob_error(data: bytes) -> None:
    try:
        blob = parse_activation_blob(data)
    except TpmBlobError:
        return
    assert build_activation_blob(blob) in (data, data + b"\x00\x00")


@given(blobs, st.data())
def test_mutations_raise_only_blob_error(blob: ActivationBlob, data: st.DataObject) -> None:
    raw = bytearray(build_activation_blob(blob))
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(raw) - 1))
        raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    tail = data.draw(st.binary(max_size=4))
    for candidate in (bytes(raw), bytes(raw[:cut]), bytes(raw) + tail):
        with contextlib.suppress(TpmBlobError):
            parse_activation_blob(candidate)


def test_fields_unmarshal_in_tpm2_pytss_exactly() -> None:
    tss = pytest.importorskip("tpm2_pytss")
    types = {
        "id_object": tss.TPM2B_ID_OBJECT,
        "encrypted_secret": tss.TPM2B_ENCRYPTED_SECRET,
        "duplicate": tss.TPM2B_PRIVATE,
        "sym_seed": tss.TPM2B_ENCRYPTED_SECRET,
        "public": tss.TPM2B_PUBLIC,
        "data": tss.TPM2B_DATA,
    }
    blob = parse_activation_blob(SAMPLE_BYTES)
    for field, cls in types.items():
        raw = getattr(blob, field)
        value, consumed = cls.unmarshal(raw)
        assert consumed == len(raw)
        assert value.marshal() == raw
