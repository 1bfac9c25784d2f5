"""Tests of HubSession telemetry: queueing, in-order replay across disconnects, counters."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub_proto import (
    HubParseError,
    HubStateError,
    Message,
    MessageDone,
    MessageTicket,
    OverflowPolicy,
    QueueFullError,
    QueueLimits,
    TicketState,
)

from .harness import Link, make_session


def msg(i: int) -> Message:
    return Message(f"payload {i}".encode(), message_id=str(i))


def ids(publishes: list[tuple[int, object]]) -> list[str]:
    out = []
    for _, p in publishes:
        topic = p.topic  # type: ignore[attr-defined]
        if "/messages/events/" in topic:
            out.append(topic.split("%24.mid=")[1].split("&")[0])
    return out


def test_messages_wait_for_a_connection_then_go_in_order() -> None:
    session = make_session(twin=False)
    link = Link(session)
    tickets = [session.send_message(msg(i), 1, 0.0) for i in range(3)]
    assert link.pump(0.0) == []  # not connected
    link.connect(1.0)
    out = link.pump(1.0)
    assert [p.payload for p in out] == [b"payload 0", b"payload 1", b"payload 2"]
    assert all(p.qos == 1 and p.topic.startswith("devices/dev1/messages/events/") for p in out)
    events = link.ack_all()
    assert [e.ticket for e in events if isinstance(e, MessageDone)] == tickets
    assert all(t.state is TicketState.ACKNOWLEDGED for t in tickets)
    assert session.stats.acknowledged == 3 and session.pending() == []


def test_qos1_resent_until_puback_in_order_across_disconnects() -> None:
    session = make_session(twin=False, queue=QueueLimits(max_in_flight=3))
    link = Link(session)
    tickets = [session.send_message(msg(i), 1, 0.0) for i in range(6)]
    link.connect(0.0)
    link.pump(0.0)
    assert ids(link.published) == ["0", "1", "2"]
    session.puback(1)  # only "0" is acknowledged
    session.connection_lost(1.0, "network")
    assert [t.message.message_id for t in session.pending()] == ["1", "2", "3", "4", "5"]
    # second connection: "1" "2" resent first, then "3"; lost again without any PUBACK
    link.connect(session.next_connect_at() or 2.0)
    link.pump(2.0)
    assert ids(link.published) == ["1", "2", "3"]
    session.connection_lost(3.0, "network")
    # third connection: everything goes through
    now = session.next_connect_at() or 4.0
    link.connect(now)
    sent: list[str] = []
    while session.pending():
        link.pump(now)
        sent += ids(link.published)
        link.ack_all()
    assert sent == ["1", "2", "3", "4", "5"]
    assert all(t.state is TicketState.ACKNOWLEDGED for t in tickets)
    assert [t.attempts for t in tickets] == [1, 3, 3, 2, 1, 1]
    stats = session.stats
    assert (stats.sent, stats.resent, stats.acknowledged) == (11, 5, 6)
    assert stats.unknown_acks == 0


def test_qos0_lost_or_kept_over_a_disconnect() -> None:
    session = make_session(twin=False, queue=QueueLimits(max_in_flight=1))
    link = Link(session)
    a = session.send_message(msg(0), 0, 0.0)
    q1 = session.send_message(msg(2), 1, 0.0)
    q2 = session.send_message(msg(3), 1, 0.0)
    b = session.send_message(msg(1), 0, 0.0)
    link.connect(0.0)
    # "a" and "q1" handed to the connection (QoS 0 is outside the window of 1); "q2" waits for
    # the window, and "b" behind it keeps the order.
    link.pump(0.0)
    assert q2.state is TicketState.QUEUED
    events = session.connection_lost(1.0, "network")
    assert [e.ticket for e in events if isinstance(e, MessageDone)] == [a]
    assert a.state is TicketState.LOST_QOS0 and b.state is TicketState.QUEUED
    assert q1.state is TicketState.QUEUED
    link.connect(2.0)
    for _ in range(3):
        link.pump(2.0)
        link.ack_all()
    assert b.state is TicketState.SENT
    assert q1.state is q2.state is TicketState.ACKNOWLEDGED
    assert session.stats.lost_qos0 == 1 and session.stats.delivered_qos0 == 1


def test_qos0_is_not_limited_by_the_in_flight_window() -> None:
    session = make_session(twin=False, queue=QueueLimits(max_in_flight=1))
    link = Link(session)
    tickets = [session.send_message(msg(i), 0, 0.0) for i in range(5)]
    link.connect(0.0)
    link.pump(0.0)
    assert all(t.state is TicketState.IN_FLIGHT for t in tickets)
    link.ack_all()
    assert all(t.state is TicketState.SENT for t in tickets)


def test_overflow_policies_through_the_session() -> None:
    rejecting = make_session(queue=QueueLimits(max_messages=2))
    rejecting.send_message(msg(0), 1, 0.0)
    rejecting.send_message(msg(1), 1, 0.0)
    with pytest.raises(QueueFullError):
        rejecting.send_message(msg(2), 1, 0.0)
    assert rejecting.stats.rejected == 1
    dropping = make_session(queue=QueueLimits(max_messages=2, overflow=OverflowPolicy.DROP_OLDEST))
    first = dropping.send_message(msg(0), 1, 0.0)
    dropping.send_message(msg(1), 1, 0.0)
    dropping.send_message(msg(2), 1, 0.0)
    assert dropping.events() == [MessageDone(first)]  # the drop is reported as an event
    assert first.state is TicketState.DROPPED_OVERFLOW


def test_drop_event_comes_with_the_next_event_returning_call() -> None:
    session = make_session(queue=QueueLimits(max_messages=1, overflow=OverflowPolicy.DROP_OLDEST))
    first = session.send_message(msg(0), 1, 0.0)
    session.send_message(msg(1), 1, 0.0)
    assert session.on_timer(0.0) == [MessageDone(first)]
    assert session.events() == []


def test_age_limit_through_the_session() -> None:
    session = make_session(twin=False, queue=QueueLimits(max_age=60.0))
    old = session.send_message(msg(0), 1, 0.0)
    new = session.send_message(msg(1), 1, 30.0)
    assert session.next_deadline() == pytest.approx(60.0)
    assert session.on_timer(60.0) == [MessageDone(old)]
    assert old.state is TicketState.DROPPED_EXPIRED
    link = Link(session)
    link.connect(70.0)
    assert [p.payload for p in link.pump(70.0)] == [b"payload 1"]
    assert new.state is TicketState.IN_FLIGHT
    assert session.stats.dropped_expired == 1


def test_spool_round_trip() -> None:
    """pending() is what a spool saves; restore() brings it back ahead of newer messages."""
    first = make_session(twin=False)
    for i in range(3):
        first.send_message(msg(i), 1 if i != 1 else 0, 0.0)
    saved = [(t.message, t.qos) for t in first.pending()]
    first.close(1.0)
    assert [t.message for t in first.pending()] == [m for m, _ in saved]
    with pytest.raises(HubStateError):
        first.send_message(msg(9), 1, 1.0)

    second = make_session(twin=False)
    second.send_message(msg(10), 1, 2.0)
    restored = second.restore(saved, 2.0)
    assert [t.qos for t in restored] == [1, 0, 1]
    link = Link(second)
    link.connect(3.0)
    assert [p.payload for p in link.pump(3.0)] == [
        b"payload 0",
        b"payload 1",
        b"payload 2",
        b"payload 10",
    ]
    assert second.stats.restored == 3 and second.stats.accepted == 4


def test_close_keeps_in_flight_messages_pending() -> None:
    session = make_session(twin=False)
    link = Link(session)
    link.connect(0.0)
    ticket = session.send_message(msg(0), 1, 0.0)
    link.pump(0.0)
    session.close(1.0)
    assert session.pending() == [ticket] and ticket.state is TicketState.QUEUED


def test_stale_tokens_and_control_acks() -> None:
    session = make_session()
    link = Link(session)
    link.connect(0.0)
    session.send_message(msg(0), 1, 0.0)
    out = session.outgoing(0.0)  # the twin GET and the message
    assert len(out) == 2 and out[0].topic.startswith("$iothub/twin/GET/")
    session.connection_lost(1.0, "network")
    link.connect(2.0)
    session.publish_sent(out[1].token, 1)  # a token of the dead connection
    assert session.puback(1) == []
    assert session.stats.unknown_acks == 1
    out2 = link.pump(2.0)
    assert len(out2) == 2
    link.ack_all()  # acks of the GET (control) are not "unknown"
    assert session.stats.unknown_acks == 1 and session.stats.acknowledged == 1


def test_bad_messages() -> None:
    session = make_session()
    with pytest.raises(HubParseError):
        session.send_message(Message(b"x" * 300_000), 1, 0.0)
    with pytest.raises(HubParseError):
        session.send_message(Message(properties={"$.mid": "x"}), 1, 0.0)
    with pytest.raises(HubParseError):
        session.send_message(msg(0), 2, 0.0)
    assert session.stats.accepted == 0


def test_module_telemetry_topic() -> None:
    from hub_proto import HubSession

    session = HubSession("dev1", host="h", module_id="mod", twin=False)
    link = Link(session)
    link.connect(0.0)
    session.send_message(Message(b"x", output_name="out1"), 1, 0.0)
    assert link.pump(0.0)[0].topic == "devices/dev1/modules/mod/messages/events/%24.on=out1"


def mid_of(topic: str) -> int:
    return int(topic.split("%24.mid=")[1])


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), steps=st.integers(20, 120))
def test_random_disconnects_never_lose_or_reorder_qos1(seed: int, steps: int) -> None:
    """Every accepted QoS 1 message is acknowledged eventually, and messages reach the hub for
    the first time in the order they were accepted (PUBACKs may come in any order)."""
    rng = random.Random(seed)
    session = make_session(twin=False, queue=QueueLimits(max_in_flight=4), rng=rng)
    link = Link(session)
    now = 0.0
    tickets: list[MessageTicket] = []
    first_seen: list[int] = []

    def pump() -> None:
        for publish in link.pump(now):
            if mid_of(publish.topic) not in first_seen:
                first_seen.append(mid_of(publish.topic))

    for _ in range(steps):
        now += rng.uniform(0, 2)
        action = rng.random()
        if session.should_connect(now):
            link.connect(now)
        elif action < 0.4:
            tickets.append(session.send_message(msg(len(tickets)), 1, now))
        elif action < 0.8:
            pump()
            for packet_id, publish in list(link.published):
                if rng.random() < 0.6:  # some PUBACKs are late, or never come
                    session.puback(packet_id)
                    link.published.remove((packet_id, publish))
        elif action < 0.9:
            session.connection_lost(now, "network")
    if session.state.value != "connected":
        if not session.should_connect(now):
            now = session.next_connect_at() or now
        link.connect(now)
    while session.pending():
        pump()
        link.ack_all()
    assert first_seen == list(range(len(tickets)))
    assert all(t.state is TicketState.ACKNOWLEDGED for t in tickets)
    assert session.stats.acknowledged == len(tickets)
    assert session.stats.sent == len(tickets) + session.stats.resent
