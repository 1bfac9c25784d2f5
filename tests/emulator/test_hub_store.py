"""The hub's tables in the emulator's SQLite store: devices, twins, C2D, telemetry, sessions."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from emulator.errors import NotFoundError
from emulator.hub_store import C2DQueueFull, HubStore, TwinRecord
from emulator.store import Store

AUTH = {"type": "sas", "keys": ["AAAA"]}
NOW = "2026-01-01T00:00:00.000000Z"


@pytest.fixture
def hub() -> HubStore:
    return HubStore.attached(Store())


def test_attached_is_one_view_per_store() -> None:
    store = Store()
    assert HubStore.attached(store) is HubStore.attached(store)
    assert HubStore.attached(Store()) is not HubStore.attached(store)


def test_register_creates_device_and_twin_from_initial_twin(hub: HubStore) -> None:
    initial = {"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}}
    assert hub.register_device("dev-1", "hub.example", AUTH, initial, NOW) is True

    device = hub.get_device("dev-1")
    assert device is not None and device.status == "enabled" and device.keys == ["AAAA"]
    twin = hub.get_twin("dev-1")
    assert twin == TwinRecord("dev-1", {"site": "a"}, {"rate": 5}, {}, 1, 1)
    assert hub.get_device("DEV-1") is None, "device ids are case-sensitive"


def test_register_again_updates_credentials_and_keeps_twin(hub: HubStore) -> None:
    hub.register_device("dev-1", "hub.example", AUTH, {"tags": {"a": 1}}, NOW)
    hub.update_twin("dev-1", lambda t: dataclasses.replace(t, reported={"x": 1}))

    created = hub.register_device(
        "dev-1", "hub2.example", {"type": "sas", "keys": ["BBBB"]}, None, NOW
    )

    assert created is False
    device = hub.get_device("dev-1")
    assert device is not None and (device.hub, device.keys) == ("hub2.example", ["BBBB"])
    twin = hub.get_twin("dev-1")
    assert twin is not None and twin.tags == {"a": 1} and twin.reported == {"x": 1}


def test_failed_twin_change_is_rolled_back(hub: HubStore) -> None:
    hub.register_device("dev-1", "hub.example", AUTH, None, NOW)

    def boom(twin: TwinRecord) -> TwinRecord:
        raise ValueError("refused")

    with pytest.raises(ValueError):
        hub.update_twin("dev-1", boom)
    with pytest.raises(NotFoundError):
        hub.update_twin("nobody", lambda t: t)
    assert hub.get_twin("dev-1") == TwinRecord("dev-1", {}, {}, {}, 1, 1)


def test_c2d_queue_is_bounded_and_ordered(hub: HubStore) -> None:
    for i in range(3):
        hub.enqueue_c2d("dev-1", f"m{i}".encode(), {"$.mid": str(i)}, NOW, max_pending=3)
    with pytest.raises(C2DQueueFull):
        hub.enqueue_c2d("dev-1", b"x", {}, NOW, max_pending=3)
    hub.enqueue_c2d("dev-2", b"other", {}, NOW, max_pending=3)

    pending = hub.pending_c2d("dev-1")
    assert [m.payload for m in pending] == [b"m0", b"m1", b"m2"]
    assert pending[1].properties == {"$.mid": "1"}
    assert hub.complete_c2d(pending[0].id) is True
    assert hub.complete_c2d(pending[0].id) is False
    assert hub.count_c2d("dev-1") == 2 and hub.count_c2d("dev-2") == 1


def test_telemetry_keeps_the_last_n_per_device(hub: HubStore) -> None:
    seqs = [hub.add_telemetry("a", {}, {}, bytes([i]), NOW, keep=3).seq for i in range(5)]
    hub.add_telemetry("b", {"k": "v"}, {"message-id": "m"}, b"b", NOW, keep=3)

    kept = hub.telemetry_since("a", 0, 100)
    assert [r.seq for r in kept] == seqs[2:]
    assert [r.payload for r in hub.telemetry_since("a", seqs[3], 100)] == [bytes([4])]
    assert len(hub.telemetry_since("a", 0, 1)) == 1
    (other,) = hub.telemetry_since("b", 0, 100)
    assert other.properties == {"k": "v"} and other.system_properties == {"message-id": "m"}
    assert other.seq > seqs[-1], "sequence numbers are global and never reused"


def test_sessions(hub: HubStore) -> None:
    assert hub.get_session("dev-1") is None
    hub.put_session("dev-1", {})
    assert hub.get_session("dev-1") == {}
    hub.put_session("dev-1", {"$iothub/twin/res/#": 1})
    assert hub.get_session("dev-1") == {"$iothub/twin/res/#": 1}
    hub.delete_session("dev-1")
    assert hub.get_session("dev-1") is None


def test_everything_survives_reopening_the_file(tmp_path: Path) -> None:
    path = tmp_path / "emulator.db"
    with Store(path) as store:
        hub = HubStore(store)
        hub.register_device("dev-1", "hub.example", AUTH, {"tags": {"t": 1}}, NOW)
        hub.enqueue_c2d("dev-1", b"queued", {"$.mid": "1"}, NOW, max_pending=50)
        hub.add_telemetry("dev-1", {}, {}, b"t", NOW, keep=10)
        hub.put_session("dev-1", {"devices/dev-1/messages/devicebound/#": 1})

    with Store(path) as store:
        hub = HubStore(store)
        assert hub.get_device("dev-1") is not None
        twin = hub.get_twin("dev-1")
        assert twin is not None and twin.tags == {"t": 1}
        assert [m.payload for m in hub.pending_c2d("dev-1")] == [b"queued"]
        assert [r.payload for r in hub.telemetry_since("dev-1", 0, 10)] == [b"t"]
        assert hub.get_session("dev-1") == {"devices/dev-1/messages/devicebound/#": 1}


def test_device_status(hub: HubStore) -> None:
    hub.register_device("dev-1", "hub.example", AUTH, None, NOW)
    hub.set_device_status("dev-1", "disabled")
    device = hub.get_device("dev-1")
    assert device is not None and device.status == "disabled"
    with pytest.raises(NotFoundError):
        hub.set_device_status("nobody", "enabled")
    with pytest.raises(ValueError):
        hub.set_device_status("dev-1", "asleep")
