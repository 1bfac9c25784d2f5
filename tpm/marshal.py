"""The few TPM 2.0 structures DPS attestation needs (TPM2B_PUBLIC of RSA and KEYEDHASH keys,
Names), marshalled and parsed in pure Python so the emulator runs without tpm2-pytss.

Parsing is strict: truncation, sizes that disagree, unsupported algorithms and trailing bytes all
raise :class:`~tpm.errors.TpmBlobError`, never anything else.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Union

from .errors import TpmBlobError

# TPM_ALG_ID values (TPM 2.0 Library Part 2, table 9).
ALG_RSA = 0x0001
ALG_SHA1 = 0x0004
ALG_HMAC = 0x0005
ALG_AES = 0x0006
ALG_KEYEDHASH = 0x0008
ALG_XOR = 0x000A
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_NULL = 0x0010
ALG_SM4 = 0x0013
ALG_RSASSA = 0x0014
ALG_RSAES = 0x0015
ALG_RSAPSS = 0x0016
ALG_OAEP = 0x0017
ALG_KDF1_SP800_108 = 0x0022
ALG_CAMELLIA = 0x0026
ALG_CFB = 0x0043

# TPMA_OBJECT bits (Part 2, table 31).
FIXED_TPM = 0x0000_0002
ST_CLEAR = 0x0000_0004
FIXED_PARENT = 0x0000_0010
SENSITIVE_DATA_ORIGIN = 0x0000_0020
USER_WITH_AUTH = 0x0000_0040
ADMIN_WITH_POLICY = 0x0000_0080
NO_DA = 0x0000_0400
ENCRYPTED_DUPLICATION = 0x0000_0800
RESTRICTED = 0x0001_0000
DECRYPT = 0x0002_0000
SIGN_ENCRYPT = 0x0004_0000

# Azure's EK and SRK templates (azure-iot-sdk-c hsm_client_tpm.c; TCG EK profile, template L-1).
EK_OBJECT_ATTRIBUTES = (
    FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | ADMIN_WITH_POLICY | RESTRICTED | DECRYPT
)
SRK_OBJECT_ATTRIBUTES = (
    FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | NO_DA | RESTRICTED | DECRYPT
)
EK_AUTH_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")

HASH_NAMES = {ALG_SHA1: "sha1", ALG_SHA256: "sha256", ALG_SHA384: "sha384", ALG_SHA512: "sha512"}
#: Largest TPM2B_DIGEST (sizeof TPMU_HA) and TPM2B_PUBLIC_KEY_RSA (MAX_RSA_KEY_BYTES) payloads.
MAX_DIGEST_SIZE = 64
MAX_RSA_KEY_BYTES = 512
_SYM_OBJECT_ALGS = frozenset({ALG_AES, ALG_SM4, ALG_CAMELLIA})
_RSA_SCHEMES_WITH_HASH = frozenset({ALG_RSASSA, ALG_RSAPSS, ALG_OAEP})


@dataclass(frozen=True)
class SymDef:
    """TPMT_SYM_DEF_OBJECT; ``key_bits`` and ``mode`` are 0 when ``algorithm`` is ALG_NULL."""

    algorithm: int = ALG_NULL
    key_bits: int = 0
    mode: int = 0


AES_128_CFB = SymDef(ALG_AES, 128, ALG_CFB)


@dataclass(frozen=True)
class RsaParms:
    """TPMS_RSA_PARMS; ``scheme_hash`` is 0 for schemes without a hash (NULL, RSAES).

    ``exponent`` 0 means the default 65537, as the TPM marshals it.
    """

    symmetric: SymDef
    scheme: int
    scheme_hash: int
    key_bits: int
    exponent: int


@dataclass(frozen=True)
class KeyedHashParms:
    """TPMS_KEYEDHASH_PARMS; ``scheme_hash`` is 0 for ALG_NULL, ``kdf`` only set for ALG_XOR."""

    scheme: int
    scheme_hash: int = 0
    kdf: int = 0


Parms = Union[RsaParms, KeyedHashParms]


@dataclass(frozen=True)
class TpmtPublic:
    """TPMT_PUBLIC of an RSA or KEYEDHASH object.

    ``unique`` is the RSA modulus or the keyed-hash digest H(seedValue || key).
    """

    type: int
    name_alg: int
    object_attributes: int
    auth_policy: bytes
    parameters: Parms
    unique: bytes


class Reader:
    """Bounds-checked big-endian reader: running off the end raises TpmBlobError."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise TpmBlobError(f"{self.what}: truncated at byte {self.pos} (need {n} more bytes)")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def u16(self) -> int:
        value: int = struct.unpack(">H", self.take(2))[0]
        return value

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value

    def tpm2b(self, limit: int = 0xFFFF, field: str = "TPM2B") -> bytes:
        size = self.u16()
        if size > limit:
            raise TpmBlobError(f"{self.what}: {field} of {size} bytes exceeds {limit}")
        return self.take(size)

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise TpmBlobError(
                f"{self.what}: {len(self.data) - self.pos} unexpected trailing bytes"
            )


def _u16(value: int, field: str) -> bytes:
    if not 0 <= value <= 0xFFFF:
        raise TpmBlobError(f"{field} {value} does not fit in 16 bits")
    return struct.pack(">H", value)


def _u32(value: int, field: str) -> bytes:
    if not 0 <= value <= 0xFFFF_FFFF:
        raise TpmBlobError(f"{field} {value} does not fit in 32 bits")
    return struct.pack(">I", value)


def tpm2b(payload: bytes, limit: int = 0xFFFF, field: str = "TPM2B") -> bytes:
    """Marshal ``payload`` as a TPM2B: big-endian u16 size, then the bytes."""
    if len(payload) > limit:
        raise TpmBlobError(f"{field} of {len(payload)} bytes exceeds {limit}")
    return _u16(len(payload), field) + bytes(payload)


def _unique_limit(obj_type: int) -> int:
    return MAX_RSA_KEY_BYTES if obj_type == ALG_RSA else MAX_DIGEST_SIZE


def split_tpm2b(data: bytes, what: str = "TPM2B") -> bytes:
    """The payload of a marshalled TPM2B that must fill ``data`` exactly."""
    reader = Reader(bytes(data), what)
    payload = reader.tpm2b()
    reader.finish()
    return payload


def _parse_sym(reader: Reader) -> SymDef:
    algorithm = reader.u16()
    if algorithm == ALG_NULL:
        return SymDef()
    if algorithm not in _SYM_OBJECT_ALGS:
        raise TpmBlobError(f"unsupported symmetric algorithm 0x{algorithm:04x}")
    return SymDef(algorithm, reader.u16(), reader.u16())


def _build_sym(sym: SymDef) -> bytes:
    if sym.algorithm == ALG_NULL:
        if sym.key_bits or sym.mode:
            raise TpmBlobError("a NULL symmetric definition has no key bits or mode")
        return _u16(ALG_NULL, "symmetric")
    if sym.algorithm not in _SYM_OBJECT_ALGS:
        raise TpmBlobError(f"unsupported symmetric algorithm 0x{sym.algorithm:04x}")
    return (
        _u16(sym.algorithm, "symmetric")
        + _u16(sym.key_bits, "symmetric key bits")
        + _u16(sym.mode, "symmetric mode")
    )


def _parse_rsa_parms(reader: Reader) -> RsaParms:
    symmetric = _parse_sym(reader)
    scheme = reader.u16()
    scheme_hash = 0
    if scheme in _RSA_SCHEMES_WITH_HASH:
        scheme_hash = reader.u16()
    elif scheme not in (ALG_NULL, ALG_RSAES):
        raise TpmBlobError(f"unsupported RSA scheme 0x{scheme:04x}")
    return RsaParms(symmetric, scheme, scheme_hash, reader.u16(), reader.u32())


def _build_rsa_parms(parms: RsaParms) -> bytes:
    out = _build_sym(parms.symmetric) + _u16(parms.scheme, "RSA scheme")
    if parms.scheme in _RSA_SCHEMES_WITH_HASH:
        out += _u16(parms.scheme_hash, "RSA scheme hash")
    elif parms.scheme not in (ALG_NULL, ALG_RSAES):
        raise TpmBlobError(f"unsupported RSA scheme 0x{parms.scheme:04x}")
    elif parms.scheme_hash:
        raise TpmBlobError("RSA scheme without a hash has a scheme hash")
    return out + _u16(parms.key_bits, "RSA key bits") + _u32(parms.exponent, "RSA exponent")


def _parse_keyedhash_parms(reader: Reader) -> KeyedHashParms:
    scheme = reader.u16()
    if scheme == ALG_NULL:
        return KeyedHashParms(ALG_NULL)
    if scheme == ALG_HMAC:
        return KeyedHashParms(ALG_HMAC, reader.u16())
    if scheme == ALG_XOR:
        return KeyedHashParms(ALG_XOR, reader.u16(), reader.u16())
    raise TpmBlobError(f"unsupported keyed-hash scheme 0x{scheme:04x}")


def _build_keyedhash_parms(parms: KeyedHashParms) -> bytes:
    scheme = _u16(parms.scheme, "keyed-hash scheme")
    if parms.scheme == ALG_NULL and not (parms.scheme_hash or parms.kdf):
        return scheme
    if parms.scheme == ALG_HMAC and not parms.kdf:
        return scheme + _u16(parms.scheme_hash, "keyed-hash scheme hash")
    if parms.scheme == ALG_XOR:
        return scheme + _u16(parms.scheme_hash, "XOR hash") + _u16(parms.kdf, "XOR kdf")
    raise TpmBlobError(f"unsupported keyed-hash scheme {parms}")


def _parse_tpmt(reader: Reader) -> TpmtPublic:
    obj_type = reader.u16()
    name_alg = reader.u16()
    attributes = reader.u32()
    auth_policy = reader.tpm2b(MAX_DIGEST_SIZE, "authPolicy")
    parameters: Parms
    if obj_type == ALG_RSA:
        parameters = _parse_rsa_parms(reader)
    elif obj_type == ALG_KEYEDHASH:
        parameters = _parse_keyedhash_parms(reader)
    else:
        raise TpmBlobError(f"unsupported object type 0x{obj_type:04x}")
    unique = reader.tpm2b(_unique_limit(obj_type), "unique")
    return TpmtPublic(obj_type, name_alg, attributes, auth_policy, parameters, unique)


def parse_tpmt_public(data: bytes) -> TpmtPublic:
    """Parse a marshalled TPMT_PUBLIC that fills ``data`` exactly."""
    reader = Reader(bytes(data), "TPMT_PUBLIC")
    public = _parse_tpmt(reader)
    reader.finish()
    return public


def parse_public(data: bytes) -> TpmtPublic:
    """Parse a marshalled TPM2B_PUBLIC (size prefix + TPMT_PUBLIC) that fills ``data`` exactly."""
    return parse_tpmt_public(split_tpm2b(data, "TPM2B_PUBLIC"))


def build_tpmt_public(public: TpmtPublic) -> bytes:
    """Marshal a TPMT_PUBLIC (no size prefix); the inverse of :func:`parse_tpmt_public`."""
    if public.type == ALG_RSA and isinstance(public.parameters, RsaParms):
        parms = _build_rsa_parms(public.parameters)
    elif public.type == ALG_KEYEDHASH and isinstance(public.parameters, KeyedHashParms):
        parms = _build_keyedhash_parms(public.parameters)
    else:
        raise TpmBlobError(
            f"object type 0x{public.type:04x} does not match {type(public.parameters).__name__}"
        )
    return (
        _u16(public.type, "type")
        + _u16(public.name_alg, "nameAlg")
        + _u32(public.object_attributes, "objectAttributes")
        + tpm2b(public.auth_policy, MAX_DIGEST_SIZE, "authPolicy")
        + parms
        + tpm2b(public.unique, _unique_limit(public.type), "unique")
    )


def build_public(public: TpmtPublic) -> bytes:
    """Marshal a TPM2B_PUBLIC (size prefix + TPMT_PUBLIC); the inverse of :func:`parse_public`."""
    return tpm2b(build_tpmt_public(public))


def hash_name(alg: int) -> str:
    """The hashlib name of TPM hash algorithm ``alg``."""
    try:
        return HASH_NAMES[alg]
    except KeyError:
        raise TpmBlobError(f"unsupported hash algorithm 0x{alg:04x}") from None


def name(public: TpmtPublic | bytes) -> bytes:
    """The object's Name: u16 nameAlg || H_nameAlg(marshalled TPMT_PUBLIC).

    ``public`` is a :class:`TpmtPublic` or a marshalled TPM2B_PUBLIC (the wire form, with its size
    prefix), the form DPS receives as ``endorsementKey`` / ``storageRootKey``.
    """
    if isinstance(public, TpmtPublic):
        area = build_tpmt_public(public)
        name_alg = public.name_alg
    else:
        area = split_tpm2b(public, "TPM2B_PUBLIC")
        name_alg = parse_tpmt_public(area).name_alg
    return _u16(name_alg, "nameAlg") + hashlib.new(hash_name(name_alg), area).digest()


def rsa_public_key(tpm2b_public: bytes) -> tuple[int, int]:
    """The RSA public key ``(n, e)`` of a marshalled TPM2B_PUBLIC; exponent 0 becomes 65537."""
    public = parse_public(tpm2b_public)
    parms = public.parameters
    if public.type != ALG_RSA or not isinstance(parms, RsaParms):
        raise TpmBlobError(f"not an RSA key (type 0x{public.type:04x})")
    if not public.unique or len(public.unique) * 8 != parms.key_bits:
        raise TpmBlobError(
            f"RSA modulus of {len(public.unique)} bytes does not match keyBits {parms.key_bits}"
        )
    return int.from_bytes(public.unique, "big"), parms.exponent or 65537


def rsa_public(
    modulus: bytes,
    *,
    object_attributes: int,
    auth_policy: bytes = b"",
    exponent: int = 0,
    key_bits: int | None = None,
    name_alg: int = ALG_SHA256,
    symmetric: SymDef = AES_128_CFB,
) -> TpmtPublic:
    """An RSA storage-key public area (EK/SRK shape: null scheme) with ``modulus`` as unique.

    ``key_bits`` defaults to the modulus length; pass it with an empty modulus for a template.
    """
    bits = len(modulus) * 8 if key_bits is None else key_bits
    parms = RsaParms(symmetric, ALG_NULL, 0, bits, exponent)
    return TpmtPublic(ALG_RSA, name_alg, object_attributes, auth_policy, parms, bytes(modulus))


def keyedhash_public(
    unique: bytes, *, object_attributes: int, hash_alg: int = ALG_SHA256, auth_policy: bytes = b""
) -> TpmtPublic:
    """A KEYEDHASH public area with an HMAC scheme over ``hash_alg`` (also its nameAlg)."""
    parms = KeyedHashParms(ALG_HMAC, hash_alg)
    return TpmtPublic(ALG_KEYEDHASH, hash_alg, object_attributes, auth_policy, parms, bytes(unique))
