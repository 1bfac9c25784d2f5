"""The DPS service side of TPM attestation, in software: a fresh HMAC identity key, duplicated to
the device's SRK and bound by MakeCredential to its EK (azure-protocol reference 3.5; TPM 2.0
Library Part 1 sections 24 and 23.3; Part 4 ``SensitiveToDuplicate`` / ``ProduceOuterWrap``).

Only ``cryptography`` is needed, so the emulator runs without tpm2-pytss. The service keeps
:attr:`TpmChallenge.key` to verify the SAS signatures the device's TPM makes with the imported key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .blob import ActivationBlob, build_activation_blob
from .errors import TpmBlobError
from .marshal import (
    AES_128_CFB,
    ALG_KEYEDHASH,
    ALG_RSA,
    ALG_SHA256,
    DECRYPT,
    RESTRICTED,
    SIGN_ENCRYPT,
    USER_WITH_AUTH,
    RsaParms,
    build_public,
    keyedhash_public,
    name,
    parse_public,
    rsa_public_key,
    tpm2b,
)

#: Identity-key attributes: sign + userWithAuth only. With decrypt set as well the TPM refuses the
#: HMAC scheme at Import (0x2d2); fixedTPM/fixedParent must be clear for an imported object.
IDENTITY_KEY_ATTRIBUTES = SIGN_ENCRYPT | USER_WITH_AUTH
IDENTITY_KEY_SIZE = 32
#: Largest HMAC key the TPM accepts for a SHA-256 keyed-hash object (the hash block size).
MAX_KEY_SIZE = 64
INNER_KEY_SIZE = 16  # AES-128, the inner wrapper Azure's SDKs pass to TPM2_Import
_DIGEST_SIZE = 32  # SHA-256, the only nameAlg accepted for EK, SRK and the identity key
_IDENTITY_LABEL = b"IDENTITY\x00"
_DUPLICATE_LABEL = b"DUPLICATE\x00"


@dataclass(frozen=True)
class TpmChallenge:
    """What DPS answers (``blob``, base64 it for JSON) and what it keeps (``key``)."""

    blob: bytes
    """The raw activation blob (``authenticationKey`` before base64)."""
    key: bytes
    """The identity HMAC key, to verify the device's SAS signatures."""

    def __repr__(self) -> str:
        return f"TpmChallenge(blob=<{len(self.blob)} bytes>, key=<hidden>)"


def kdfa(key: bytes, label: bytes, context_u: bytes, context_v: bytes, bits: int) -> bytes:
    """KDFa with HMAC-SHA256 (SP 800-108 counter mode), ``bits`` a multiple of 8.

    ``label`` is given without its terminating NUL, which is added here.
    """
    out = bytearray()
    counter = 1
    while len(out) * 8 < bits:
        block = struct.pack(">I", counter) + label + b"\x00" + context_u + context_v
        out += hmac.new(key, block + struct.pack(">I", bits), hashlib.sha256).digest()
        counter += 1
    return bytes(out[: (bits + 7) // 8])


def aes_cfb(key: bytes, data: bytes, *, decrypt: bool = False, iv: bytes = bytes(16)) -> bytes:
    """AES-CFB with full-block feedback (CFB-128), all-zero IV by default, as TPM wrappers use it.

    Built on the AES block function because ``cryptography`` moved its CFB mode to ``decrepit``.
    """
    block = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
    out = bytearray()
    feedback = bytes(iv)
    for start in range(0, len(data), 16):
        chunk = data[start : start + 16]
        stream = block.update(feedback)
        result = bytes(a ^ b for a, b in zip(chunk, stream))
        out += result
        feedback = chunk if decrypt else result
    return bytes(out)


def _storage_key(public: bytes, role: str) -> rsa.RSAPublicKey:
    """The RSA key of an EK/SRK TPM2B_PUBLIC, refusing shapes other than Azure's templates."""
    try:
        area = parse_public(public)
        if area.type != ALG_RSA:
            raise TpmBlobError(f"type 0x{area.type:04x} is not RSA")
        if area.name_alg != ALG_SHA256:
            raise TpmBlobError(f"nameAlg 0x{area.name_alg:04x} is not SHA-256")
        if area.object_attributes & (RESTRICTED | DECRYPT) != RESTRICTED | DECRYPT:
            raise TpmBlobError("not a restricted decryption key")
        if not isinstance(area.parameters, RsaParms) or area.parameters.symmetric != AES_128_CFB:
            raise TpmBlobError("symmetric algorithm is not AES-128-CFB")
        n, e = rsa_public_key(public)
        return rsa.RSAPublicNumbers(e, n).public_key()
    except (TpmBlobError, ValueError) as exc:
        raise TpmBlobError(f"unsupported {role}: {exc}") from None


def _oaep_encrypt(key: rsa.RSAPublicKey, label: bytes, seed: bytes, role: str) -> bytes:
    try:
        return key.encrypt(
            seed,
            padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), label),
        )
    except ValueError as exc:  # modulus too small for OAEP-SHA256 of a 32-byte seed
        raise TpmBlobError(f"unsupported {role}: RSA-OAEP encryption failed ({exc})") from None


def _random(rng: Callable[[int], bytes], size: int) -> bytes:
    value = bytes(rng(size))
    if len(value) != size:
        raise TpmBlobError(f"rng returned {len(value)} bytes, not {size}")
    return value


def _outer_wrap(seed: bytes, object_name: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
    """The protection both MakeCredential and Duplicate apply: (integrity HMAC, encrypted data)."""
    sym_key = kdfa(seed, b"STORAGE", object_name, b"", 128)
    encrypted = aes_cfb(sym_key, plaintext)
    hmac_key = kdfa(seed, b"INTEGRITY", b"", b"", 8 * _DIGEST_SIZE)
    return hmac.new(hmac_key, encrypted + object_name, hashlib.sha256).digest(), encrypted


def create_challenge(
    endorsement_key: bytes,
    storage_root_key: bytes,
    *,
    key: bytes | None = None,
    rng: Callable[[int], bytes] = os.urandom,
) -> TpmChallenge:
    """Build the activation blob for a device whose EK and SRK are the given TPM2B_PUBLICs.

    ``key`` is the identity HMAC key (32 random bytes if None, at most 64: the TPM refuses longer
    SHA-256 HMAC keys). ``rng`` supplies the key, the seeds and the inner wrap key (OAEP padding
    draws its own). Raises TpmBlobError for a malformed EK/SRK, algorithms other than
    RSA / SHA-256 / AES-128-CFB, or a bad key length.
    """
    ek = _storage_key(endorsement_key, "EK")
    srk = _storage_key(storage_root_key, "SRK")
    if key is None:
        key = _random(rng, IDENTITY_KEY_SIZE)
    if not 1 <= len(key) <= MAX_KEY_SIZE:
        raise TpmBlobError(f"identity key must be 1..{MAX_KEY_SIZE} bytes, not {len(key)}")

    # The identity key: public part, and TPMT_SENSITIVE (type, authValue, seedValue, sensitive).
    seed_value = _random(rng, _DIGEST_SIZE)
    id_public = keyedhash_public(
        hashlib.sha256(seed_value + key).digest(), object_attributes=IDENTITY_KEY_ATTRIBUTES
    )
    id_name = name(id_public)
    sensitive = tpm2b(
        struct.pack(">H", ALG_KEYEDHASH) + tpm2b(b"") + tpm2b(seed_value) + tpm2b(key)
    )

    # Duplicate: inner wrapper (integrity = H(TPM2B_SENSITIVE || Name)), then the outer wrapper
    # keyed by a seed for the SRK.
    inner_key = _random(rng, INNER_KEY_SIZE)
    inner_integrity = tpm2b(hashlib.sha256(sensitive + id_name).digest())
    enc_sensitive = aes_cfb(inner_key, inner_integrity + sensitive)
    dup_seed = _random(rng, _DIGEST_SIZE)
    outer_hmac, dup_sensitive = _outer_wrap(dup_seed, id_name, enc_sensitive)
    duplicate = tpm2b(tpm2b(outer_hmac) + dup_sensitive)
    sym_seed = tpm2b(_oaep_encrypt(srk, _DUPLICATE_LABEL, dup_seed, "SRK"))

    # MakeCredential(EK, credential = inner key, objectName = Name(SRK)).
    cred_seed = _random(rng, _DIGEST_SIZE)
    integrity, enc_identity = _outer_wrap(cred_seed, name(storage_root_key), tpm2b(inner_key))
    id_object = tpm2b(tpm2b(integrity) + enc_identity)
    secret = tpm2b(_oaep_encrypt(ek, _IDENTITY_LABEL, cred_seed, "EK"))

    blob = ActivationBlob(
        id_object=id_object,
        encrypted_secret=secret,
        duplicate=duplicate,
        sym_seed=sym_seed,
        public=build_public(id_public),
    )
    return TpmChallenge(blob=build_activation_blob(blob), key=bytes(key))
