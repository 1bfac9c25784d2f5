"""The device's copy of its twin and the re-sync after each connect.

Desired-property notifications are only sent while a device is connected, so after every connect
the session reads the whole twin (GET). Notifications that arrive before that answer are held
back; once it comes, those whose ``$version`` is not newer than the GET's desired ``$version`` are
dropped as stale (the GET already contains them) and the rest are applied in version order.
Outside a re-sync, a notification not newer than the known version is dropped too.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Union

from .events import DesiredPatch, TwinSynced
from .twin import apply_patch

log = logging.getLogger(__name__)

#: Notifications held back during one re-sync, at most (older ones are covered by the GET).
MAX_BUFFERED_PATCHES = 1000

SyncEvent = Union[TwinSynced, DesiredPatch]


def _version(section: dict[str, Any]) -> int | None:
    value = section.get("$version")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class TwinSync:
    """Local twin copy: ``desired`` and ``reported`` sections with their ``$version``."""

    def __init__(self) -> None:
        self.desired: dict[str, Any] = {}
        self.reported: dict[str, Any] = {}
        self.desired_version: int | None = None
        self.reported_version: int | None = None
        self.syncing = False
        self.stale_dropped = 0
        self._buffer: list[tuple[int, dict[str, Any]]] = []

    def begin_sync(self) -> None:
        """A connect happened: hold notifications back until the twin has been read."""
        self.syncing = True

    def on_twin(self, doc: dict[str, Any]) -> list[SyncEvent]:
        """A GET answered with the whole twin: replace the copy, then release held notifications.

        Outside a re-sync, a desired section older than the local copy (a GET answered before
        notifications that were already applied) does not replace it.
        """
        desired = doc.get("desired")
        reported = doc.get("reported")
        new_desired = copy.deepcopy(desired) if isinstance(desired, dict) else {}
        new_version = _version(new_desired)
        older = self.desired_version is not None and (
            new_version is None or new_version < self.desired_version
        )
        if self.syncing or not older:
            self.desired = new_desired
        self.reported = copy.deepcopy(reported) if isinstance(reported, dict) else {}
        self.desired_version = _version(self.desired)
        self.reported_version = _version(self.reported)
        events: list[SyncEvent] = [
            TwinSynced(
                copy.deepcopy(self.desired),
                copy.deepcopy(self.reported),
                self.desired_version,
                self.reported_version,
            )
        ]
        events.extend(self._release())
        return events

    def on_sync_failed(self) -> list[SyncEvent]:
        """The GET failed: release held notifications that are newer than what is known."""
        return self._release()

    def on_desired(self, version: int, patch: dict[str, Any]) -> list[SyncEvent]:
        """A desired-properties notification."""
        if self.syncing:
            self._buffer.append((version, patch))
            if len(self._buffer) > MAX_BUFFERED_PATCHES:
                self._buffer.pop(0)
                self.stale_dropped += 1
            return []
        return self._apply(version, patch)

    def on_reported_ack(self, patch: dict[str, Any] | None, version: int | None) -> None:
        """The hub accepted a reported patch (204) and gave the new reported ``$version``."""
        if patch is not None:
            apply_patch(self.reported, patch)
        if version is not None:
            self.reported_version = version
            self.reported["$version"] = version

    def _release(self) -> list[SyncEvent]:
        self.syncing = False
        held, self._buffer = self._buffer, []
        events: list[SyncEvent] = []
        for version, patch in sorted(held, key=lambda item: item[0]):
            events.extend(self._apply(version, patch))
        return events

    def _apply(self, version: int, patch: dict[str, Any]) -> list[SyncEvent]:
        if self.desired_version is not None and version <= self.desired_version:
            self.stale_dropped += 1
            log.debug("dropping stale desired patch %d (have %d)", version, self.desired_version)
            return []
        body = {k: v for k, v in patch.items() if k != "$version"}
        apply_patch(self.desired, body)
        self.desired_version = version
        self.desired["$version"] = version
        return [DesiredPatch(version, copy.deepcopy(body))]
