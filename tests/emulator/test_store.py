"""Tests of the emulator's SQLite store: CRUD, case-insensitive ids, durability, threads."""

from __future__ import annotations

import base64
import dataclasses
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from emulator.errors import ConflictError, EmulatorError, NotFoundError, ValidationError
from emulator.models import (
    EnrollmentGroup,
    IndividualEnrollment,
    RegistrationRecord,
    SymmetricKeyAttestation,
)
from emulator.store import SCHEMA_VERSION, Store

NOW = "2026-11-28T16:57:35.123456Z"
KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(32, 64))).decode()
TIMEOUT = 30.0


def enrollment(registration_id: str = "device-1", **changes: object) -> IndividualEnrollment:
    record = IndividualEnrollment(
        registration_id=registration_id,
        attestation=SymmetricKeyAttestation(KEY_A, KEY_B),
        device_id="Device-1",
        iot_hub_host_name="hub1.azure-devices.net",
        initial_twin={"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}},
        created=NOW,
        last_updated=NOW,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def group(group_id: str = "floor-3") -> EnrollmentGroup:
    return EnrollmentGroup(
        enrollment_group_id=group_id,
        attestation=SymmetricKeyAttestation(KEY_B, KEY_A),
        iot_hubs=["hub1.azure-devices.net"],
        reprovision_policy={"updateHubAssignment": True, "migrateDeviceData": False},
        created=NOW,
        last_updated=NOW,
    )


def registration(registration_id: str = "device-1", status: str = "assigned") -> RegistrationRecord:
    return RegistrationRecord(
        registration_id=registration_id,
        status=status,
        assigned_hub="hub1.azure-devices.net",
        device_id="Device-1",
        substatus="initialAssignment",
        created=NOW,
        last_updated=NOW,
        etag="IjYxMDA4ZDQ2LTAwMDAtMDEwMC0wMDAwLTVlOGZlM2QxMDAwMCI=",
        enrollment_group_id="floor-3",
        payload={"modelId": "dtmi:x;1", "b": 1, "a": [1, 2]},
    )


@pytest.fixture
def store() -> Iterator[Store]:
    with Store() as opened:
        yield opened


# ---------------------------------------------------------------------------- hubs


def test_hubs(store: Store) -> None:
    assert store.list_hubs() == []
    store.add_hub("Hub2.Azure-Devices.net")
    store.add_hub("hub1.azure-devices.net")
    store.add_hub("hub1.azure-devices.net")
    assert store.list_hubs() == ["hub1.azure-devices.net", "hub2.azure-devices.net"]
    store.remove_hub("HUB2.azure-devices.net")
    assert store.list_hubs() == ["hub1.azure-devices.net"]
    with pytest.raises(NotFoundError):
        store.remove_hub("hub2.azure-devices.net")
    with pytest.raises(ValidationError):
        store.add_hub("not a host")


# ---------------------------------------------------------------------------- enrollments


def test_enrollment_crud(store: Store) -> None:
    assert store.get_enrollment("device-1") is None
    assert store.list_enrollments() == []

    stored = store.put_enrollment(enrollment())
    assert stored.etag
    assert dataclasses.replace(stored, etag="") == enrollment()
    assert store.get_enrollment("device-1") == stored

    replaced = store.put_enrollment(enrollment(provisioning_status="disabled"))
    assert replaced.etag != stored.etag
    assert store.get_enrollment("device-1") == replaced
    assert store.list_enrollments() == [replaced]

    store.put_enrollment(enrollment("a-first"))
    assert [e.registration_id for e in store.list_enrollments()] == ["a-first", "device-1"]

    store.delete_enrollment("device-1")
    assert store.get_enrollment("device-1") is None
    with pytest.raises(NotFoundError):
        store.delete_enrollment("device-1")


def test_enrollment_ids_are_case_insensitive(store: Store) -> None:
    stored = store.put_enrollment(enrollment("Device-UPPER"))
    assert stored.registration_id == "device-upper"
    assert store.get_enrollment("DEVICE-upper") == stored
    store.put_enrollment(enrollment("device-upper"))
    assert len(store.list_enrollments()) == 1
    store.delete_enrollment("DEVICE-UPPER")
    assert store.list_enrollments() == []


def test_missing_timestamps_are_filled(store: Store) -> None:
    stored = store.put_enrollment(enrollment(created="", last_updated=""))
    assert stored.created and stored.last_updated
    assert store.get_enrollment("device-1") == stored


def test_invalid_records_are_refused(store: Store) -> None:
    with pytest.raises(ValidationError, match="primaryKey"):
        store.put_enrollment(enrollment(attestation=SymmetricKeyAttestation("short", KEY_B)))
    with pytest.raises(ValidationError, match="registrationId"):
        store.put_enrollment(enrollment("bad id"))
    with pytest.raises(ValidationError, match="status"):
        store.put_registration(registration(status="done"))
    assert store.list_enrollments() == []
    assert store.list_registrations() == []


def test_expected_etag_is_compare_and_set(store: Store) -> None:
    with pytest.raises(ConflictError):
        store.put_enrollment(enrollment(), expected_etag="nope")
    stored = store.put_enrollment(enrollment())
    with pytest.raises(ConflictError):
        store.put_enrollment(enrollment(device_id="other"), expected_etag="stale")
    assert store.get_enrollment("device-1") == stored
    updated = store.put_enrollment(enrollment(device_id="other"), expected_etag=stored.etag)
    assert updated.device_id == "other"
    with pytest.raises(ConflictError):
        store.delete_enrollment("device-1", expected_etag=stored.etag)
    store.delete_enrollment("device-1", expected_etag=updated.etag)
    assert store.get_enrollment("device-1") is None


# ---------------------------------------------------------------------------- groups


def test_group_crud(store: Store) -> None:
    assert store.get_group("floor-3") is None
    stored = store.put_group(group("Floor-3"))
    assert stored.enrollment_group_id == "floor-3" and stored.etag
    assert store.get_group("FLOOR-3") == stored
    store.put_group(group("basement"))
    assert [g.enrollment_group_id for g in store.list_groups()] == ["basement", "floor-3"]
    with pytest.raises(ConflictError):
        store.put_group(group("floor-3"), expected_etag="stale")
    again = store.put_group(group("floor-3"), expected_etag=stored.etag)
    assert again.etag != stored.etag
    store.delete_group("Floor-3")
    assert store.get_group("floor-3") is None
    with pytest.raises(NotFoundError):
        store.delete_group("floor-3")


def test_groups_and_enrollments_are_separate(store: Store) -> None:
    store.put_group(group("same-id"))
    assert store.get_enrollment("same-id") is None
    store.put_enrollment(enrollment("same-id"))
    store.delete_group("same-id")
    assert store.get_enrollment("same-id") is not None


# ---------------------------------------------------------------------------- registrations


def test_registration_crud(store: Store) -> None:
    assert store.get_registration("device-1") is None
    record = registration()
    store.put_registration(record)
    assert store.get_registration("DEVICE-1") == record
    failed = dataclasses.replace(
        record, status="failed", error_code=400207, error_message="Custom allocation failed"
    )
    store.put_registration(failed)
    assert store.get_registration("device-1") == failed
    store.put_registration(registration("another"))
    assert [r.registration_id for r in store.list_registrations()] == ["another", "device-1"]
    store.delete_registration("Device-1")
    assert store.get_registration("device-1") is None
    with pytest.raises(NotFoundError):
        store.delete_registration("device-1")


# ---------------------------------------------------------------------------- durability


def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state" / "emulator.db"
    path.parent.mkdir()
    first = Store(path)
    first.add_hub("hub1.azure-devices.net")
    stored_enrollment = first.put_enrollment(enrollment())
    stored_group = first.put_group(group())
    first.put_registration(registration())
    first.close()
    first.close()  # idempotent

    with Store(str(path)) as second:
        assert second.list_hubs() == ["hub1.azure-devices.net"]
        assert second.list_enrollments() == [stored_enrollment]
        assert second.list_groups() == [stored_group]
        assert second.list_registrations() == [registration()]

    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = raw.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        assert version[0] == str(SCHEMA_VERSION)
    raw.close()


def test_writes_are_visible_to_another_connection_before_close(tmp_path: Path) -> None:
    path = tmp_path / "emulator.db"
    with Store(path) as writer:
        writer.put_enrollment(enrollment())
        with Store(path) as reader:
            got = reader.get_enrollment("device-1")
            assert got is not None and got == writer.get_enrollment("device-1")


def test_closed_store_raises(store: Store) -> None:
    store.close()
    with pytest.raises(EmulatorError, match="closed"):
        store.list_hubs()
    with pytest.raises(EmulatorError, match="closed"):
        store.put_enrollment(enrollment())


def test_unknown_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "emulator.db"
    Store(path).close()
    raw = sqlite3.connect(path)
    with raw:
        raw.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    raw.close()
    with pytest.raises(EmulatorError, match="schema version 99"):
        Store(path)


def test_corrupt_rows_raise_emulator_error(tmp_path: Path) -> None:
    path = tmp_path / "emulator.db"
    Store(path).close()
    raw = sqlite3.connect(path)
    with raw:
        raw.execute(
            "INSERT INTO individual_enrollments (registration_id, json) VALUES ('x', '{bad')"
        )
        raw.execute("INSERT INTO registrations (registration_id, json) VALUES ('y', '[]')")
    raw.close()
    with Store(path) as store:
        with pytest.raises(EmulatorError, match="corrupt"):
            store.get_enrollment("x")
        with pytest.raises(EmulatorError, match="corrupt"):
            store.list_registrations()


def test_not_a_database_raises_emulator_error(tmp_path: Path) -> None:
    path = tmp_path / "emulator.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(EmulatorError):
        Store(path)


# ---------------------------------------------------------------------------- threads


def test_concurrent_use_from_two_threads(tmp_path: Path) -> None:
    per_thread = 40
    errors: list[BaseException] = []
    with Store(tmp_path / "emulator.db") as shared:

        def work(prefix: str) -> None:
            try:
                for index in range(per_thread):
                    rid = f"{prefix}-{index}"
                    stored = shared.put_enrollment(enrollment(rid))
                    assert shared.get_enrollment(rid) == stored
                    shared.put_registration(registration(rid))
                    shared.add_hub(f"{prefix}.azure-devices.net")
                    shared.list_enrollments()
                    if index % 2:
                        shared.delete_registration(rid)
            except BaseException as exc:  # reported to the main thread below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(name,)) for name in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(TIMEOUT)
        assert not any(thread.is_alive() for thread in threads)
        assert errors == []
        assert len(shared.list_enrollments()) == 2 * per_thread
        assert len(shared.list_registrations()) == per_thread
        assert shared.list_hubs() == ["a.azure-devices.net", "b.azure-devices.net"]
