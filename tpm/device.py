"""The device side of Azure's TPM attestation, on a real TPM through tpm2-pytss (ESAPI).

A :class:`TpmDevice` makes sure the EK and SRK exist at the handles Azure's SDKs use, derives the
registration id from the EK, activates and imports the identity key DPS sends in its challenge,
and signs SAS tokens with that key *inside* the TPM (:meth:`TpmDevice.signer`).

tpm2-pytss is imported lazily, inside the methods, so ``import tpm`` works without it.

Log noise: tpm2-tss prints its own ``ERROR:esys:...`` lines to stderr when a TPM command fails
(e.g. a tampered blob). Presence checks here use TPM2_GetCapability, so probing an absent handle
prints nothing. To silence the rest set ``TSS2_LOG=all+NONE`` in the environment before the first
TPM call (tpm2-tss reads it once, on its first log event); this module does not set it for you.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from .blob import parse_activation_blob
from .errors import TpmActivationError, TpmBlobError, TpmError, TpmUnavailable

log = logging.getLogger(__name__)

#: Persistent handles used by Azure's SDKs (C SDK ``hsm_client_tpm.c``, Node, C#).
EK_HANDLE = 0x81010001
SRK_HANDLE = 0x81000001
ID_KEY_HANDLE = 0x81000100

#: TPM2B_MAX_BUFFER holds at most this many bytes in tpm2-tss (TPM2_MAX_DIGEST_BUFFER).
TSS_MAX_BUFFER = 1024
#: Used when the TPM does not report TPM2_PT_INPUT_BUFFER.
DEFAULT_INPUT_BUFFER = 1024

_TCTI_LAYER = 0x0A0000
_LAYER_MASK = 0xFF0000


@dataclass(frozen=True)
class TpmHandles:
    """Where the EK, SRK and DPS identity key are persisted (Azure's defaults)."""

    ek: int = EK_HANDLE
    srk: int = SRK_HANDLE
    identity: int = ID_KEY_HANDLE


def _unmarshal_exact(cls: Any, name: str, data: bytes) -> Any:
    """A tpm2-pytss TPM2B from exactly ``data``; :class:`TpmBlobError` if it does not parse."""
    from tpm2_pytss import TSS2_Exception

    try:
        value, used = cls.unmarshal(data)
    except (TSS2_Exception, ValueError, TypeError, IndexError) as exc:
        raise TpmBlobError(
            f"activation blob section {name} is not a valid {cls.__name__}: {exc}"
        ) from exc
    if used != len(data):
        raise TpmBlobError(
            f"activation blob section {name}: {cls.__name__} used {used} of {len(data)} bytes"
        )
    return value


def _rc_text(exc: Exception) -> str:
    rc = getattr(exc, "rc", None)
    return f"{exc} (rc 0x{int(rc):x})" if rc is not None else str(exc)


def _is_tcti_error(exc: Exception) -> bool:
    rc = getattr(exc, "rc", None)
    return rc is not None and int(rc) & _LAYER_MASK == _TCTI_LAYER


def _srk_template() -> Any:
    """Azure's SRK: RSA-2048 storage key, AES-128-CFB, null scheme, default exponent, no policy."""
    from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC

    public = TPM2B_PUBLIC(
        publicArea=TPMT_PUBLIC(
            type=TPM2_ALG.RSA,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=(
                TPMA_OBJECT.RESTRICTED
                | TPMA_OBJECT.DECRYPT
                | TPMA_OBJECT.FIXEDTPM
                | TPMA_OBJECT.FIXEDPARENT
                | TPMA_OBJECT.NODA
                | TPMA_OBJECT.USERWITHAUTH
                | TPMA_OBJECT.SENSITIVEDATAORIGIN
            ),
        )
    )
    rsa = public.publicArea.parameters.rsaDetail
    rsa.symmetric.algorithm = TPM2_ALG.AES
    rsa.symmetric.keyBits.aes = 128
    rsa.symmetric.mode.aes = TPM2_ALG.CFB
    rsa.scheme.scheme = TPM2_ALG.NULL
    rsa.keyBits = 2048
    rsa.exponent = 0
    return public


def _aes128_cfb() -> Any:
    from tpm2_pytss import TPM2_ALG, TPMT_SYM_DEF_OBJECT

    sym = TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.AES)
    sym.keyBits.aes = 128
    sym.mode.aes = TPM2_ALG.CFB
    return sym


class TpmSigner:
    """A ``dps_proto.sas.Signer`` whose HMAC-SHA256 runs inside the TPM with the identity key.

    The key never leaves the TPM. Shares the :class:`TpmDevice` (and its lock); valid until the
    device is closed. After a re-import it signs with the new key.
    """

    def __init__(self, device: TpmDevice) -> None:
        self._device = device

    def sign(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` with the key persisted at the identity handle."""
        return self._device._hmac(data)

    def __repr__(self) -> str:
        return f"TpmSigner(handle=0x{self._device.handles.identity:08x})"


class TpmDevice:
    """One TPM, opened through a TCTI string chosen by the user ('device:/dev/tpmrm0', 'tabrmd',
    'swtpm:host=...,port=...').

    The ESAPI context is opened in the constructor (:class:`TpmUnavailable` if that fails) and
    closed by :meth:`close` or ``with``. Not meant to be shared between threads: one ESAPI context
    is one conversation with the TPM (and swtpm has no resource manager). Calls are serialised by
    a lock all the same, so concurrent use is slow but not corrupting.
    """

    def __init__(self, tcti: str, handles: TpmHandles = TpmHandles()) -> None:
        if not isinstance(tcti, str) or not tcti:
            raise TpmError("a TCTI must be a non-empty string such as 'device:/dev/tpmrm0'")
        self.tcti = tcti
        self.handles = handles
        self._lock = threading.RLock()
        self._trs: dict[int, Any] = {}
        self._input_buffer: int | None = None
        self._ctx: Any = self._open()

    def _open(self) -> Any:
        try:
            from tpm2_pytss import ESAPI, TSS2_Exception
        except ImportError as exc:
            raise TpmUnavailable(self.tcti, f"tpm2-pytss is not installed ({exc})") from exc
        try:
            return ESAPI(self.tcti)
        except TSS2_Exception as exc:
            raise TpmUnavailable(self.tcti, _rc_text(exc)) from exc
        except (ValueError, TypeError, OSError, RuntimeError) as exc:
            raise TpmUnavailable(self.tcti, str(exc) or type(exc).__name__) from exc

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Release the ESAPI context; persistent keys stay in the TPM. Idempotent."""
        with self._lock:
            ctx, self._ctx = self._ctx, None
            self._trs.clear()
            if ctx is not None:
                ctx.close()

    def __enter__(self) -> TpmDevice:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._ctx is None else "open"
        return f"TpmDevice({self.tcti!r}, {state})"

    # -- helpers ---------------------------------------------------------------------------

    def _esapi(self) -> Any:
        if self._ctx is None:
            raise TpmError(f"the TPM device {self.tcti} is closed")
        return self._ctx

    @contextlib.contextmanager
    def _tpm_call(self, what: str, error: type[TpmError] = TpmError) -> Iterator[None]:
        """Turn a tpm2-pytss failure into ``error`` (:class:`TpmUnavailable` for TCTI faults)."""
        from tpm2_pytss import TSS2_Exception

        try:
            yield
        except TSS2_Exception as exc:
            if _is_tcti_error(exc):
                raise TpmUnavailable(self.tcti, f"{what}: {_rc_text(exc)}") from exc
            raise error(f"{what} failed: {_rc_text(exc)}") from exc

    def _flush(self, handle: Any) -> None:
        """Flush a transient object or session; a failure is logged, never raised."""
        from tpm2_pytss import TSS2_Exception

        try:
            self._esapi().flush_context(handle)
        except (TSS2_Exception, TpmError) as exc:
            log.warning("could not flush a TPM handle: %s", exc)

    def _present(self, handle: int) -> bool:
        """Whether a persistent handle (or NV index) is in use; quiet, unlike ReadPublic probes."""
        from tpm2_pytss import TPM2_CAP

        with self._tpm_call(f"GetCapability(handles 0x{handle:08x})"):
            _, data = self._esapi().get_capability(TPM2_CAP.HANDLES, handle, 1)
        found = list(data.data.handles)
        return bool(found) and int(found[0]) == handle

    def _persistent(self, handle: int) -> Any | None:
        """The ESYS_TR of a persistent object, or None if the handle is empty (cached)."""
        tr = self._trs.get(handle)
        if tr is not None:
            return tr
        if not self._present(handle):
            return None
        with self._tpm_call(f"ReadPublic(0x{handle:08x})"):
            tr = self._esapi().tr_from_tpmpublic(handle)
        self._trs[handle] = tr
        return tr

    def _require(self, handle: int, what: str) -> Any:
        tr = self._persistent(handle)
        if tr is None:
            raise TpmError(f"no {what} persisted at 0x{handle:08x}; call ensure_keys() first")
        return tr

    def _public_bytes(self, handle: int, what: str) -> bytes:
        with self._lock:
            tr = self._require(handle, what)
            with self._tpm_call(f"ReadPublic({what})"):
                public, _, _ = self._esapi().read_public(tr)
            return bytes(public.marshal())

    def _create_persistent(self, handle: int, what: str, template: Any, hierarchy: Any) -> None:
        from tpm2_pytss import ESYS_TR

        ctx = self._esapi()
        with self._tpm_call(f"CreatePrimary({what})"):
            transient, _, _, _, _ = ctx.create_primary(None, template, hierarchy)
        try:
            with self._tpm_call(f"EvictControl({what} -> 0x{handle:08x})"):
                self._trs[handle] = ctx.evict_control(ESYS_TR.OWNER, transient, handle)
        finally:
            self._flush(transient)
        log.info("created the %s and persisted it at 0x%08x", what, handle)

    def _ek_template(self) -> Any:
        """The TCG EK template (RSA-2048), honouring a template/nonce the vendor stored in NV."""
        from tpm2_pytss.utils import NoSuchIndex, NVReadEK, create_ek_template

        device = self

        class _QuietNVReadEK(NVReadEK):  # type: ignore[misc]
            """NVReadEK that checks an index exists first, so absent ones print no ESYS error."""

            def __call__(self, index: int) -> bytes:
                if not device._present(int(index)):
                    raise NoSuchIndex(index)
                return bytes(super().__call__(index))

        with self._tpm_call("reading the EK template from NV"):
            _, template = create_ek_template("EK-RSA2048", _QuietNVReadEK(self._esapi()))
        return template

    def _input_buffer_size(self) -> int:
        """TPM2_PT_INPUT_BUFFER, capped at what a TPM2B_MAX_BUFFER can carry."""
        if self._input_buffer is None:
            from tpm2_pytss import TPM2_CAP, TPM2_PT

            size = DEFAULT_INPUT_BUFFER
            with self._tpm_call("GetCapability(TPM2_PT_INPUT_BUFFER)"):
                _, data = self._esapi().get_capability(
                    TPM2_CAP.TPM_PROPERTIES, TPM2_PT.INPUT_BUFFER, 1
                )
            for prop in data.data.tpmProperties:
                if int(prop.property) == int(TPM2_PT.INPUT_BUFFER) and int(prop.value) > 0:
                    size = int(prop.value)
            self._input_buffer = min(size, TSS_MAX_BUFFER)
        return self._input_buffer

    # -- keys ------------------------------------------------------------------------------

    def ensure_keys(self) -> None:
        """Create and persist the EK and SRK if (and only if) their handles are empty.

        EK: standard TCG RSA-2048 template under the endorsement hierarchy; SRK: Azure's template
        under the owner hierarchy. Needs empty endorsement/owner auth (the default); never takes
        ownership or clears anything. Keys already present are left exactly as they are.
        """
        from tpm2_pytss import ESYS_TR

        with self._lock:
            if self._persistent(self.handles.ek) is None:
                self._create_persistent(
                    self.handles.ek, "EK", self._ek_template(), ESYS_TR.ENDORSEMENT
                )
            if self._persistent(self.handles.srk) is None:
                self._create_persistent(self.handles.srk, "SRK", _srk_template(), ESYS_TR.OWNER)

    def endorsement_key(self) -> bytes:
        """The EK's marshalled TPM2B_PUBLIC (2-byte size + TPMT_PUBLIC), as DPS wants it."""
        return self._public_bytes(self.handles.ek, "EK")

    def storage_root_key(self) -> bytes:
        """The SRK's marshalled TPM2B_PUBLIC."""
        return self._public_bytes(self.handles.srk, "SRK")

    def registration_id(self) -> str:
        """Azure's TPM registration id: lower-case base32(SHA-256(EK TPM2B_PUBLIC)), no '='."""
        digest = hashlib.sha256(self.endorsement_key()).digest()
        return base64.b32encode(digest).decode("ascii").lower().rstrip("=")

    def has_identity_key(self) -> bool:
        """Whether an identity key is persisted at ``handles.identity`` (asks the TPM each time)."""
        with self._lock:
            return self._present(self.handles.identity)

    # -- activation ------------------------------------------------------------------------

    def import_activation_blob(self, blob: bytes) -> None:
        """Activate a DPS challenge (``authenticationKey``, base64-decoded) and persist its key.

        ActivateCredential (SRK, EK under PolicySecret(endorsement)) recovers the inner wrap key;
        Import + Load put the identity key under the SRK; it replaces any key at
        ``handles.identity``. :class:`TpmBlobError` for a malformed blob,
        :class:`TpmActivationError` if the TPM refuses it. Sessions and transient objects are
        flushed on every path, so the TPM stays usable after a failure.
        """
        from tpm2_pytss import (
            TPM2B_DATA,
            TPM2B_ENCRYPTED_SECRET,
            TPM2B_ID_OBJECT,
            TPM2B_PRIVATE,
            TPM2B_PUBLIC,
        )

        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise TpmBlobError(f"an activation blob must be bytes, not {type(blob).__name__}")
        parts = parse_activation_blob(bytes(blob))
        id_object = _unmarshal_exact(TPM2B_ID_OBJECT, "id_object", parts.id_object)
        secret = _unmarshal_exact(
            TPM2B_ENCRYPTED_SECRET, "encrypted_secret", parts.encrypted_secret
        )
        duplicate = _unmarshal_exact(TPM2B_PRIVATE, "duplicate", parts.duplicate)
        sym_seed = _unmarshal_exact(TPM2B_ENCRYPTED_SECRET, "sym_seed", parts.sym_seed)
        public = _unmarshal_exact(TPM2B_PUBLIC, "public", parts.public)
        _unmarshal_exact(TPM2B_DATA, "data", parts.data)

        with self._lock:
            ek = self._require(self.handles.ek, "EK")
            srk = self._require(self.handles.srk, "SRK")
            inner_key = self._activate_credential(srk, ek, id_object, secret)
            ctx = self._esapi()
            with self._tpm_call("Import of the identity key", TpmActivationError):
                private = ctx.import_(
                    srk, TPM2B_DATA(bytes(inner_key)), public, duplicate, sym_seed, _aes128_cfb()
                )
            with self._tpm_call("Load of the identity key", TpmActivationError):
                key = ctx.load(srk, private, public)
            try:
                self._persist_identity(key)
            finally:
                self._flush(key)
        log.info("identity key imported and persisted at 0x%08x", self.handles.identity)

    def _activate_credential(self, srk: Any, ek: Any, id_object: Any, secret: Any) -> bytes:
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPMT_SYM_DEF

        ctx = self._esapi()
        with self._tpm_call("StartAuthSession(policy)", TpmActivationError):
            session = ctx.start_auth_session(
                tpm_key=ESYS_TR.NONE,
                bind=ESYS_TR.NONE,
                session_type=TPM2_SE.POLICY,
                symmetric=TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                auth_hash=TPM2_ALG.SHA256,
            )
        try:
            with self._tpm_call("PolicySecret(endorsement)", TpmActivationError):
                ctx.policy_secret(ESYS_TR.ENDORSEMENT, session, b"", b"", b"", 0)
            with self._tpm_call("ActivateCredential", TpmActivationError):
                inner_key = ctx.activate_credential(
                    srk, ek, id_object, secret, session1=ESYS_TR.PASSWORD, session2=session
                )
        finally:
            self._flush(session)
        value = bytes(inner_key)
        if not value:
            raise TpmActivationError(
                "ActivateCredential returned an empty inner wrap key (endorsement auth needed?)"
            )
        return value

    def _persist_identity(self, key: Any) -> None:
        from tpm2_pytss import ESYS_TR

        handle = self.handles.identity
        ctx = self._esapi()
        old = self._persistent(handle)
        if old is not None:
            with self._tpm_call(f"EvictControl(remove 0x{handle:08x})", TpmActivationError):
                ctx.evict_control(ESYS_TR.OWNER, old, handle)
            self._trs.pop(handle, None)
        with self._tpm_call(f"EvictControl(persist 0x{handle:08x})", TpmActivationError):
            self._trs[handle] = ctx.evict_control(ESYS_TR.OWNER, key, handle)

    # -- signing ---------------------------------------------------------------------------

    def signer(self) -> TpmSigner:
        """A Signer for SAS tokens, HMAC-ing with the persisted identity key inside the TPM."""
        with self._lock:
            self._require(self.handles.identity, "identity key")
        return TpmSigner(self)

    def _hmac(self, data: bytes) -> bytes:
        from tpm2_pytss import ESYS_TR, TPM2_ALG

        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TpmError(f"can only sign bytes, not {type(data).__name__}")
        data = bytes(data)
        with self._lock:
            key = self._require(self.handles.identity, "identity key")
            ctx = self._esapi()
            chunk = self._input_buffer_size()
            if len(data) <= chunk:
                with self._tpm_call("HMAC"):
                    return bytes(ctx.hmac(key, data, TPM2_ALG.SHA256))
            with self._tpm_call("HMAC_Start"):
                sequence = ctx.hmac_start(key, b"", TPM2_ALG.SHA256)
            completed = False
            try:
                offset = 0
                while len(data) - offset > chunk:
                    with self._tpm_call("SequenceUpdate"):
                        ctx.sequence_update(sequence, data[offset : offset + chunk])
                    offset += chunk
                with self._tpm_call("SequenceComplete"):
                    digest, _ = ctx.sequence_complete(sequence, data[offset:], ESYS_TR.NULL)
                completed = True
            finally:
                if not completed:
                    self._flush(sequence)
            return bytes(digest)
