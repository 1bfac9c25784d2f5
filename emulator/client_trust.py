"""TLS client certificates for the emulator's listeners (MQTT and DPS's HTTPS API).

Azure accepts any client certificate in the TLS handshake and judges it afterwards (DPS answers
401002 "Invalid certificate."). Python's ``ssl`` has no verify callback, so a server that asks for
client certificates can only accept those that chain to certificates it trusts. Decision: the
server *requests* a certificate without requiring one (``CERT_OPTIONAL``) and trusts, as anchors,
the emulator's CA (certificates it issued from CSRs) and every certificate of an X.509 enrollment
(individual enrollments' device certificates, groups' CA or intermediate signing certificates),
with ``VERIFY_X509_PARTIAL_CHAIN`` (an intermediate or a device certificate can be an anchor) and
OpenSSL's ``X509_V_FLAG_NO_CHECK_TIME`` (validity is judged by the emulator at its own clock, so an
expired certificate gets Azure's 401002 instead of a TLS alert). Everything else (which
enrollment, thumbprints, chain signatures, CN, disabled enrollments) is decided by DPS and the hub
from the chain the device presented (:func:`peer_chain`, :mod:`emulator.x509`).

Keeping the anchors current: anchors are only ever added. Every handshake runs the context's
``sni_callback`` (OpenSSL calls it for every ClientHello, with or without SNI), which compares the
store's enrollment generation with the one last loaded and, when it moved, adds the certificates
of new X.509 enrollments with ``load_verify_locations(cadata=...)``; the running listeners keep
their one context. An anchor whose enrollment was deleted stays trusted by TLS until the emulator
restarts, which is harmless: DPS and the hub refuse the certificate at the application level, as
Azure does. A certificate from an issuer the emulator has never seen is refused in the handshake
(a TLS alert instead of Azure's 401002): that is the one deviation.
"""

from __future__ import annotations

import json
import logging
import ssl
import threading
from typing import TYPE_CHECKING, Any

from .errors import CertificateError

if TYPE_CHECKING:
    from .certs import CertPaths
    from .store import Store

__all__ = ["ClientTrust", "peer_chain"]

log = logging.getLogger(__name__)

#: OpenSSL's X509_V_FLAG_NO_CHECK_TIME (1.1.0+), which ``ssl`` has no constant for.
VERIFY_NO_CHECK_TIME = 0x200000


def peer_chain(ssl_object: Any) -> tuple[bytes, ...]:
    """The certificates the peer presented, DER, leaf first (empty without a client certificate).

    Python 3.13 has ``get_unverified_chain()`` on SSL sockets and objects; 3.10 to 3.12 have it on
    their private ``_sslobj``. Without either only the leaf is known.
    """
    if ssl_object is None:
        return ()
    getter = getattr(ssl_object, "get_unverified_chain", None)
    if not callable(getter):
        getter = getattr(getattr(ssl_object, "_sslobj", None), "get_unverified_chain", None)
    chain: list[bytes] = []
    if callable(getter):
        try:
            items = getter() or []
        except (ValueError, ssl.SSLError, OSError):
            items = []
        for item in items:
            if isinstance(item, (bytes, bytearray)):
                chain.append(bytes(item))
            elif callable(getattr(item, "public_bytes", None)):
                chain.append(bytes(item.public_bytes(ssl._ssl.ENCODING_DER)))  # type: ignore[attr-defined]
    if not chain:
        try:
            leaf = ssl_object.getpeercert(binary_form=True)
        except (ValueError, ssl.SSLError, OSError):
            leaf = None
        if leaf:
            chain.append(bytes(leaf))
    return tuple(chain)


class ClientTrust:
    """The listeners' TLS server context and the client-certificate anchors it trusts.

    ``store`` is the emulator's :class:`~emulator.store.Store` (its ``enrollment_generation`` and
    the certificates of X.509 enrollments and groups are read).
    """

    def __init__(self, paths: CertPaths, store: Store) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._loaded: set[str] = set()
        self._generation: int | None = None
        from .certs import server_ssl_context  # cryptography: only when a server is built

        context = server_ssl_context(paths)
        context.verify_mode = ssl.CERT_OPTIONAL
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN | VERIFY_NO_CHECK_TIME
        try:
            context.load_verify_locations(cafile=str(paths.ca_cert))
        except (OSError, ssl.SSLError) as exc:
            raise CertificateError(f"cannot load the emulator CA {paths.ca_cert}: {exc}") from exc
        context.sni_callback = self._on_client_hello
        self.context = context
        self.sync()

    @property
    def anchor_count(self) -> int:
        """Enrolled certificates loaded as anchors (the emulator CA not counted)."""
        return len(self._loaded)

    def _on_client_hello(
        self, ssl_object: Any, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        try:
            self.sync()
        except Exception:  # a handshake must not die of a bad record; the anchors stay as they were
            log.exception("cannot update the trusted client-certificate anchors")

    def sync(self) -> int:
        """Add the certificates of X.509 enrollments not yet trusted; returns how many were added.

        Cheap when nothing changed (one integer comparison).
        """
        generation = self._store.enrollment_generation
        if generation == self._generation:
            return 0
        with self._lock:
            if generation == self._generation:
                return 0
            pems = [pem for pem in self._enrolled_certificates() if pem not in self._loaded]
            added = 0
            for pem in dict.fromkeys(pems):
                try:
                    self.context.load_verify_locations(cadata=pem)
                except ssl.SSLError as exc:
                    log.warning("cannot trust an enrolled certificate: %s", exc)
                    continue
                self._loaded.add(pem)
                added += 1
            self._generation = generation
        if added:
            log.info("trusting %d more enrolled client certificate(s) in TLS", added)
        return added

    def _enrolled_certificates(self) -> list[str]:
        """The PEM certificates of every X.509 enrollment and group.

        Read from the stored JSON (validated when it was written) without parsing the records:
        the scan runs on a handshake after every enrollment change, and fleets of symmetric-key
        enrollments must not make it slow.
        """
        rows: list[str] = []
        for table, column in (
            ("individual_enrollments", "registration_id"),
            ("enrollment_groups", "group_id"),
        ):
            rows += self._store._list_rows(table, column)
        pems: list[str] = []
        for text in rows:
            if '"x509"' not in text:
                continue
            try:
                section = json.loads(text)["attestation"]["x509"]
            except (ValueError, KeyError, TypeError):
                continue
            for kind in ("clientCertificates", "signingCertificates"):
                certificates = section.get(kind) if isinstance(section, dict) else None
                if not isinstance(certificates, dict):
                    continue
                for name in ("primary", "secondary"):
                    entry = certificates.get(name)
                    pem = entry.get("certificate") if isinstance(entry, dict) else None
                    if isinstance(pem, str) and pem:
                        pems.append(pem)
        return pems
