"""tpm.marshal: TPM2B_PUBLIC / TPMT_PUBLIC round trips, Names, and only TpmBlobError on bad bytes.

tpm2-pytss (the tpm2-tss marshaller) is the reference: our bytes must unmarshal there unchanged and
our Names must equal its ``get_name()``.
"""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tpm import marshal as m
from tpm.errors import TpmBlobError

# A real SRK (Azure template) as swtpm created it: RSA-2048, exponent 0, unique = modulus.
SRK_TEMPLATE = m.TpmtPublic(
    m.ALG_RSA,
    m.ALG_SHA256,
    m.SRK_OBJECT_ATTRIBUTES,
    b"",
    m.RsaParms(m.AES_128_CFB, m.ALG_NULL, 0, 2048, 0),
    b"",
)
# Azure's SRK template marshalled by tpm2-pytss, and its Name by TPM2B_PUBLIC.get_name().
SRK_TEMPLATE_BYTES = bytes.fromhex("001a0001000b00030472000000060080004300100800000000000000")
SRK_TEMPLATE_NAME = bytes.fromhex(
    "000b9e7ad6dcfa20f03935e9200d649a297669ef1cdebc631a53d90521bf0fe0a16b"
)

hash_algs = st.sampled_from([m.ALG_SHA1, m.ALG_SHA256, m.ALG_SHA384, m.ALG_SHA512])
u16 = st.integers(0, 0xFFFF)
sym_defs = st.one_of(
    st.just(m.SymDef()),
    st.builds(
        m.SymDef,
        st.sampled_from([m.ALG_AES, m.ALG_SM4, m.ALG_CAMELLIA]),
        st.sampled_from([128, 192, 256]),
        st.sampled_from([m.ALG_CFB, 0x0040, 0x0041, 0x0042, 0x0044]),
    ),
)
rsa_schemes = st.one_of(
    st.tuples(st.sampled_from([m.ALG_NULL, m.ALG_RSAES]), st.just(0)),
    st.tuples(st.sampled_from([m.ALG_RSASSA, m.ALG_RSAPSS, m.ALG_OAEP]), hash_algs),
)
keyedhash_parms = st.one_of(
    st.just(m.KeyedHashParms(m.ALG_NULL)),
    st.builds(m.KeyedHashParms, st.just(m.ALG_HMAC), hash_algs),
    st.builds(m.KeyedHashParms, st.just(m.ALG_XOR), hash_algs, st.just(m.ALG_KDF1_SP800_108)),
)


@st.composite
def rsa_publics(draw: st.DrawFn) -> m.TpmtPublic:
    scheme, scheme_hash = draw(rsa_schemes)
    modulus = draw(st.binary(max_size=m.MAX_RSA_KEY_BYTES))
    parms = m.RsaParms(
        draw(sym_defs),
        scheme,
        scheme_hash,
        draw(st.sampled_from([1024, 2048, 3072, 4096])),
        draw(st.sampled_from([0, 3, 65537, 0xFFFF_FFFF])),
    )
    return m.TpmtPublic(
        m.ALG_RSA,
        draw(hash_algs),
        draw(st.integers(0, 0xFFFF_FFFF)),
        draw(st.binary(max_size=m.MAX_DIGEST_SIZE)),
        parms,
        modulus,
    )


keyedhash_publics = st.builds(
    m.TpmtPublic,
    st.just(m.ALG_KEYEDHASH),
    hash_algs,
    st.integers(0, 0xFFFF_FFFF),
    st.binary(max_size=m.MAX_DIGEST_SIZE),
    keyedhash_parms,
    st.binary(max_size=m.MAX_DIGEST_SIZE),
)
publics = st.one_of(rsa_publics(), keyedhash_publics)


@given(publics)
def test_build_parse_round_trip(public: m.TpmtPublic) -> None:
    data = m.build_public(public)
    assert m.parse_public(data) == public
    assert m.build_public(m.parse_public(data)) == data
    assert m.parse_tpmt_public(data[2:]) == public
    assert m.build_tpmt_public(public) == data[2:]
    assert int.from_bytes(data[:2], "big") == len(data) - 2


@given(publics)
def test_name_is_namealg_and_hash_of_tpmt(public: m.TpmtPublic) -> None:
    data = m.build_public(public)
    digest = hashlib.new(m.HASH_NAMES[public.name_alg], data[2:]).digest()
    assert m.name(data) == public.name_alg.to_bytes(2, "big") + digest
    assert m.name(public) == m.name(data)


def test_known_answer_srk_template() -> None:
    assert m.build_public(SRK_TEMPLATE) == SRK_TEMPLATE_BYTES
    assert m.parse_public(SRK_TEMPLATE_BYTES) == SRK_TEMPLATE
    assert m.name(SRK_TEMPLATE_BYTES) == SRK_TEMPLATE_NAME
    assert m.rsa_public(b"", key_bits=2048, object_attributes=m.SRK_OBJECT_ATTRIBUTES) == (
        SRK_TEMPLATE
    )


@given(st.binary(max_size=400))
def test_arbitrary_bytes_raise_only_blob_error(data: bytes) -> None:
    for parse in (m.parse_public, m.parse_tpmt_public, m.name, m.rsa_public_key):
        with contextlib.suppress(TpmBlobError):
            parse(data)


@given(publics, st.data())
def test_mutated_publics_raise_only_blob_error(public: m.TpmtPublic, data: st.DataObject) -> None:
    raw = bytearray(m.build_public(public))
    position = data.draw(st.integers(0, len(raw) - 1))
    raw[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw) + 2))
    for candidate in (bytes(raw), bytes(raw[:cut]), bytes(raw) + b"\x00"):
        with contextlib.suppress(TpmBlobError):
            m.name(candidate)
        with contextlib.suppress(TpmBlobError):
            m.rsa_public_key(candidate)


@pytest.mark.parametrize("cut", range(len(SRK_TEMPLATE_BYTES)))
def test_every_truncation_is_rejected(cut: int) -> None:
    with pytest.raises(TpmBlobError):
        m.parse_public(SRK_TEMPLATE_BYTES[:cut])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (SRK_TEMPLATE_BYTES + b"\x00", "trailing"),
        (b"\x00\x1b" + SRK_TEMPLATE_BYTES[2:] + b"\x00", "trailing"),
        (b"\x00\x1b" + SRK_TEMPLATE_BYTES[2:], "truncated"),
        (bytes.fromhex("000a0023000b000000000000"), "unsupported object type 0x0023"),
        (bytes.fromhex("001a0001000b00030472000000250080004300100800000000000000"), "0x0025"),
        (bytes.fromhex("001a0001000b00030472000000100080004300100800000000000000"), "0x0080"),
        (bytes.fromhex("001a0001000b00030472000000060080004300990800000000000000"), "0x0099"),
        (bytes.fromhex("000a0008000b000000000041"), "authPolicy of 65 bytes exceeds 64"),
        (bytes.fromhex("000c0008000b0000000000000099"), "keyed-hash scheme 0x0099"),
    ],
)
def test_specific_rejections(data: bytes, message: str) -> None:
    with pytest.raises(TpmBlobError, match=message):
        m.parse_public(data)


def test_build_rejects_what_parse_would() -> None:
    bad = [
        SRK_TEMPLATE.__class__(**{**SRK_TEMPLATE.__dict__, "unique": bytes(513)}),
        m.TpmtPublic(m.ALG_KEYEDHASH, m.ALG_SHA256, 0, b"", SRK_TEMPLATE.parameters, b""),
        m.TpmtPublic(m.ALG_RSA, 0x10000, 0, b"", SRK_TEMPLATE.parameters, b""),
        m.TpmtPublic(m.ALG_KEYEDHASH, m.ALG_SHA256, -1, b"", m.KeyedHashParms(m.ALG_NULL), b""),
        m.TpmtPublic(m.ALG_KEYEDHASH, m.ALG_SHA256, 0, b"", m.KeyedHashParms(m.ALG_NULL, 1), b""),
        m.keyedhash_public(bytes(65), object_attributes=0),
        m.rsa_public(b"", key_bits=2048, object_attributes=0, symmetric=m.SymDef(m.ALG_NULL, 128)),
        m.rsa_public(b"", key_bits=2048, object_attributes=0, symmetric=m.SymDef(m.ALG_XOR, 1, 1)),
    ]
    for public in bad:
        with pytest.raises(TpmBlobError):
            m.build_public(public)


def test_rsa_public_key() -> None:
    modulus = (1 << 2047 | 12345).to_bytes(256, "big")
    data = m.build_public(m.rsa_public(modulus, object_attributes=m.EK_OBJECT_ATTRIBUTES))
    assert m.rsa_public_key(data) == (int.from_bytes(modulus, "big"), 65537)
    data = m.build_public(m.rsa_public(modulus, object_attributes=0, exponent=3))
    assert m.rsa_public_key(data) == (int.from_bytes(modulus, "big"), 3)
    with pytest.raises(TpmBlobError, match="does not match keyBits"):
        m.rsa_public_key(SRK_TEMPLATE_BYTES)
    with pytest.raises(TpmBlobError, match="not an RSA key"):
        m.rsa_public_key(m.build_public(m.keyedhash_public(bytes(32), object_attributes=0)))


def test_name_rejects_unknown_name_alg() -> None:
    public = m.keyedhash_public(b"", object_attributes=0, hash_alg=m.ALG_NULL)
    with pytest.raises(TpmBlobError, match="unsupported hash algorithm 0x0010"):
        m.name(m.build_public(public))


# -- cross-checks against tpm2-pytss (the tpm2-tss marshaller) ------------------------------------


def test_ek_and_identity_key_match_tpm2_pytss() -> None:
    tss = pytest.importorskip("tpm2_pytss")
    from tpm2_pytss.utils import NoSuchIndex, create_ek_template

    def no_nv(index: int) -> bytes:
        raise NoSuchIndex(index)

    _, ek_template = create_ek_template("EK-RSA2048", no_nv)
    ek_template.publicArea.unique.rsa = bytes(range(256))
    ek_bytes = ek_template.marshal()
    ek = m.parse_public(ek_bytes)
    assert ek == m.rsa_public(
        bytes(range(256)), object_attributes=m.EK_OBJECT_ATTRIBUTES, auth_policy=m.EK_AUTH_POLICY
    )
    assert m.build_public(ek) == ek_bytes
    assert m.name(ek_bytes) == bytes(ek_template.get_name())

    scheme = tss.TPMT_KEYEDHASH_SCHEME(scheme=tss.TPM2_ALG.HMAC)
    scheme.details.hmac.hashAlg = tss.TPM2_ALG.SHA256
    attributes = tss.TPMA_OBJECT.SIGN_ENCRYPT | tss.TPMA_OBJECT.USERWITHAUTH
    sensitive, public = tss.TPM2B_SENSITIVE.keyedhash_from_secret(
        bytes(32), objectAttributes=attributes, scheme=scheme
    )
    seed = bytes(sensitive.sensitiveArea.seedValue)
    expected = m.keyedhash_public(
        hashlib.sha256(seed + bytes(32)).digest(),
        object_attributes=m.SIGN_ENCRYPT | m.USER_WITH_AUTH,
    )
    assert m.parse_public(public.marshal()) == expected
    assert m.build_public(expected) == public.marshal()
    assert m.name(expected) == bytes(public.get_name())


@given(publics)
def test_tpm2_pytss_unmarshals_our_bytes_unchanged(public: m.TpmtPublic) -> None:
    tss = pytest.importorskip("tpm2_pytss")
    data = m.build_public(public)
    theirs, consumed = tss.TPM2B_PUBLIC.unmarshal(data)
    assert consumed == len(data)
    assert theirs.marshal() == data
    assert bytes(theirs.get_name()) == m.name(data)
