"""Durable state of the emulated IoT Hub (device identities, twins, C2D queues, telemetry,
persistent MQTT sessions) in the emulator's SQLite database.

Decision: the hub tables live in the same database as the DPS records and share the
:class:`~emulator.store.Store`'s connection, lock and transaction helpers (one writer, every write
committed with ``synchronous=FULL`` before the method returns). A :class:`HubStore` is a view over a
``Store``; :meth:`HubStore.attached` gives the one view of a store, so DPS (which creates device
identities when it assigns a device) and the hub service see the same records, ``:memory:``
included. Tables: ``devices``, ``twins``, ``c2d``, ``telemetry`` and ``sessions`` (the topic
filters of devices that connected with ``clean_session=0``). The store only keeps data; the rules
(limits, versions, who may see what) are :mod:`emulator.hub_service`'s.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from .errors import EmulatorError, NotFoundError
from .store import Store

__all__ = [
    "HUB_SCHEMA_VERSION",
    "C2DQueueFull",
    "C2DRecord",
    "DeviceRecord",
    "HubStore",
    "TelemetryRecord",
    "TwinRecord",
]

HUB_SCHEMA_VERSION = 1

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS devices (device_id TEXT PRIMARY KEY, hub TEXT NOT NULL,"
    " auth TEXT NOT NULL, status TEXT NOT NULL, created TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS twins (device_id TEXT PRIMARY KEY, tags TEXT NOT NULL,"
    " desired TEXT NOT NULL, reported TEXT NOT NULL, desired_version INTEGER NOT NULL,"
    " reported_version INTEGER NOT NULL)",
    "CREATE TABLE IF NOT EXISTS c2d (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " device_id TEXT NOT NULL, payload BLOB NOT NULL, properties TEXT NOT NULL,"
    " enqueued TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS c2d_by_device ON c2d (device_id, id)",
    "CREATE TABLE IF NOT EXISTS telemetry (id INTEGER PRIMARY KEY AUTOINCREMENT,"
    " device_id TEXT NOT NULL, properties TEXT NOT NULL, payload BLOB NOT NULL,"
    " enqueued TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS telemetry_by_device ON telemetry (device_id, id)",
    "CREATE TABLE IF NOT EXISTS sessions (device_id TEXT PRIMARY KEY, subscriptions TEXT NOT NULL)",
)


class C2DQueueFull(EmulatorError):
    """The device already has the maximum number of pending cloud-to-device messages."""


@dataclass(frozen=True)
class DeviceRecord:
    """A hub device identity. ``auth`` is ``{"type": "sas" | "tpm", "keys": [base64, ...]}``."""

    device_id: str
    hub: str
    auth: dict[str, Any]
    status: str
    created: str

    @property
    def keys(self) -> list[str]:
        """The base64 keys a SAS token of this device may be signed with."""
        keys = self.auth.get("keys")
        return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []


@dataclass(frozen=True)
class TwinRecord:
    """A device twin: three sections and the versions of the two property sections."""

    device_id: str
    tags: dict[str, Any]
    desired: dict[str, Any]
    reported: dict[str, Any]
    desired_version: int
    reported_version: int


@dataclass(frozen=True)
class C2DRecord:
    """A queued cloud-to-device message; ``properties`` is a property bag (``$.`` keys for the
    system properties), as the delivery topic carries it."""

    id: int
    device_id: str
    payload: bytes
    properties: dict[str, str]
    enqueued: str


@dataclass(frozen=True)
class TelemetryRecord:
    """A stored device-to-cloud message; ``seq`` grows across all devices and is never reused."""

    seq: int
    device_id: str
    properties: dict[str, str]
    system_properties: dict[str, str]
    payload: bytes
    enqueued: str


def _dumps(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _loads_object(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise EmulatorError(f"stored {what} is corrupt: {exc}") from exc
    if not isinstance(value, dict):
        raise EmulatorError(f"stored {what} is not a JSON object")
    return value


def _string_map(value: object) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


_attached: weakref.WeakKeyDictionary[Store, HubStore] = weakref.WeakKeyDictionary()
_attached_lock = threading.Lock()


class HubStore:
    """The hub's tables inside a :class:`Store`'s database (same connection, same lock)."""

    def __init__(self, store: Store) -> None:
        """Create the hub tables in ``store``'s database if needed; prefer :meth:`attached`."""
        self._store = store
        with store._write() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)
            row = conn.execute("SELECT value FROM meta WHERE key = 'hub_schema_version'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('hub_schema_version', ?)",
                    (str(HUB_SCHEMA_VERSION),),
                )
            elif row[0] != str(HUB_SCHEMA_VERSION):
                raise EmulatorError(
                    f"the emulator database has hub schema version {row[0]}; this emulator"
                    f" understands version {HUB_SCHEMA_VERSION}"
                )

    @classmethod
    def attached(cls, store: Store) -> HubStore:
        """The one :class:`HubStore` of ``store`` (created on first use)."""
        with _attached_lock:
            hub = _attached.get(store)
            if hub is None:
                hub = cls(store)
                _attached[store] = hub
            return hub

    # ------------------------------------------------------------------ devices

    def register_device(
        self,
        device_id: str,
        hub: str,
        auth: dict[str, Any],
        initial_twin: dict[str, Any] | None,
        created: str,
        *,
        reset_twin: bool = False,
    ) -> bool:
        """Create a device (with its twin from ``initial_twin``) or update an existing one's hub
        and credentials, keeping its status and twin. Returns True when it was created.

        A device that changes hub is a new identity there: its persistent MQTT session is
        dropped. With ``reset_twin`` an existing device's twin starts again from
        ``initial_twin`` (reported properties emptied, versions back to 1).
        """
        with self._store._write() as conn:
            row = conn.execute(
                "SELECT hub FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            if row is not None:
                conn.execute(
                    "UPDATE devices SET hub = ?, auth = ? WHERE device_id = ?",
                    (hub, _dumps(auth), device_id),
                )
                if reset_twin or str(row[0]) != hub:
                    conn.execute("DELETE FROM sessions WHERE device_id = ?", (device_id,))
                if reset_twin:
                    self._write_initial_twin(conn, device_id, initial_twin)
                return False
            conn.execute(
                "INSERT INTO devices (device_id, hub, auth, status, created)"
                " VALUES (?, ?, ?, 'enabled', ?)",
                (device_id, hub, _dumps(auth), created),
            )
            self._write_initial_twin(conn, device_id, initial_twin)
            return True

    @staticmethod
    def _write_initial_twin(
        conn: sqlite3.Connection, device_id: str, initial_twin: dict[str, Any] | None
    ) -> None:
        twin = initial_twin or {}
        tags = twin.get("tags") or {}
        properties = twin.get("properties") or {}
        desired = properties.get("desired") or {}
        conn.execute(
            "INSERT OR REPLACE INTO twins (device_id, tags, desired, reported,"
            " desired_version, reported_version) VALUES (?, ?, ?, '{}', 1, 1)",
            (device_id, _dumps(tags), _dumps(desired)),
        )

    def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device with exactly this (case-sensitive) id, or None."""
        with self._store._read() as conn:
            row = conn.execute(
                "SELECT device_id, hub, auth, status, created FROM devices WHERE device_id = ?",
                (device_id,),
            ).fetchone()
        return None if row is None else self._device(row)

    def list_devices(self) -> list[DeviceRecord]:
        """Every device, by id."""
        with self._store._read() as conn:
            rows = conn.execute(
                "SELECT device_id, hub, auth, status, created FROM devices ORDER BY device_id"
            ).fetchall()
        return [self._device(row) for row in rows]

    def set_device_status(self, device_id: str, status: str) -> None:
        """Enable or disable a device; :class:`NotFoundError` if it does not exist."""
        if status not in ("enabled", "disabled"):
            raise ValueError(f"unknown device status {status!r}")
        with self._store._write() as conn:
            cursor = conn.execute(
                "UPDATE devices SET status = ? WHERE device_id = ?", (status, device_id)
            )
            if cursor.rowcount == 0:
                raise NotFoundError(f"device {device_id!r} does not exist")

    @staticmethod
    def _device(row: tuple[Any, ...]) -> DeviceRecord:
        return DeviceRecord(
            device_id=str(row[0]),
            hub=str(row[1]),
            auth=_loads_object(str(row[2]), "device credentials"),
            status=str(row[3]),
            created=str(row[4]),
        )

    # ------------------------------------------------------------------ twins

    def get_twin(self, device_id: str) -> TwinRecord | None:
        """The twin of a device, or None."""
        with self._store._read() as conn:
            row = self._twin_row(conn, device_id)
        return None if row is None else self._twin(row)

    def update_twin(self, device_id: str, change: Callable[[TwinRecord], TwinRecord]) -> TwinRecord:
        """Read, change and write a twin in one transaction; ``change`` may raise to abort.

        :class:`NotFoundError` if the device has no twin.
        """
        with self._store._write() as conn:
            row = self._twin_row(conn, device_id)
            if row is None:
                raise NotFoundError(f"device {device_id!r} does not exist")
            updated = change(self._twin(row))
            conn.execute(
                "UPDATE twins SET tags = ?, desired = ?, reported = ?, desired_version = ?,"
                " reported_version = ? WHERE device_id = ?",
                (
                    _dumps(updated.tags),
                    _dumps(updated.desired),
                    _dumps(updated.reported),
                    updated.desired_version,
                    updated.reported_version,
                    device_id,
                ),
            )
        return updated

    @staticmethod
    def _twin_row(conn: sqlite3.Connection, device_id: str) -> tuple[Any, ...] | None:
        row: tuple[Any, ...] | None = conn.execute(
            "SELECT device_id, tags, desired, reported, desired_version, reported_version"
            " FROM twins WHERE device_id = ?",
            (device_id,),
        ).fetchone()
        return row

    @staticmethod
    def _twin(row: tuple[Any, ...]) -> TwinRecord:
        return TwinRecord(
            device_id=str(row[0]),
            tags=_loads_object(str(row[1]), "twin tags"),
            desired=_loads_object(str(row[2]), "desired properties"),
            reported=_loads_object(str(row[3]), "reported properties"),
            desired_version=int(row[4]),
            reported_version=int(row[5]),
        )

    # ------------------------------------------------------------------ cloud-to-device

    def enqueue_c2d(
        self,
        device_id: str,
        payload: bytes,
        properties: dict[str, str],
        enqueued: str,
        max_pending: int,
    ) -> C2DRecord:
        """Queue a message; :class:`C2DQueueFull` when ``max_pending`` are already waiting."""
        with self._store._write() as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM c2d WHERE device_id = ?", (device_id,)
            ).fetchone()
            if int(count) >= max_pending:
                raise C2DQueueFull(
                    f"device {device_id!r} already has {count} pending cloud-to-device messages"
                )
            cursor = conn.execute(
                "INSERT INTO c2d (device_id, payload, properties, enqueued) VALUES (?, ?, ?, ?)",
                (device_id, payload, _dumps(properties), enqueued),
            )
            message_id = cursor.lastrowid
        assert message_id is not None
        return C2DRecord(int(message_id), device_id, payload, dict(properties), enqueued)

    def pending_c2d(self, device_id: str) -> list[C2DRecord]:
        """The device's queued messages, oldest first."""
        with self._store._read() as conn:
            rows = conn.execute(
                "SELECT id, device_id, payload, properties, enqueued FROM c2d"
                " WHERE device_id = ? ORDER BY id",
                (device_id,),
            ).fetchall()
        return [
            C2DRecord(
                int(row[0]),
                str(row[1]),
                bytes(row[2]),
                _string_map(_loads_object(str(row[3]), "C2D properties")),
                str(row[4]),
            )
            for row in rows
        ]

    def count_c2d(self, device_id: str) -> int:
        """How many messages wait for the device."""
        with self._store._read() as conn:
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM c2d WHERE device_id = ?", (device_id,)
            ).fetchone()
        return int(count)

    def complete_c2d(self, message_id: int) -> bool:
        """Remove a delivered message; False if it was already gone."""
        with self._store._write() as conn:
            cursor = conn.execute("DELETE FROM c2d WHERE id = ?", (message_id,))
            return cursor.rowcount > 0

    # ------------------------------------------------------------------ telemetry

    def add_telemetry(
        self,
        device_id: str,
        properties: dict[str, str],
        system_properties: dict[str, str],
        payload: bytes,
        enqueued: str,
        keep: int,
    ) -> TelemetryRecord:
        """Store a message and drop the device's oldest beyond the last ``keep``."""
        props = {"properties": properties, "systemProperties": system_properties}
        with self._store._write() as conn:
            cursor = conn.execute(
                "INSERT INTO telemetry (device_id, properties, payload, enqueued)"
                " VALUES (?, ?, ?, ?)",
                (device_id, _dumps(props), payload, enqueued),
            )
            seq = cursor.lastrowid
            conn.execute(
                "DELETE FROM telemetry WHERE device_id = ? AND id <= (SELECT id FROM telemetry"
                " WHERE device_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (device_id, device_id, max(keep, 1)),
            )
        assert seq is not None
        return TelemetryRecord(
            int(seq), device_id, dict(properties), dict(system_properties), payload, enqueued
        )

    def telemetry_since(self, device_id: str, since: int, limit: int) -> list[TelemetryRecord]:
        """The device's stored messages with ``seq > since``, oldest first, at most ``limit``."""
        with self._store._read() as conn:
            rows = conn.execute(
                "SELECT id, device_id, properties, payload, enqueued FROM telemetry"
                " WHERE device_id = ? AND id > ? ORDER BY id LIMIT ?",
                (device_id, since, limit),
            ).fetchall()
        records = []
        for row in rows:
            props = _loads_object(str(row[2]), "telemetry properties")
            records.append(
                TelemetryRecord(
                    int(row[0]),
                    str(row[1]),
                    _string_map(props.get("properties")),
                    _string_map(props.get("systemProperties")),
                    bytes(row[3]),
                    str(row[4]),
                )
            )
        return records

    # ------------------------------------------------------------------ persistent sessions

    def get_session(self, device_id: str) -> dict[str, int] | None:
        """The subscriptions (filter -> granted QoS) of a persistent session, or None."""
        with self._store._read() as conn:
            row = conn.execute(
                "SELECT subscriptions FROM sessions WHERE device_id = ?", (device_id,)
            ).fetchone()
        if row is None:
            return None
        data = _loads_object(str(row[0]), "session")
        return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}

    def put_session(self, device_id: str, subscriptions: dict[str, int]) -> None:
        """Create or replace a persistent session."""
        with self._store._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO sessions (device_id, subscriptions) VALUES (?, ?)",
                (device_id, _dumps(subscriptions)),
            )

    def delete_session(self, device_id: str) -> None:
        """Forget a persistent session (a ``clean_session=1`` CONNECT)."""
        with self._store._write() as conn:
            conn.execute("DELETE FROM sessions WHERE device_id = ?", (device_id,))
