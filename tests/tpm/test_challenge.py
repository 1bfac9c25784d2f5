"""tpm.challenge: the DPS service side, proven three ways.

(a) ``software_activate`` below undoes the construction with the EK/SRK private keys (independent
    code: cryptography's KBKDF and CFB, our own parsing of the wrappers) and checks every HMAC;
(b) the blob is byte-identical to tpm2-pytss ``wrap`` + ``make_credential`` given the same seeds;
(c) a real TPM (swtpm) activates and imports it, and its in-TPM HMAC equals ``hmac(challenge.key)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import os
import secrets
import struct
from collections.abc import Callable, Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.kbkdf import KBKDFHMAC, CounterLocation, Mode
from hypothesis import given, settings
from hypothesis import strategies as st

from tpm import marshal as m
from tpm.blob import ActivationBlob, build_activation_blob, parse_activation_blob
from tpm.challenge import (
    IDENTITY_KEY_ATTRIBUTES,
    MAX_KEY_SIZE,
    TpmChallenge,
    aes_cfb,
    create_challenge,
    kdfa,
)
from tpm.device import TpmDevice
from tpm.errors import TpmActivationError, TpmBlobError
from tpm.swtpm import SwtpmProcess

try:
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # cryptography < 43
    from cryptography.hazmat.primitives.ciphers.modes import CFB


# -- an independent software "device TPM" ---------------------------------------------------------


def _kdfa(seed: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    kdf = KBKDFHMAC(
        algorithm=hashes.SHA256(),
        mode=Mode.CounterMode,
        length=bits // 8,
        rlen=4,
        llen=4,
        location=CounterLocation.BeforeFixed,
        label=label,
        context=context,
        fixed=None,
    )
    return kdf.derive(seed)


def _cfb_decrypt(key: bytes, data: bytes) -> bytes:
    return Cipher(algorithms.AES(key), CFB(bytes(16))).decryptor().update(data)


def _oaep_decrypt(key: rsa.RSAPrivateKey, label: bytes, data: bytes) -> bytes:
    return key.decrypt(data, padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), label))


def _split(data: bytes) -> tuple[bytes, bytes]:
    """(payload of the leading TPM2B, rest)."""
    (size,) = struct.unpack(">H", data[:2])
    assert len(data) >= 2 + size
    return data[2 : 2 + size], data[2 + size :]


def _unwrap(seed: bytes, object_name: bytes, wrapped: bytes) -> bytes:
    """Check the outer HMAC of ``TPM2B_DIGEST(hmac) || encrypted`` and decrypt it."""
    integrity, encrypted = _split(wrapped)
    hmac_key = _kdfa(seed, b"INTEGRITY", b"", 256)
    expected = hmac.new(hmac_key, encrypted + object_name, hashlib.sha256).digest()
    assert hmac.compare_digest(integrity, expected), "outer integrity HMAC"
    return _cfb_decrypt(_kdfa(seed, b"STORAGE", object_name, 128), encrypted)


def software_activate(
    blob: bytes,
    ek_private_key: rsa.RSAPrivateKey,
    srk_private_key: rsa.RSAPrivateKey,
    srk_public: bytes,
) -> bytes:
    """ActivateCredential + Import in software: the identity key, after every integrity check."""
    parts = parse_activation_blob(blob)
    # ActivateCredential: the credential is bound to the SRK's Name.
    cred_seed = _oaep_decrypt(ek_private_key, b"IDENTITY\x00", _split(parts.encrypted_secret)[0])
    id_object, rest = _split(parts.id_object)
    assert rest == b""
    inner_key, rest = _split(_unwrap(cred_seed, m.name(srk_public), id_object))
    assert rest == b""
    assert len(inner_key) == 16
    # Import: outer wrapper (seed for the SRK), inner wrapper (inner key), then TPMT_SENSITIVE.
    public = m.parse_public(parts.public)
    assert public.type == m.ALG_KEYEDHASH
    assert public.object_attributes == m.SIGN_ENCRYPT | m.USER_WITH_AUTH
    assert public.parameters == m.KeyedHashParms(m.ALG_HMAC, m.ALG_SHA256)
    assert public.auth_policy == b""
    id_name = m.name(parts.public)
    dup_seed = _oaep_decrypt(srk_private_key, b"DUPLICATE\x00", _split(parts.sym_seed)[0])
    duplicate, rest = _split(parts.duplicate)
    assert rest == b""
    plain = _cfb_decrypt(inner_key, _unwrap(dup_seed, id_name, duplicate))
    integrity, sensitive2b = _split(plain)
    assert integrity == hashlib.sha256(sensitive2b + id_name).digest(), "inner integrity"
    sensitive, rest = _split(sensitive2b)
    assert rest == b""
    assert sensitive[:2] == m.ALG_KEYEDHASH.to_bytes(2, "big")
    auth_value, rest = _split(sensitive[2:])
    seed_value, rest = _split(rest)
    key, rest = _split(rest)
    assert (auth_value, rest, len(seed_value)) == (b"", b"", 32)
    assert public.unique == hashlib.sha256(seed_value + key).digest()
    return key


# -- software keys shaped like Azure's EK and SRK -------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SoftTpm:
    ek_private: rsa.RSAPrivateKey
    srk_private: rsa.RSAPrivateKey
    ek: bytes
    srk: bytes


def _public_bytes(key: rsa.RSAPrivateKey, *, ek: bool) -> bytes:
    numbers = key.public_key().public_numbers()
    modulus = numbers.n.to_bytes(256, "big")
    if ek:
        public = m.rsa_public(
            modulus, object_attributes=m.EK_OBJECT_ATTRIBUTES, auth_policy=m.EK_AUTH_POLICY
        )
    else:
        public = m.rsa_public(modulus, object_attributes=m.SRK_OBJECT_ATTRIBUTES)
    return m.build_public(public)


@pytest.fixture(scope="module")
def soft() -> SoftTpm:
    ek = rsa.generate_private_key(65537, 2048)
    srk = rsa.generate_private_key(65537, 2048)
    return SoftTpm(ek, srk, _public_bytes(ek, ek=True), _public_bytes(srk, ek=False))


def _sequence(*values: bytes) -> Callable[[int], bytes]:
    """An rng that hands out ``values`` in order, checking each requested size."""
    pending = list(values)

    def rng(size: int) -> bytes:
        value = pending.pop(0)
        assert len(value) == size
        return value

    return rng


# -- (a) software round trip ----------------------------------------------------------------------


def test_software_activation_recovers_the_key(soft: SoftTpm) -> None:
    challenge = create_challenge(soft.ek, soft.srk)
    assert len(challenge.key) == 32
    key = software_activate(challenge.blob, soft.ek_private, soft.srk_private, soft.srk)
    assert key == challenge.key


@settings(max_examples=20, deadline=None)
@given(st.binary(min_size=1, max_size=MAX_KEY_SIZE))
def test_software_activation_any_key(soft: SoftTpm, key: bytes) -> None:
    challenge = create_challenge(soft.ek, soft.srk, key=key)
    assert challenge.key == key
    assert software_activate(challenge.blob, soft.ek_private, soft.srk_private, soft.srk) == key


def test_blob_layout(soft: SoftTpm) -> None:
    blob = parse_activation_blob(create_challenge(soft.ek, soft.srk).blob)
    assert len(blob.encrypted_secret) == len(blob.sym_seed) == 2 + 256
    assert len(blob.id_object) == 2 + (2 + 32) + (2 + 16)
    assert blob.data == b"\x00\x00"
    public = m.parse_public(blob.public)
    assert public.object_attributes == IDENTITY_KEY_ATTRIBUTES == m.SIGN_ENCRYPT | m.USER_WITH_AUTH


def test_each_challenge_is_fresh(soft: SoftTpm) -> None:
    first, second = create_challenge(soft.ek, soft.srk), create_challenge(soft.ek, soft.srk)
    assert first.key != second.key
    assert first.blob != second.blob


def test_binding_to_the_wrong_srk_fails_the_integrity_check(soft: SoftTpm) -> None:
    challenge = create_challenge(soft.ek, soft.srk)
    other = _public_bytes(rsa.generate_private_key(65537, 2048), ek=False)
    with pytest.raises(AssertionError, match="outer integrity HMAC"):
        software_activate(challenge.blob, soft.ek_private, soft.srk_private, other)


def test_repr_hides_the_key() -> None:
    challenge = TpmChallenge(blob=b"x" * 10, key=b"secret-key")
    assert "secret" not in repr(challenge)
    assert "10 bytes" in repr(challenge)


# -- primitives: known answers and an independent implementation ----------------------------------


def test_aes_cfb_nist_sp800_38a_f3_13() -> None:
    key = bytes.fromhex("2b7e151628aed2a6abf7158809cf4f3c")
    plain = bytes.fromhex(
        "6bc1bee22e409f96e93d7e117393172aae2d8a571e03ac9c9eb76fac45af8e51"
        "30c81c46a35ce411e5fbc1191a0a52eff69f2445df4f9b17ad2b417be66c3710"
    )
    cipher = bytes.fromhex(
        "3b3fd92eb72dad20333449f8e83cfb4ac8a64537a0b3a93fcde3cdad9f1ce58b"
        "26751f67a3cbb140b1808cf187a4f4dfc04b05357c5d1c0eeac4c66f9ff7f2e6"
    )
    assert aes_cfb(key, plain, iv=bytes(range(16))) == cipher
    assert aes_cfb(key, cipher, iv=bytes(range(16)), decrypt=True) == plain


@given(st.binary(min_size=16, max_size=16), st.binary(max_size=100))
def test_aes_cfb_matches_cryptography(key: bytes, data: bytes) -> None:
    encrypted = aes_cfb(key, data)
    assert encrypted == Cipher(algorithms.AES(key), CFB(bytes(16))).encryptor().update(data)
    assert aes_cfb(key, encrypted, decrypt=True) == data


@given(
    st.binary(min_size=1, max_size=64),
    st.sampled_from([b"STORAGE", b"INTEGRITY", b"x"]),
    st.binary(max_size=40),
    st.binary(max_size=40),
    st.integers(1, 80).map(lambda n: 8 * n),
)
def test_kdfa_matches_kbkdf(key: bytes, label: bytes, u: bytes, v: bytes, bits: int) -> None:
    # cryptography's KBKDF puts the 0x00 separator between label and context itself.
    assert kdfa(key, label, u, v, bits) == _kdfa(key, label, u + v, bits)


# -- bad input ------------------------------------------------------------------------------------


def _variant(public: bytes, **changes: object) -> bytes:
    return m.build_public(dataclasses.replace(m.parse_public(public), **changes))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("role", "change", "message"),
    [
        ("EK", {"name_alg": m.ALG_SHA1}, "unsupported EK: nameAlg 0x0004 is not SHA-256"),
        ("SRK", {"name_alg": m.ALG_SHA384}, "unsupported SRK: nameAlg"),
        ("EK", {"object_attributes": m.SIGN_ENCRYPT}, "restricted decryption"),
        ("SRK", {"object_attributes": m.DECRYPT}, "restricted decryption"),
        ("EK", {"unique": b"\x01" * 255}, "does not match keyBits"),
        ("SRK", {"unique": bytes(256)}, "unsupported SRK"),
    ],
)
def test_unsupported_keys(
    soft: SoftTpm, role: str, change: dict[str, object], message: str
) -> None:
    ek, srk = soft.ek, soft.srk
    if role == "EK":
        ek = _variant(ek, **change)
    else:
        srk = _variant(srk, **change)
    with pytest.raises(TpmBlobError, match=message):
        create_challenge(ek, srk)


def test_unsupported_symmetric_and_types(soft: SoftTpm) -> None:
    parms = m.parse_public(soft.ek).parameters
    assert isinstance(parms, m.RsaParms)
    aes256 = dataclasses.replace(parms, symmetric=m.SymDef(m.ALG_AES, 256, m.ALG_CFB))
    with pytest.raises(TpmBlobError, match="unsupported EK: symmetric"):
        create_challenge(_variant(soft.ek, parameters=aes256), soft.srk)
    hmac_key = m.build_public(m.keyedhash_public(bytes(32), object_attributes=m.SIGN_ENCRYPT))
    with pytest.raises(TpmBlobError, match="unsupported SRK: type 0x0008 is not RSA"):
        create_challenge(soft.ek, hmac_key)


def test_rsa_key_too_small_for_oaep(soft: SoftTpm) -> None:
    small = (1 << 511 | 0xABCDEF).to_bytes(64, "big")  # odd, so cryptography takes it as a key
    srk = m.build_public(m.rsa_public(small, object_attributes=m.SRK_OBJECT_ATTRIBUTES))
    with pytest.raises(TpmBlobError, match="unsupported SRK: RSA-OAEP encryption failed"):
        create_challenge(soft.ek, srk)


@pytest.mark.parametrize("size", [0, MAX_KEY_SIZE + 1])
def test_key_length_limits(soft: SoftTpm, size: int) -> None:
    with pytest.raises(TpmBlobError, match="identity key must be"):
        create_challenge(soft.ek, soft.srk, key=bytes(size))


def test_short_rng_is_refused(soft: SoftTpm) -> None:
    with pytest.raises(TpmBlobError, match="rng returned"):
        create_challenge(soft.ek, soft.srk, rng=lambda size: bytes(size - 1))


@settings(max_examples=50, deadline=None)
@given(st.data(), st.booleans())
def test_bad_keys_raise_only_blob_error(soft: SoftTpm, data: st.DataObject, as_ek: bool) -> None:
    raw = bytearray(soft.ek if as_ek else soft.srk)
    for _ in range(data.draw(st.integers(1, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    for candidate in (bytes(raw), data.draw(st.binary(max_size=400))):
        with contextlib.suppress(TpmBlobError):
            if as_ek:
                create_challenge(candidate, soft.srk)
            else:
                create_challenge(soft.ek, candidate)


# -- (b) byte-for-byte against tpm2-pytss -------------------------------------------------------


def test_same_bytes_as_tpm2_pytss_wrap_and_make_credential(
    soft: SoftTpm, monkeypatch: pytest.MonkeyPatch
) -> None:
    tss = pytest.importorskip("tpm2_pytss")
    from tpm2_pytss.utils import make_credential, wrap

    key, seed_value, inner_key = os.urandom(32), os.urandom(32), os.urandom(16)
    dup_seed, cred_seed = os.urandom(32), os.urandom(32)
    ours = parse_activation_blob(
        create_challenge(
            soft.ek, soft.srk, key=key, rng=_sequence(seed_value, inner_key, dup_seed, cred_seed)
        ).blob
    )

    scheme = tss.TPMT_KEYEDHASH_SCHEME(scheme=tss.TPM2_ALG.HMAC)
    scheme.details.hmac.hashAlg = tss.TPM2_ALG.SHA256
    sensitive, public = tss.TPM2B_SENSITIVE.keyedhash_from_secret(
        key,
        objectAttributes=tss.TPMA_OBJECT.SIGN_ENCRYPT | tss.TPMA_OBJECT.USERWITHAUTH,
        scheme=scheme,
        seed=seed_value,
    )
    seeds = iter([dup_seed, cred_seed])
    monkeypatch.setattr(secrets, "token_bytes", lambda size: next(seeds))
    ek_public = tss.TPM2B_PUBLIC.unmarshal(soft.ek)[0]
    srk_public = tss.TPM2B_PUBLIC.unmarshal(soft.srk)[0]
    symdef = tss.TPMT_SYM_DEF_OBJECT(algorithm=tss.TPM2_ALG.AES)
    symdef.keyBits.aes = 128
    symdef.mode.aes = tss.TPM2_ALG.CFB
    _, duplicate, sym_seed = wrap(srk_public.publicArea, public, sensitive, inner_key, symdef)
    id_object, secret = make_credential(ek_public, inner_key, srk_public.get_name())
    monkeypatch.undo()

    assert ours.public == public.marshal()
    assert ours.duplicate == duplicate.marshal()
    assert ours.id_object == id_object.marshal()
    # OAEP padding is randomised: compare what the encrypted seeds decrypt to.
    for mine, theirs, private, label, seed in (
        (ours.sym_seed, sym_seed, soft.srk_private, b"DUPLICATE\x00", dup_seed),
        (ours.encrypted_secret, secret, soft.ek_private, b"IDENTITY\x00", cred_seed),
    ):
        assert _oaep_decrypt(private, label, _split(mine)[0]) == seed
        assert _oaep_decrypt(private, label, bytes(theirs)) == seed


# -- (c) a real TPM accepts it --------------------------------------------------------------------


@pytest.fixture
def device(swtpm: SwtpmProcess) -> Iterator[TpmDevice]:
    """A TpmDevice on this test's swtpm, with Azure's EK and SRK persisted."""
    with TpmDevice(swtpm.tcti) as tpm_device:
        tpm_device.ensure_keys()
        yield tpm_device


def test_real_tpm_imports_the_challenge_and_signs_with_its_key(device: TpmDevice) -> None:
    ek, srk = device.endorsement_key(), device.storage_root_key()
    assert m.parse_public(ek).auth_policy == m.EK_AUTH_POLICY
    for key in (None, b"\x01", os.urandom(16), os.urandom(MAX_KEY_SIZE)):
        challenge = create_challenge(ek, srk, key=key)
        device.import_activation_blob(challenge.blob)
        signer = device.signer()
        for data in (b"", b"0ne00000A0A%2Fregistrations%2Fdevice\n1700000000", os.urandom(3000)):
            expected = hmac.new(challenge.key, data, hashlib.sha256).digest()
            assert signer.sign(data) == expected


def test_real_tpm_refuses_broken_challenges(device: TpmDevice, soft: SoftTpm) -> None:
    ek, srk = device.endorsement_key(), device.storage_root_key()
    good = parse_activation_blob(create_challenge(ek, srk).blob)
    for_soft_srk = parse_activation_blob(create_challenge(ek, soft.srk).blob)
    duplicate = bytearray(good.duplicate)
    duplicate[-1] ^= 1
    broken = {
        "bound to another SRK": create_challenge(ek, soft.srk).blob,
        # swtpm answers TPM_RC_FAILURE (0x101) to this one, yet stays usable.
        "duplication seed for another SRK": build_activation_blob(
            dataclasses.replace(good, sym_seed=for_soft_srk.sym_seed)
        ),
        "for another EK": create_challenge(soft.ek, srk).blob,
        "tampered duplicate": build_activation_blob(
            dataclasses.replace(good, duplicate=bytes(duplicate))
        ),
        "another challenge's identity key": build_activation_blob(
            ActivationBlob(
                **{
                    **dataclasses.asdict(good),
                    "public": parse_activation_blob(create_challenge(ek, srk).blob).public,
                }
            )
        ),
    }
    for what, blob in broken.items():
        with pytest.raises(TpmActivationError):
            device.import_activation_blob(blob)
        assert not device.has_identity_key(), what
    # The TPM is still usable afterwards.
    challenge = create_challenge(ek, srk)
    device.import_activation_blob(challenge.blob)
    assert device.signer().sign(b"x") == hmac.new(challenge.key, b"x", hashlib.sha256).digest()
