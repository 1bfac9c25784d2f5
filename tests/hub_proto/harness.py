"""A fake MQTT client that drives a HubSession, for the session tests."""

from __future__ import annotations

import random
from typing import Any

from hub_proto import Event, HubSession, OutgoingPublish

HOST = "myhub.azure-devices.net"


class Link:
    """A stand-in for the MQTT client: gives packet ids, records publishes, acknowledges."""

    def __init__(self, session: HubSession) -> None:
        self.session = session
        self.packet_id = 0
        self.published: list[tuple[int, OutgoingPublish]] = []
        self.events: list[Event] = []

    def connect(self, now: float, session_present: bool = False) -> list[Event]:
        self.session.connect_started(now)
        self.packet_id = 0  # a fresh client per connection
        self.published = []
        return self.session.connection_made(now, session_present)

    def pump(self, now: float) -> list[OutgoingPublish]:
        out = self.session.outgoing(now)
        for publish in out:
            self.packet_id += 1
            self.session.publish_sent(publish.token, self.packet_id)
            self.published.append((self.packet_id, publish))
        return out

    def ack_all(self) -> list[Event]:
        events: list[Event] = []
        for packet_id, _ in self.published:
            events.extend(self.session.puback(packet_id))
        self.published = []
        return events

    def topics(self) -> list[str]:
        return [p.topic for _, p in self.published]


def make_session(**kwargs: Any) -> HubSession:
    """A device session with a seeded random source."""
    kwargs.setdefault("rng", random.Random(1234))
    return HubSession("dev1", host=HOST, **kwargs)
