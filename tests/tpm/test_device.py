"""TpmDevice against a real software TPM: keys, registration id, activation, in-TPM HMAC."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dps_proto.sas import KeySigner, generate_sas_token
from tpm.blob import parse_activation_blob
from tpm.device import EK_HANDLE, ID_KEY_HANDLE, SRK_HANDLE, TpmDevice, TpmHandles
from tpm.errors import TpmActivationError, TpmBlobError, TpmError, TpmUnavailable
from tpm.swtpm import SwtpmProcess

tss = pytest.importorskip("tpm2_pytss")
tss_utils = pytest.importorskip("tpm2_pytss.utils")

TCG_EK_POLICY = bytes.fromhex("837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa")
SECTIONS = ("id_object", "encrypted_secret", "duplicate", "sym_seed", "public")


@pytest.fixture
def device(swtpm: SwtpmProcess) -> Iterator[TpmDevice]:
    """A device on the test's swtpm with its EK and SRK in place."""
    with TpmDevice(swtpm.tcti) as dev:
        dev.ensure_keys()
        yield dev


def make_blob(device: TpmDevice, key: bytes, *, bind_to_ek: bool = False) -> bytes:
    """A DPS-style activation blob for ``device``, built in software with tpm2_pytss.utils."""
    ek, _ = tss.TPM2B_PUBLIC.unmarshal(device.endorsement_key())
    srk, _ = tss.TPM2B_PUBLIC.unmarshal(device.storage_root_key())
    scheme = tss.TPMT_KEYEDHASH_SCHEME(scheme=tss.TPM2_ALG.HMAC)
    scheme.details.hmac.hashAlg = tss.TPM2_ALG.SHA256
    sensitive, public = tss.TPM2B_SENSITIVE.keyedhash_from_secret(
        key,
        objectAttributes=tss.TPMA_OBJECT.SIGN_ENCRYPT | tss.TPMA_OBJECT.USERWITHAUTH,
        scheme=scheme,
    )
    sym = tss.TPMT_SYM_DEF_OBJECT(algorithm=tss.TPM2_ALG.AES)
    sym.keyBits.aes = 128
    sym.mode.aes = tss.TPM2_ALG.CFB
    inner_key = os.urandom(16)
    _, duplicate, sym_seed = tss_utils.wrap(srk.publicArea, public, sensitive, inner_key, sym)
    bound = (ek if bind_to_ek else srk).get_name()
    id_object, secret = tss_utils.make_credential(ek, inner_key, bound)
    parts = (id_object, secret, duplicate, sym_seed, public, tss.TPM2B_DATA())
    return b"".join(bytes(part.marshal()) for part in parts)


def software_hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def loaded_handles(tcti: str) -> dict[str, list[int]]:
    """Transient objects and sessions loaded in the TPM, and persistent handles (own context)."""
    ctx = tss.ESAPI(tcti)
    try:
        found = {}
        for what, first in (
            ("transient", 0x80000000),
            ("hmac_sessions", 0x02000000),
            ("policy_sessions", 0x03000000),
            ("persistent", 0x81000000),
        ):
            _, data = ctx.get_capability(tss.TPM2_CAP.HANDLES, first, 64)
            found[what] = [int(h) for h in data.data.handles]
        return found
    finally:
        ctx.close()


def assert_nothing_loaded(tcti: str) -> None:
    loaded = loaded_handles(tcti)
    assert loaded["transient"] == []
    assert loaded["hmac_sessions"] == []
    assert loaded["policy_sessions"] == []


def flip(blob: bytes, offset: int) -> bytes:
    return blob[:offset] + bytes([blob[offset] ^ 0x01]) + blob[offset + 1 :]


def section_offsets(blob: bytes) -> dict[str, tuple[int, int]]:
    """(start, length) of each section, size prefix included."""
    parsed = parse_activation_blob(blob)
    out, start = {}, 0
    for name in (*SECTIONS, "data"):
        length = len(getattr(parsed, name))
        out[name] = (start, length)
        start += length
    return out


class CallCounter:
    """Counts calls of ESAPI methods (patched on the class) while delegating to them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
        self.calls: dict[str, int] = dict.fromkeys(names, 0)
        for name in names:
            original = getattr(tss.ESAPI, name)
            monkeypatch.setattr(tss.ESAPI, name, self._wrap(name, original))

    def _wrap(self, name: str, original: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            return original(*args, **kwargs)

        return counted


# -- keys and registration id -----------------------------------------------------------------


def test_ensure_keys_creates_both_keys_at_azure_handles(swtpm: SwtpmProcess) -> None:
    assert loaded_handles(swtpm.tcti)["persistent"] == []
    with TpmDevice(swtpm.tcti) as dev:
        dev.ensure_keys()
        assert not dev.has_identity_key()
    assert loaded_handles(swtpm.tcti)["persistent"] == [SRK_HANDLE, EK_HANDLE]
    assert_nothing_loaded(swtpm.tcti)


def test_ensure_keys_is_idempotent(device: TpmDevice, monkeypatch: pytest.MonkeyPatch) -> None:
    ek, srk = device.endorsement_key(), device.storage_root_key()
    before = loaded_handles(device.tcti)
    counter = CallCounter(monkeypatch, "create_primary", "evict_control")
    device.ensure_keys()
    with TpmDevice(device.tcti) as other:
        other.ensure_keys()
        assert other.endorsement_key() == ek
        assert other.storage_root_key() == srk
    assert counter.calls == {"create_primary": 0, "evict_control": 0}
    assert device.endorsement_key() == ek
    assert device.storage_root_key() == srk
    assert loaded_handles(device.tcti) == before


def test_ek_matches_tcg_template_and_what_the_tpm_reads(device: TpmDevice) -> None:
    ctx = tss.ESAPI(device.tcti)
    try:
        public, _, _ = ctx.read_public(ctx.tr_from_tpmpublic(EK_HANDLE))
    finally:
        ctx.close()
    ek = device.endorsement_key()
    assert ek == bytes(public.marshal())
    assert len(ek) == 316 and ek[:2] == b"\x01\x3a"
    area = public.publicArea
    attrs = tss.TPMA_OBJECT
    assert area.type == tss.TPM2_ALG.RSA
    assert bytes(area.authPolicy) == TCG_EK_POLICY
    assert area.objectAttributes & attrs.ADMINWITHPOLICY
    assert not area.objectAttributes & attrs.USERWITHAUTH


def test_srk_has_azure_template(device: TpmDevice) -> None:
    srk, used = tss.TPM2B_PUBLIC.unmarshal(device.storage_root_key())
    assert used == len(device.storage_root_key())
    area = srk.publicArea
    attrs = tss.TPMA_OBJECT
    expected = (
        attrs.RESTRICTED
        | attrs.DECRYPT
        | attrs.FIXEDTPM
        | attrs.FIXEDPARENT
        | attrs.NODA
        | attrs.USERWITHAUTH
        | attrs.SENSITIVEDATAORIGIN
    )
    assert int(area.objectAttributes) == int(expected)
    rsa = area.parameters.rsaDetail
    assert (rsa.keyBits, rsa.exponent) == (2048, 0)
    assert rsa.symmetric.algorithm == tss.TPM2_ALG.AES
    assert rsa.symmetric.keyBits.aes == 128
    assert rsa.symmetric.mode.aes == tss.TPM2_ALG.CFB
    assert rsa.scheme.scheme == tss.TPM2_ALG.NULL
    assert bytes(area.authPolicy) == b""


def test_registration_id_format_and_independent_computation(device: TpmDevice) -> None:
    reg_id = device.registration_id()
    assert re.fullmatch(r"[a-z2-7]{52}", reg_id)
    digest = hashlib.sha256(device.endorsement_key()).digest()
    assert base64.b32decode(reg_id.upper() + "====") == digest


def test_registration_id_and_identity_key_survive_reopen_and_restart(
    swtpm: SwtpmProcess, swtpm_state: Path
) -> None:
    key = os.urandom(32)
    with TpmDevice(swtpm.tcti) as dev:
        dev.ensure_keys()
        reg_id, srk = dev.registration_id(), dev.storage_root_key()
        dev.import_activation_blob(make_blob(dev, key))
    with TpmDevice(swtpm.tcti) as dev:
        assert dev.registration_id() == reg_id
    swtpm.stop()
    with SwtpmProcess(swtpm_state) as again, TpmDevice(again.tcti) as dev:
        dev.ensure_keys()
        assert dev.registration_id() == reg_id
        assert dev.storage_root_key() == srk
        assert dev.signer().sign(b"after restart") == software_hmac(key, b"after restart")


def test_custom_handles(swtpm: SwtpmProcess) -> None:
    handles = TpmHandles(ek=0x81010002, srk=0x81000002, identity=0x81000102)
    key = os.urandom(32)
    with TpmDevice(swtpm.tcti, handles) as dev:
        dev.ensure_keys()
        dev.import_activation_blob(make_blob(dev, key))
        assert dev.signer().sign(b"x") == software_hmac(key, b"x")
    assert loaded_handles(swtpm.tcti)["persistent"] == [0x81000002, 0x81000102, 0x81010002]


# -- activation and signing ---------------------------------------------------------------------


def test_activation_then_hmac_in_the_tpm(device: TpmDevice) -> None:
    key = os.urandom(32)
    assert not device.has_identity_key()
    device.import_activation_blob(make_blob(device, key))
    assert device.has_identity_key()
    assert loaded_handles(device.tcti)["persistent"] == [SRK_HANDLE, ID_KEY_HANDLE, EK_HANDLE]
    assert_nothing_loaded(device.tcti)
    signer = device.signer()
    for size in (0, 1, 80, 1023, 1024, 1025, 2048, 3000, 5000):
        data = os.urandom(size)
        assert signer.sign(data) == software_hmac(key, data), size
    assert_nothing_loaded(device.tcti)


def test_tpm_signer_builds_the_same_sas_token_as_a_key_signer(device: TpmDevice) -> None:
    key = os.urandom(32)
    device.import_activation_blob(make_blob(device, key))
    resource = f"0ne00000A0A/registrations/{device.registration_id()}"
    expected = generate_sas_token(resource, KeySigner(key), 1_900_000_000, "registration")
    assert generate_sas_token(resource, device.signer(), 1_900_000_000, "registration") == expected


def test_reimport_replaces_the_identity_key(device: TpmDevice) -> None:
    first, second = os.urandom(32), os.urandom(32)
    device.import_activation_blob(make_blob(device, first))
    signer = device.signer()
    assert signer.sign(b"m") == software_hmac(first, b"m")
    device.import_activation_blob(make_blob(device, second))
    assert signer.sign(b"m") == software_hmac(second, b"m")
    assert loaded_handles(device.tcti)["persistent"] == [SRK_HANDLE, ID_KEY_HANDLE, EK_HANDLE]


def test_challenge_from_tpm_challenge_module_imports(device: TpmDevice) -> None:
    challenge_mod = pytest.importorskip("tpm.challenge")
    challenge = challenge_mod.create_challenge(device.endorsement_key(), device.storage_root_key())
    device.import_activation_blob(challenge.blob)
    assert device.signer().sign(b"hub") == software_hmac(challenge.key, b"hub")


@pytest.mark.parametrize("section", SECTIONS)
@pytest.mark.parametrize("where", ["content", "size"])
def test_tampered_blob_is_refused_and_tpm_stays_usable(
    device: TpmDevice, section: str, where: str
) -> None:
    old_key, key = os.urandom(32), os.urandom(32)
    device.import_activation_blob(make_blob(device, old_key))
    blob = make_blob(device, key)
    start, length = section_offsets(blob)[section]
    offset = start + 2 + (length - 2) // 2 if where == "content" else start + 1
    with pytest.raises((TpmActivationError, TpmBlobError)) as info:
        device.import_activation_blob(flip(blob, offset))
    if where == "size":
        assert info.type is TpmBlobError
    assert_nothing_loaded(device.tcti)
    assert device.signer().sign(b"m") == software_hmac(old_key, b"m")  # old key untouched
    device.import_activation_blob(blob)
    assert device.signer().sign(b"m") == software_hmac(key, b"m")


def test_data_section_is_ignored(device: TpmDevice) -> None:
    key = os.urandom(32)
    blob = make_blob(device, key)
    assert blob.endswith(b"\x00\x00")
    device.import_activation_blob(blob[:-2] + b"\x00\x04http")
    assert device.signer().sign(b"m") == software_hmac(key, b"m")


@pytest.mark.parametrize("damage", ["truncated", "trailing", "empty", "not bytes"])
def test_malformed_blob_raises_blob_error(device: TpmDevice, damage: str) -> None:
    blob = make_blob(device, os.urandom(32))
    bad: Any = {
        "truncated": blob[: len(blob) // 2],
        "trailing": blob + b"\x00\x00\x00",
        "empty": b"",
        "not bytes": base64.b64encode(blob).decode(),
    }[damage]
    with pytest.raises(TpmBlobError):
        device.import_activation_blob(bad)
    assert not device.has_identity_key()


def test_challenge_bound_to_ek_name_is_refused(device: TpmDevice) -> None:
    with pytest.raises(TpmActivationError, match=r"ActivateCredential.*integrity"):
        device.import_activation_blob(make_blob(device, os.urandom(32), bind_to_ek=True))
    assert_nothing_loaded(device.tcti)
    key = os.urandom(32)
    device.import_activation_blob(make_blob(device, key))
    assert device.signer().sign(b"m") == software_hmac(key, b"m")


def test_challenge_for_another_tpm_is_refused(device: TpmDevice, tmp_path: Path) -> None:
    with SwtpmProcess(tmp_path / "other") as other_tpm, TpmDevice(other_tpm.tcti) as other:
        other.ensure_keys()
        assert other.registration_id() != device.registration_id()
        blob = make_blob(other, os.urandom(32))
    with pytest.raises(TpmActivationError):
        device.import_activation_blob(blob)
    assert_nothing_loaded(device.tcti)


# -- errors -------------------------------------------------------------------------------------


def test_unreachable_tpm_names_the_tcti() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    with pytest.raises(TpmUnavailable, match=re.escape(f"cannot reach the TPM at {tcti}")) as info:
        TpmDevice(tcti)
    assert info.value.tcti == tcti


def test_tpm_going_away_raises_unavailable(device: TpmDevice, swtpm: SwtpmProcess) -> None:
    device.import_activation_blob(make_blob(device, os.urandom(32)))
    signer = device.signer()
    swtpm.stop()
    with pytest.raises(TpmUnavailable, match=re.escape(swtpm.tcti)):
        signer.sign(b"m")


def test_missing_keys_raise_tpm_error(device: TpmDevice) -> None:
    blob = make_blob(device, os.urandom(32))
    with pytest.raises(TpmError, match="identity key"):
        device.signer()
    elsewhere = TpmHandles(ek=0x81010002, srk=0x81000002, identity=0x81000102)
    with TpmDevice(device.tcti, elsewhere) as dev:
        with pytest.raises(TpmError, match="no EK persisted at 0x81010002"):
            dev.endorsement_key()
        with pytest.raises(TpmError, match="no EK"):
            dev.import_activation_blob(blob)
        with pytest.raises(TpmError, match="no EK"):
            dev.registration_id()
    assert_nothing_loaded(device.tcti)


def test_closed_device_raises_tpm_error(device: TpmDevice) -> None:
    device.close()
    device.close()
    with pytest.raises(TpmError, match="closed"):
        device.registration_id()


def test_swtpm_process_lifecycle(swtpm_state: Path) -> None:
    pytest.importorskip("tpm2_pytss")
    process = SwtpmProcess(swtpm_state)
    try:
        assert process.running
        assert process.tcti == f"swtpm:host=127.0.0.1,port={process.port}"
        assert process.ctrl_port == process.port + 1
        process.restart()
        assert process.running
        with TpmDevice(process.tcti) as dev:
            dev.ensure_keys()
    finally:
        process.stop()
    assert not process.running
    process.stop()
    assert (swtpm_state / "tpm2-00.permall").is_file()
