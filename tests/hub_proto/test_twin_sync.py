"""Tests of hub_proto.twin_sync: the local twin copy and version bookkeeping."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hub_proto import DesiredPatch, TwinSync, TwinSynced


@settings(max_examples=200, deadline=None)
@given(
    get_version=st.integers(0, 20),
    patches=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 5)), max_size=15),
)
def test_held_patches_newer_than_the_get_are_applied_in_order(
    get_version: int, patches: list[tuple[int, int]]
) -> None:
    sync = TwinSync()
    sync.begin_sync()
    for version, value in patches:
        assert sync.on_desired(version, {"v": value, "$version": version}) == []
    events = sync.on_twin({"desired": {"$version": get_version}, "reported": {}})
    assert isinstance(events[0], TwinSynced) and events[0].desired_version == get_version
    delivered = [e.version for e in events[1:] if isinstance(e, DesiredPatch)]
    expected = sorted({v for v, _ in patches if v > get_version})
    assert delivered == expected
    assert sync.stale_dropped == len(patches) - len(expected)
    assert sync.desired_version == (expected[-1] if expected else get_version)
    assert all("$version" not in e.patch for e in events[1:] if isinstance(e, DesiredPatch))


def test_versions_and_reported_copy() -> None:
    sync = TwinSync()
    # never synced (e.g. the GET failed): notifications are applied as they come
    assert sync.on_desired(4, {"a": 1}) == [DesiredPatch(4, {"a": 1})]
    assert sync.on_desired(4, {"a": 2}) == []
    assert sync.desired == {"a": 1, "$version": 4}
    sync.on_reported_ack({"x": {"y": 1}}, 9)
    sync.on_reported_ack({"x": {"y": None, "z": 2}}, None)
    assert sync.reported == {"x": {"z": 2}, "$version": 9} and sync.reported_version == 9


def test_twin_document_without_sections() -> None:
    sync = TwinSync()
    sync.begin_sync()
    (event,) = sync.on_twin({"desired": [], "reported": None})
    assert event == TwinSynced({}, {}, None, None)
    assert not sync.syncing


def test_sync_failure_releases_patches() -> None:
    sync = TwinSync()
    sync.begin_sync()
    sync.on_desired(2, {"b": 1})
    sync.on_desired(1, {"a": 1})
    assert [e.version for e in sync.on_sync_failed() if isinstance(e, DesiredPatch)] == [1, 2]
    assert sync.desired == {"a": 1, "b": 1, "$version": 2}


def test_a_stale_get_answer_does_not_roll_back_desired() -> None:
    sync = TwinSync()
    sync.begin_sync()
    sync.on_twin({"desired": {"a": 1, "$version": 5}, "reported": {}})
    sync.on_desired(6, {"a": 2})
    # a user GET answered with version 5 after notification 6 was applied
    (event,) = sync.on_twin({"desired": {"a": 1, "$version": 5}, "reported": {"r": 1}})
    assert sync.desired == {"a": 2, "$version": 6}
    assert event == TwinSynced({"a": 2, "$version": 6}, {"r": 1}, 6, None)
    # during a re-sync the GET is authoritative (e.g. a hub that lost its state)
    sync.begin_sync()
    sync.on_twin({"desired": {"$version": 1}, "reported": {}})
    assert sync.desired_version == 1
