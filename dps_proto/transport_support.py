"""What the DPS (MQTT, HTTPS) and IoT Hub (MQTT) transports share: the client TLS context, paho
socket hygiene, CONNACK codes and messages, connect-error messages, credential choice and
argument checks.

Nothing here raises an error type of its own choosing: every check takes an ``error`` factory
(an exception class such as :class:`~dps_proto.errors.DpsError` or ``HubError``), and the message
helpers return text, so each transport keeps raising its own typed errors. paho is not imported
(its client is only duck-typed), so the HTTPS transport can use this module without it.
"""

from __future__ import annotations

import logging
import math
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .sas import KeySigner, Signer, derive_device_key

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

__all__ = [
    "CONNACK_MEANINGS",
    "ClosingSSLSocket",
    "ErrorFactory",
    "check_int",
    "check_seconds",
    "check_text",
    "client_ssl_context",
    "close_client_sockets",
    "connack_code",
    "connack_message",
    "connect_error_message",
    "is_certificate_refusal",
    "make_signer",
    "require_one",
]

log = logging.getLogger(__name__)

#: Builds the transport's own typed error from a message (an exception class will do).
ErrorFactory = Callable[[str], Exception]

#: MQTT 3.1.1 CONNACK return codes, by the name paho 2.x gives them as reason codes.
_CONNACK_CODES = {
    "Unsupported protocol version": 1,
    "Client identifier not valid": 2,
    "Server unavailable": 3,
    "Bad user name or password": 4,
    "Not authorized": 5,
}
#: What each refusing CONNACK return code means; a transport may word some its own way.
CONNACK_MEANINGS: Mapping[int, str] = {
    1: "unacceptable protocol version",
    2: "client identifier rejected",
    3: "server unavailable",
    4: "bad user name or password",
    5: "not authorized",
}


# -- TLS and paho sockets -------------------------------------------------------------------


class ClosingSSLSocket(ssl.SSLSocket):
    """An SSL socket that closes itself when its handshake fails.

    paho 2.x does not close the socket when ``do_handshake`` raises (a wrong CA, a host name
    mismatch), leaving it to the garbage collector; this closes it at once.
    """

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


def client_ssl_context(
    ca_file: str | None,
    ssl_context: ssl.SSLContext | None,
    *,
    error: ErrorFactory,
    client_cert: str | None = None,
    client_key: str | None = None,
) -> ssl.SSLContext:
    """``ssl_context`` if given; else TLS 1.2+ with certificate and host name checks that trusts
    ``ca_file`` (or the system store) and uses :class:`ClosingSSLSocket`.

    With ``client_cert`` (PEM file: the device certificate first, then any intermediates) and
    ``client_key`` (PEM file; None when the key is in ``client_cert``), the context presents that
    chain as the TLS client certificate (X.509 attestation); it is loaded into ``ssl_context``
    too when both are given. ``error(message)`` is raised when the CA certificates or the client
    certificate and key cannot be loaded.
    """
    if client_key is not None and client_cert is None:
        raise error("client_key needs client_cert (the certificate it belongs to)")
    if ssl_context is not None:
        if client_cert is not None:
            _load_client_cert(ssl_context, client_cert, client_key, error)
        return ssl_context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.sslsocket_class = ClosingSSLSocket
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = True
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        if ca_file is not None:
            context.load_verify_locations(cafile=ca_file)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as exc:
        raise error(f"cannot load CA certificates from {ca_file!r}: {exc}") from exc
    if client_cert is not None:
        _load_client_cert(context, client_cert, client_key, error)
    return context


def _load_client_cert(
    context: ssl.SSLContext, cert: str, key: str | None, error: ErrorFactory
) -> None:
    for name, value in (("client_cert", cert), ("client_key", key)):
        if value is not None and (not isinstance(value, str) or not value):
            raise error(f"{name} must be the path of a PEM file")
    try:
        context.load_cert_chain(certfile=cert, keyfile=key)
    except (OSError, ssl.SSLError) as exc:
        keys = f" and key {key!r}" if key is not None else ""
        raise error(f"cannot load the client certificate {cert!r}{keys}: {exc}") from exc


def is_certificate_refusal(exc: BaseException) -> bool:
    """Whether a TLS error is the server's alert about our client certificate (unknown CA,
    bad, expired or missing certificate): retrying with the same certificate cannot help."""
    if not isinstance(exc, ssl.SSLError):
        return False
    reason = str(getattr(exc, "reason", "") or exc).upper()
    return "ALERT" in reason and any(
        word in reason for word in ("CERTIFICATE", "UNKNOWN_CA", "ACCESS_DENIED")
    )


def set_nodelay(client: mqtt.Client) -> None:
    """Turn Nagle's algorithm off on a connected client: small MQTT request/reply packets
    otherwise wait for a delayed ACK (~40 ms each)."""
    sock = client.socket()
    if not isinstance(sock, socket.socket):  # SSLSocket is a socket.socket; websockets are not
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:
        log.debug("could not set TCP_NODELAY: %s", exc)


def close_client_sockets(client: mqtt.Client) -> None:
    """Close whatever sockets a paho client still holds, now rather than at garbage collection.

    ``Client.loop()`` opens a wake-up socket pair that paho closes only in ``__del__``; its
    ``_reset_sockets`` closes the network socket and that pair (and is what ``__del__`` calls).
    """
    reset = getattr(client, "_reset_sockets", None)
    if callable(reset):
        try:
            reset()
        except OSError:
            log.debug("error closing the MQTT sockets", exc_info=True)


# -- connection outcomes --------------------------------------------------------------------


def connack_code(reason: Any) -> int:
    """The MQTT 3.1.1 return code behind paho 2.x's CONNACK reason code (0: accepted)."""
    if not getattr(reason, "is_failure", False):
        return 0
    name = reason.getName() if hasattr(reason, "getName") else str(reason)
    return _CONNACK_CODES.get(str(name), 255)


def connack_message(
    return_code: int,
    *,
    service: str,
    host: str,
    port: int,
    client_id: str,
    meanings: Mapping[int, str] = CONNACK_MEANINGS,
) -> str:
    """Why ``service`` at ``host:port`` refused ``client_id``, for a refusing CONNACK code."""
    meaning = meanings.get(return_code, "unknown reason")
    return (
        f"{service} {host}:{port} refused the connection of {client_id!r}: {meaning}"
        f" (CONNACK return code {return_code})"
    )


def connect_error_message(
    host: str, port: int, exc: BaseException, *, service: str | None = None
) -> str:
    """Why the TCP/TLS connection to ``host:port`` could not be opened, in words.

    With ``service``, a refused connection asks whether that service listens there.
    """
    where = f"{host}:{port}"
    if is_certificate_refusal(exc):
        return f"{where} refused the TLS client certificate: {exc}"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed for {where}: {exc.verify_message or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake with {where} failed: {exc}"
    if isinstance(exc, ConnectionRefusedError):
        hint = f" (is {service} listening there?)" if service else ""
        return f"connection to {where} refused{hint}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve {host!r}: {exc}"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return f"timed out connecting to {where}"
    return f"cannot connect to {where}: {exc}"


# -- credentials ----------------------------------------------------------------------------


def require_one(options: Mapping[str, object], *, error: ErrorFactory) -> str:
    """The name of the one entry of ``options`` that is not None; ``error`` unless exactly one.

    ``options`` maps argument names (in the order the message lists them) to their values.
    """
    given = [name for name, value in options.items() if value is not None]
    if len(given) != 1:
        *first, last = options
        listed = f"{', '.join(first)} or {last}" if first else last
        raise error(
            f"give exactly one of {listed}" + (f" (got {', '.join(given)})" if given else "")
        )
    return given[0]


def make_signer(
    *,
    symmetric_key: str | None = None,
    group_key: str | None = None,
    registration_id: str | None = None,
    signer: Signer | None = None,
    error: ErrorFactory,
) -> Signer | None:
    """The SAS signer for the credential given (check there is only one with :func:`require_one`).

    ``signer`` is used as it is (``error`` unless it has a ``sign`` method); ``group_key`` signs
    with the device key derived for ``registration_id`` (then required); ``symmetric_key`` is the
    device key itself. None when none is given (a TPM: its signer exists only after the
    challenge). A key that is not base64 raises :class:`~dps_proto.errors.SasError`.
    """
    if signer is not None:
        if not callable(getattr(signer, "sign", None)):
            raise error("signer must have a sign(bytes) -> bytes method")
        return signer
    if group_key is not None:
        if registration_id is None:
            raise error("a group_key needs the registration_id to derive the device key")
        return KeySigner.from_base64(derive_device_key(group_key, registration_id))
    if symmetric_key is not None:
        return KeySigner.from_base64(symmetric_key)
    return None


# -- argument checks ------------------------------------------------------------------------


def check_text(name: str, value: object, *, error: ErrorFactory) -> None:
    """``error`` unless ``value`` is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise error(f"{name} must be a non-empty string")


def check_int(name: str, value: object, low: int, high: int, *, error: ErrorFactory) -> None:
    """``error`` unless ``value`` is an integer (not a bool) in ``low..high``."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise error(f"{name} must be an integer in {low}..{high}")


def check_seconds(name: str, value: object, *, error: ErrorFactory, integer: bool = False) -> None:
    """``error`` unless ``value`` is a positive number of seconds: a finite int or float, or with
    ``integer`` an int (never a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        valid = False
    elif integer:
        valid = isinstance(value, int) and value > 0
    else:
        try:
            valid = value > 0 and math.isfinite(value)
        except OverflowError:  # an int too large to be a float
            valid = False
    if not valid:
        raise error(f"{name} must be a positive number of seconds")
