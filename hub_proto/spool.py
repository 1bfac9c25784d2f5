"""A durable spool for accepted telemetry: a SQLite file that outlives the process.

The transports (:class:`~hub_proto.mqtt_transport.HubClient`, ``AsyncHubClient``) write a message
here when they accept it (before ``send_message`` returns) and delete it once its fate is final
(acknowledged, written, or dropped by the queue's own limits). What is left when a process ends is
handed back to :meth:`~hub_proto.session.HubSession.restore`, oldest first, by the next client
that opens the same file.

A row holds only topic-independent data (payload, application and system properties, QoS and the
wall-clock time of acceptance), so a spool survives a change of hub. The file uses WAL journaling;
``synchronous`` is ``NORMAL`` by default (a committed message survives a crash of the process; use
``FULL`` to survive a power cut too, at the price of an fsync per message). One spool file serves
one client at a time. Standard library only.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import HubError
from .message import SYSTEM_PROPERTIES, Message

log = logging.getLogger(__name__)

#: Schema version stored in ``PRAGMA user_version``.
SCHEMA_VERSION = 1
_FIELD_BY_KEY = {key: name for name, key in SYSTEM_PROPERTIES.items()}
_SYNCHRONOUS = ("OFF", "NORMAL", "FULL", "EXTRA")


class SpoolError(HubError):
    """The spool file cannot be opened, read or written (or a message cannot be stored)."""


@dataclass(frozen=True)
class SpooledMessage:
    """One stored message: its row id (for :meth:`Spool.remove`), the message, its QoS and the
    wall-clock time (seconds since the epoch) at which it was accepted."""

    row_id: int
    message: Message
    qos: int
    accepted_at: float


def encode_row(message: Message, qos: int) -> tuple[bytes, str, str]:
    """The stored form of a message: payload, application properties (JSON) and system properties
    (JSON, keyed by Azure's ``$.`` names). :class:`SpoolError` for anything not storable."""
    if not isinstance(message, Message):
        raise SpoolError("the spool stores Message objects")
    if isinstance(qos, bool) or qos not in (0, 1):
        raise SpoolError("a spooled message has QoS 0 or 1")
    if not isinstance(message.payload, (bytes, bytearray)):
        raise SpoolError("a message payload must be bytes")
    system = message.system_properties()
    for mapping in (message.properties, system):
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()):
            raise SpoolError("message properties must map strings to strings")
    try:
        return (
            bytes(message.payload),
            json.dumps(message.properties, ensure_ascii=True, sort_keys=True),
            json.dumps(system, ensure_ascii=True, sort_keys=True),
        )
    except ValueError as exc:  # e.g. lone surrogates cannot be stored
        raise SpoolError(f"message cannot be stored: {exc}") from exc


def _string_map(text: object, what: str) -> dict[str, str]:
    if not isinstance(text, str):
        raise SpoolError(f"{what} is not text")
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise SpoolError(f"{what} is not JSON: {exc}") from exc
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise SpoolError(f"{what} is not an object of strings")
    return value


def decode_row(
    payload: object, properties: object, system: object, qos: object
) -> tuple[Message, int]:
    """The message and QoS back from their stored form; :class:`SpoolError` if the row is not
    one this module wrote."""
    if not isinstance(payload, bytes):
        raise SpoolError("stored payload is not a blob")
    if isinstance(qos, bool) or qos not in (0, 1):
        raise SpoolError(f"stored QoS {qos!r} is not 0 or 1")
    application = _string_map(properties, "stored properties")
    fields: dict[str, Any] = {}
    for key, value in _string_map(system, "stored system properties").items():
        name = _FIELD_BY_KEY.get(key)
        if name is None:
            raise SpoolError(f"unknown stored system property {key!r}")
        fields[name] = value
    assert isinstance(qos, int)
    return Message(payload=payload, properties=application, **fields), qos


class Spool:
    """Durable FIFO of accepted telemetry in one SQLite file (thread-safe)."""

    def __init__(self, path: str | Path, *, synchronous: str = "NORMAL") -> None:
        if synchronous.upper() not in _SYNCHRONOUS:
            raise SpoolError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        self.path = Path(path)
        self._lock = threading.Lock()
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                str(self.path), check_same_thread=False, isolation_level=None, timeout=5.0
            )
        except sqlite3.Error as exc:
            raise SpoolError(f"cannot open the spool {str(self.path)!r}: {exc}") from exc
        try:
            self._setup(synchronous.upper())
        except sqlite3.Error as exc:
            self.close()
            raise SpoolError(f"cannot use the spool {str(self.path)!r}: {exc}") from exc

    def _setup(self, synchronous: str) -> None:
        db = self._conn()
        mode = db.execute("PRAGMA journal_mode=WAL").fetchone()
        if not mode or str(mode[0]).lower() != "wal":
            log.warning("spool %s: WAL journaling unavailable (%s)", self.path, mode)
        db.execute(f"PRAGMA synchronous={synchronous}")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version not in (0, SCHEMA_VERSION):
            raise SpoolError(
                f"spool {str(self.path)!r} has schema version {version}, expected {SCHEMA_VERSION}"
            )
        db.execute(
            "CREATE TABLE IF NOT EXISTS messages ("
            " id INTEGER PRIMARY KEY AUTOINCREMENT,"
            " qos INTEGER NOT NULL,"
            " accepted_at REAL NOT NULL,"
            " payload BLOB NOT NULL,"
            " properties TEXT NOT NULL,"
            " system_properties TEXT NOT NULL)"
        )
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise SpoolError(f"the spool {str(self.path)!r} is closed")
        return self._db

    # -- writing ----------------------------------------------------------------------------

    def add(self, message: Message, qos: int, accepted_at: float) -> int:
        """Store a message (committed before returning); its row id."""
        payload, properties, system = encode_row(message, qos)
        with self._lock:
            try:
                cursor = self._conn().execute(
                    "INSERT INTO messages (qos, accepted_at, payload, properties,"
                    " system_properties) VALUES (?, ?, ?, ?, ?)",
                    (qos, float(accepted_at), payload, properties, system),
                )
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot write to the spool: {exc}") from exc
        row_id = cursor.lastrowid
        assert row_id is not None
        return row_id

    def remove(self, row_ids: int | Iterable[int]) -> None:
        """Delete rows (their messages reached a final state); unknown ids are ignored."""
        ids = [row_ids] if isinstance(row_ids, int) else list(row_ids)
        if not ids:
            return
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN")
                db.executemany("DELETE FROM messages WHERE id = ?", [(i,) for i in ids])
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise SpoolError(f"cannot delete from the spool: {exc}") from exc

    # -- reading ----------------------------------------------------------------------------

    def pending(self) -> list[SpooledMessage]:
        """Stored messages, oldest first. Rows that cannot be read back (not written by this
        module) are deleted with a warning rather than blocking every later start."""
        with self._lock:
            try:
                rows = (
                    self._conn()
                    .execute(
                        "SELECT id, qos, accepted_at, payload, properties, system_properties"
                        " FROM messages ORDER BY id"
                    )
                    .fetchall()
                )
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot read the spool: {exc}") from exc
        out: list[SpooledMessage] = []
        bad: list[int] = []
        for row_id, qos, accepted_at, payload, properties, system in rows:
            try:
                message, qos_value = decode_row(payload, properties, system, qos)
                when = float(accepted_at)
            except (SpoolError, TypeError, ValueError) as exc:
                log.warning("spool %s: dropping unreadable row %s: %s", self.path, row_id, exc)
                bad.append(row_id)
                continue
            out.append(SpooledMessage(row_id, message, qos_value, when))
        self.remove(bad)
        return out

    def __len__(self) -> int:
        with self._lock:
            try:
                return int(self._conn().execute("SELECT COUNT(*) FROM messages").fetchone()[0])
            except sqlite3.Error as exc:
                raise SpoolError(f"cannot read the spool: {exc}") from exc

    # -- life cycle -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """True once :meth:`close` ran."""
        return self._db is None

    def close(self) -> None:
        """Close the file (idempotent)."""
        with self._lock:
            db, self._db = self._db, None
        if db is not None:
            try:
                db.close()
            except sqlite3.Error:
                log.debug("error closing the spool", exc_info=True)

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
