"""Drive a paho-mqtt 2.x :class:`~paho.mqtt.client.Client` from an asyncio event loop.

paho's own loops (``loop_forever``, ``loop_start``) block a thread in ``select``. This adapter uses
paho's external-loop hooks instead: the client's socket is registered with the event loop
(``add_reader`` / ``add_writer``), readiness calls ``loop_read`` / ``loop_write``, and one timer
handle (``loop.call_at``) calls ``loop_misc`` (keep-alive pings, ping time-outs) when paho's
keep-alive next needs it: an idle connection wakes about once per keep-alive period, not once a
second. Every paho callback
(``on_connect``, ``on_message``, ...) therefore runs in the event-loop thread, so a callback may
touch asyncio objects directly (``queue.put_nowait``, ``future.set_result``).

Use it with a client that is not driven by any other loop::

    adapter = AsyncioPahoAdapter(client)      # inside a coroutine, or pass the loop
    client.connect(host, port)                # blocking TCP + TLS handshake, see below
    ...                                       # publish / subscribe as usual
    await adapter.disconnect()                # DISCONNECT, wait for the socket to close
    adapter.close()                           # drop every registration with the loop

``Client.connect`` (and ``reconnect``) open the TCP connection and do the TLS handshake
synchronously, bounded by ``client.connect_timeout``; the event loop is blocked for that long.
Set ``connect_timeout`` to what the application can afford. One adapter serves one client; it
survives reconnects of that client (each new socket is registered as it opens). Unix event loops
only (the Windows proactor loop has no ``add_reader``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

#: Longest gap between two ``loop_misc`` calls when paho's keep-alive state cannot be read (or
#: the keep-alive is off); otherwise ``loop_misc`` runs when the keep-alive next needs it.
DEFAULT_MISC_INTERVAL = 1.0
#: Run ``loop_misc`` this long after paho's keep-alive deadline (paho compares with ``>=``).
_MISC_SLACK = 0.01


class AsyncioPahoAdapter:
    """Connects one paho client's socket to an asyncio event loop (see the module docstring)."""

    def __init__(
        self,
        client: mqtt.Client,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        misc_interval: float = DEFAULT_MISC_INTERVAL,
    ) -> None:
        self.client = client
        self.loop = loop if loop is not None else asyncio.get_running_loop()
        self.misc_interval = misc_interval
        self._reader_fd: int | None = None
        self._writer_fd: int | None = None
        self._misc_handle: asyncio.Handle | None = None
        self._socket_open = False
        self._close_waiters: list[asyncio.Future[None]] = []
        self._attached = True
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_socket_register_write
        client.on_socket_unregister_write = self._on_socket_unregister_write

    # -- paho socket callbacks (all called in the event-loop thread) --------------------------

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        self._remove_reader()
        self._reader_fd = fd
        self.loop.add_reader(fd, self._on_readable)
        self._socket_open = True
        if self._misc_handle is None:
            self._misc_handle = self.loop.call_soon(self._run_misc)
        log.debug("socket %d registered with the event loop", fd)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # paho calls this just before it closes the socket, so the descriptor is still valid.
        self._remove_writer()
        self._remove_reader()
        self._cancel_misc()
        self._mark_closed()
        log.debug("socket closed and unregistered")

    def _on_socket_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        fd = sock.fileno()
        if self._writer_fd == fd:
            return
        self._remove_writer()
        self._writer_fd = fd
        self.loop.add_writer(fd, self._on_writable)

    def _on_socket_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._remove_writer()

    # -- event-loop callbacks ----------------------------------------------------------------

    def _on_readable(self) -> None:
        self.client.loop_read()
        # A TLS record may hold more MQTT packets than one loop_read consumed; those bytes sit
        # decrypted inside the SSL object, where the selector cannot see them.
        sock = self.client.socket()
        pending = getattr(sock, "pending", None) if sock is not None else None
        if callable(pending) and pending() > 0:
            self.loop.call_soon(self._on_readable_if_open, sock)

    def _on_readable_if_open(self, sock: Any) -> None:
        if self.client.socket() is sock:
            self._on_readable()

    def _on_writable(self) -> None:
        self.client.loop_write()

    def _run_misc(self) -> None:
        self._misc_handle = None
        if self.client.loop_misc() != mqtt.MQTT_ERR_SUCCESS or not self._socket_open:
            return
        if self._misc_handle is None:
            delay = self._misc_delay()
            self._misc_handle = self.loop.call_later(delay, self._run_misc)

    def _misc_delay(self) -> float:
        """Seconds until paho's keep-alive next needs ``loop_misc``: a PINGREQ is due once
        ``keepalive`` s passed since the last packet out or the last bytes in, a missing PINGRESP
        once ``keepalive`` s passed since the PINGREQ."""
        client = self.client
        keepalive = getattr(client, "_keepalive", None)
        last_out = getattr(client, "_last_msg_out", None)
        last_in = getattr(client, "_last_bytes_received", None)
        ping_t = getattr(client, "_ping_t", 0)
        if (
            not isinstance(keepalive, (int, float))
            or keepalive <= 0
            or not isinstance(last_out, (int, float))
            or not isinstance(last_in, (int, float))
        ):
            return self.misc_interval
        due = min(last_out, last_in) + keepalive
        if isinstance(ping_t, (int, float)) and ping_t > 0:
            due = min(due, ping_t + keepalive)
        return max(0.0, due - time.monotonic()) + _MISC_SLACK

    # -- helpers -----------------------------------------------------------------------------

    def _remove_reader(self) -> None:
        if self._reader_fd is not None:
            self.loop.remove_reader(self._reader_fd)
            self._reader_fd = None

    def _remove_writer(self) -> None:
        if self._writer_fd is not None:
            self.loop.remove_writer(self._writer_fd)
            self._writer_fd = None

    def _mark_closed(self) -> None:
        self._socket_open = False
        waiters, self._close_waiters = self._close_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _cancel_misc(self) -> None:
        handle, self._misc_handle = self._misc_handle, None
        if handle is not None:
            handle.cancel()

    # -- public ------------------------------------------------------------------------------

    @property
    def socket_open(self) -> bool:
        """True while the client has a socket registered with the loop."""
        return self._socket_open

    async def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait until the client's socket has been closed; False if ``timeout`` ran out first."""
        if not self._socket_open:
            return True
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._close_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def disconnect(self, timeout: float = 1.0) -> bool:
        """Send DISCONNECT and wait (at most ``timeout``) for paho to close the socket.

        Returns True when the socket is closed. Does nothing if no socket is open.
        """
        if self.client.socket() is None:
            return True
        self.client.disconnect()
        return await self.wait_closed(timeout)

    def close(self) -> None:
        """Unregister everything from the loop and detach from the client. Idempotent.

        Does not close the client's socket: call :meth:`disconnect` first for a clean shutdown.
        """
        self._remove_writer()
        self._remove_reader()
        self._cancel_misc()
        if self._attached:
            self._attached = False
            self.client.on_socket_open = None
            self.client.on_socket_close = None
            self.client.on_socket_register_write = None
            self.client.on_socket_unregister_write = None
        self._mark_closed()

    async def aclose(self, timeout: float = 1.0) -> None:
        """:meth:`disconnect` (bounded by ``timeout``), then :meth:`close`, even on errors."""
        try:
            with contextlib.suppress(OSError):
                await self.disconnect(timeout)
        finally:
            self.close()
