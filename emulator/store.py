"""Durable state of the emulator (linked hubs with their allocation weights and latencies,
enrollments, groups, registrations and the hubs each device has been on) in SQLite.

Records are stored as the JSON their ``to_json`` produces, keyed by their lower-case id. Every
write is committed (``synchronous=FULL``) before the method returns, so nothing acknowledged is
lost across a restart. One connection is shared by the asyncio loop and the HTTP API thread and
guarded by a lock. The store only keeps data: which record wins, and what it means for a device,
is decided by its callers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, TypeVar

from .allocation import LinkedHub, validate_allocation_weight, validate_latency
from .errors import ConflictError, EmulatorError, NotFoundError, ValidationError
from .models import (
    EnrollmentGroup,
    IndividualEnrollment,
    RegistrationRecord,
    new_etag,
    utc_now_iso,
    validate_host_name,
)

__all__ = ["SCHEMA_VERSION", "Store"]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS hubs (name TEXT PRIMARY KEY,"
    " allocation_weight INTEGER NOT NULL DEFAULT 1, latency_ms REAL)",
    "CREATE TABLE IF NOT EXISTS individual_enrollments"
    " (registration_id TEXT PRIMARY KEY, json TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS enrollment_groups (group_id TEXT PRIMARY KEY, json TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS registrations"
    " (registration_id TEXT PRIMARY KEY, json TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS registration_hubs (registration_id TEXT NOT NULL,"
    " hub TEXT NOT NULL, PRIMARY KEY (registration_id, hub))",
)
#: Columns added to ``hubs`` after schema version 1 was first released (added in place).
_HUB_COLUMNS = (
    ("allocation_weight", "INTEGER NOT NULL DEFAULT 1"),
    ("latency_ms", "REAL"),
)

#: Tables whose writes move :attr:`Store.enrollment_generation`.
_ENROLLMENT_TABLES = ("individual_enrollments", "enrollment_groups")

_T = TypeVar("_T")


def _no_generated_key() -> str:
    """Stand-in key generator for re-validating stored records, which always carry their keys."""
    raise ValidationError("attestation keys are missing")


def _now() -> str:
    return utc_now_iso(time.time())


def _dumps(value: dict[str, Any]) -> str:
    return json.dumps(value, separators=(",", ":"))


class Store:
    """SQLite-backed, thread-safe store of the emulator's records."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        """Open (creating if needed) the database at ``path``; ``":memory:"`` keeps nothing."""
        self._path = str(path)
        self._lock = threading.Lock()
        #: Grows with every write of an enrollment or group (TLS anchors are re-read when it moves).
        self.enrollment_generation = 0
        try:
            self._conn: sqlite3.Connection | None = sqlite3.connect(
                self._path, check_same_thread=False, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise EmulatorError(f"cannot open the emulator database {self._path}: {exc}") from exc
        try:
            self._init_schema(self._conn)
        except BaseException:
            self._conn.close()
            self._conn = None
            raise

    def _init_schema(self, conn: sqlite3.Connection) -> None:
        try:
            if self._path != ":memory:":
                conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA:
                    conn.execute(statement)
                columns = {str(r[1]) for r in conn.execute("PRAGMA table_info(hubs)").fetchall()}
                for column, declaration in _HUB_COLUMNS:
                    if column not in columns:
                        conn.execute(f"ALTER TABLE hubs ADD COLUMN {column} {declaration}")
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                elif row[0] != str(SCHEMA_VERSION):
                    raise EmulatorError(
                        f"the emulator database {self._path} has schema version {row[0]};"
                        f" this emulator understands version {SCHEMA_VERSION}"
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise EmulatorError(f"cannot use the emulator database {self._path}: {exc}") from exc

    def close(self) -> None:
        """Close the database; further calls raise :class:`EmulatorError`. Safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """The connection, under the lock (no transaction: single statements are atomic)."""
        with self._lock:
            if self._conn is None:
                raise EmulatorError("the store is closed")
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise EmulatorError(f"database error in {self._path}: {exc}") from exc

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """The connection inside one committed transaction, under the lock."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise EmulatorError("the store is closed")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise EmulatorError(f"database error in {self._path}: {exc}") from exc

    @staticmethod
    def _decode(text: str, parse: Callable[[object], _T], what: str) -> _T:
        try:
            return parse(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise EmulatorError(f"stored {what} is corrupt: {exc}") from exc

    def _get_row(self, table: str, column: str, key: str) -> str | None:
        with self._read() as conn:
            row = conn.execute(
                f"SELECT json FROM {table} WHERE {column} = ?", (key.lower(),)
            ).fetchone()
        return None if row is None else str(row[0])

    def _list_rows(self, table: str, column: str) -> list[str]:
        with self._read() as conn:
            rows = conn.execute(f"SELECT json FROM {table} ORDER BY {column}").fetchall()
        return [str(row[0]) for row in rows]

    def _put_row(
        self,
        table: str,
        column: str,
        key: str,
        text: str,
        expected_etag: str | None,
        current_etag: Callable[[str], str],
    ) -> None:
        with self._write() as conn:
            if expected_etag is not None:
                row = conn.execute(
                    f"SELECT json FROM {table} WHERE {column} = ?", (key,)
                ).fetchone()
                if row is None or current_etag(str(row[0])) != expected_etag:
                    raise ConflictError(f"{key!r} has changed (etag mismatch)")
            conn.execute(
                f"INSERT OR REPLACE INTO {table} ({column}, json) VALUES (?, ?)", (key, text)
            )
        if table in _ENROLLMENT_TABLES:
            self.enrollment_generation += 1

    def _delete_row(
        self,
        table: str,
        column: str,
        key: str,
        what: str,
        expected_etag: str | None,
        current_etag: Callable[[str], str],
    ) -> None:
        key = key.lower()
        with self._write() as conn:
            row = conn.execute(f"SELECT json FROM {table} WHERE {column} = ?", (key,)).fetchone()
            if row is None:
                raise NotFoundError(f"{what} {key!r} does not exist")
            if expected_etag is not None and current_etag(str(row[0])) != expected_etag:
                raise ConflictError(f"{what} {key!r} has changed (etag mismatch)")
            conn.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))
        if table in _ENROLLMENT_TABLES:
            self.enrollment_generation += 1

    @staticmethod
    def _etag_of(text: str) -> str:
        try:
            value = json.loads(text).get("etag", "")
        except (ValueError, AttributeError):
            return ""
        return value if isinstance(value, str) else ""

    # ------------------------------------------------------------------ hubs

    def add_hub(self, name: str) -> None:
        """Link an IoT hub by host name (stored lower-case); adding it twice is harmless."""
        hub = validate_host_name(name, "hub name")
        with self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO hubs (name) VALUES (?)", (hub,))

    def list_hubs(self) -> list[str]:
        """Host names of the linked hubs, sorted."""
        with self._read() as conn:
            rows = conn.execute("SELECT name FROM hubs ORDER BY name").fetchall()
        return [str(row[0]) for row in rows]

    def put_hub(self, hub: LinkedHub) -> LinkedHub:
        """Link a hub, or change its allocation weight and latency; returns what was stored."""
        stored = LinkedHub(
            validate_host_name(hub.name, "hub name"),
            validate_allocation_weight(hub.allocation_weight),
            validate_latency(hub.latency_ms),
        )
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO hubs (name, allocation_weight, latency_ms)"
                " VALUES (?, ?, ?)",
                (stored.name, stored.allocation_weight, stored.latency_ms),
            )
        return stored

    def list_linked_hubs(self) -> list[LinkedHub]:
        """The linked hubs with their allocation settings, by name."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT name, allocation_weight, latency_ms FROM hubs ORDER BY name"
            ).fetchall()
        return [
            LinkedHub(str(row[0]), int(row[1]), None if row[2] is None else float(row[2]))
            for row in rows
        ]

    def get_hub(self, name: str) -> LinkedHub | None:
        """One linked hub (any case), or ``None``."""
        hub = name.lower()
        return next((h for h in self.list_linked_hubs() if h.name == hub), None)

    def remove_hub(self, name: str) -> None:
        """Unlink a hub; :class:`NotFoundError` if it is not linked."""
        hub = validate_host_name(name, "hub name")
        with self._write() as conn:
            if conn.execute("DELETE FROM hubs WHERE name = ?", (hub,)).rowcount == 0:
                raise NotFoundError(f"hub {hub!r} is not linked")

    # ------------------------------------------------------------------ individual enrollments

    def put_enrollment(
        self, enrollment: IndividualEnrollment, *, expected_etag: str | None = None
    ) -> IndividualEnrollment:
        """Create or replace an enrollment; return what was stored (validated, with a new etag).

        With ``expected_etag``, the write happens only if a stored enrollment has exactly that
        etag, else :class:`ConflictError` (an atomic compare-and-set for ``If-Match``).
        Missing timestamps are set to now; otherwise the caller's timestamps are kept.
        """
        stored = IndividualEnrollment.from_json(
            enrollment.to_json(), now=_now(), generate_key=_no_generated_key
        )
        stored = dataclasses.replace(stored, etag=new_etag())
        self._put_row(
            "individual_enrollments",
            "registration_id",
            stored.registration_id,
            _dumps(stored.to_json()),
            expected_etag,
            self._etag_of,
        )
        return stored

    def get_enrollment(self, registration_id: str) -> IndividualEnrollment | None:
        """The enrollment with this registration id (any case), or ``None``."""
        text = self._get_row("individual_enrollments", "registration_id", registration_id)
        if text is None:
            return None
        return self._decode(text, self._parse_enrollment, "enrollment")

    def list_enrollments(self) -> list[IndividualEnrollment]:
        """All individual enrollments, by registration id."""
        rows = self._list_rows("individual_enrollments", "registration_id")
        return [self._decode(text, self._parse_enrollment, "enrollment") for text in rows]

    def delete_enrollment(self, registration_id: str, *, expected_etag: str | None = None) -> None:
        """Delete an enrollment; :class:`NotFoundError` if absent; etag mismatch: ConflictError."""
        self._delete_row(
            "individual_enrollments",
            "registration_id",
            registration_id,
            "enrollment",
            expected_etag,
            self._etag_of,
        )

    @staticmethod
    def _parse_enrollment(data: object) -> IndividualEnrollment:
        return IndividualEnrollment.from_json(data, now=_now(), generate_key=_no_generated_key)

    # ------------------------------------------------------------------ enrollment groups

    def put_group(
        self, group: EnrollmentGroup, *, expected_etag: str | None = None
    ) -> EnrollmentGroup:
        """Create or replace an enrollment group; same contract as :meth:`put_enrollment`."""
        stored = EnrollmentGroup.from_json(
            group.to_json(), now=_now(), generate_key=_no_generated_key
        )
        stored = dataclasses.replace(stored, etag=new_etag())
        self._put_row(
            "enrollment_groups",
            "group_id",
            stored.enrollment_group_id,
            _dumps(stored.to_json()),
            expected_etag,
            self._etag_of,
        )
        return stored

    def get_group(self, group_id: str) -> EnrollmentGroup | None:
        """The enrollment group with this id (any case), or ``None``."""
        text = self._get_row("enrollment_groups", "group_id", group_id)
        if text is None:
            return None
        return self._decode(text, self._parse_group, "enrollment group")

    def list_groups(self) -> list[EnrollmentGroup]:
        """All enrollment groups, by id."""
        rows = self._list_rows("enrollment_groups", "group_id")
        return [self._decode(text, self._parse_group, "enrollment group") for text in rows]

    def delete_group(self, group_id: str, *, expected_etag: str | None = None) -> None:
        """Delete a group; :class:`NotFoundError` if absent, :class:`ConflictError` on etag."""
        self._delete_row(
            "enrollment_groups",
            "group_id",
            group_id,
            "enrollment group",
            expected_etag,
            self._etag_of,
        )

    @staticmethod
    def _parse_group(data: object) -> EnrollmentGroup:
        return EnrollmentGroup.from_json(data, now=_now(), generate_key=_no_generated_key)

    # ------------------------------------------------------------------ registrations

    def put_registration(self, record: RegistrationRecord) -> None:
        """Create or replace a device's registration record, exactly as given (after validation)."""
        stored = RegistrationRecord.from_json(record.to_json())
        self._put_row(
            "registrations",
            "registration_id",
            stored.registration_id,
            _dumps(stored.to_json()),
            None,
            self._etag_of,
        )

    def get_registration(self, registration_id: str) -> RegistrationRecord | None:
        """The registration record of this registration id (any case), or ``None``."""
        text = self._get_row("registrations", "registration_id", registration_id)
        if text is None:
            return None
        return self._decode(text, RegistrationRecord.from_json, "registration")

    def list_registrations(self) -> list[RegistrationRecord]:
        """All registration records, by registration id."""
        rows = self._list_rows("registrations", "registration_id")
        return [self._decode(text, RegistrationRecord.from_json, "registration") for text in rows]

    def delete_registration(self, registration_id: str) -> None:
        """Delete a registration record (and its hub history); :class:`NotFoundError` if absent."""
        self._delete_row(
            "registrations",
            "registration_id",
            registration_id,
            "registration",
            None,
            self._etag_of,
        )
        with self._write() as conn:
            conn.execute(
                "DELETE FROM registration_hubs WHERE registration_id = ?",
                (registration_id.lower(),),
            )

    def add_registration_hub(self, registration_id: str, hub: str) -> None:
        """Remember that a device has been assigned to ``hub`` (for ``reprovisionedTo...``)."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO registration_hubs (registration_id, hub) VALUES (?, ?)",
                (registration_id.lower(), hub.lower()),
            )

    def registration_hubs(self, registration_id: str) -> list[str]:
        """Every hub a device has been assigned to, by name."""
        with self._read() as conn:
            rows = conn.execute(
                "SELECT hub FROM registration_hubs WHERE registration_id = ? ORDER BY hub",
                (registration_id.lower(),),
            ).fetchall()
        return [str(row[0]) for row in rows]
