"""Tests of hub_proto.telemetry: the bounded queue, in-flight window, replay and counters."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub_proto import (
    HubParseError,
    HubStateError,
    Message,
    MessageTicket,
    OverflowPolicy,
    QueueFullError,
    QueueLimits,
    TelemetryQueue,
    TicketState,
)
from hub_proto.telemetry import MAX_MESSAGE_BYTES
from hub_proto.topics import telemetry_topic


def msg(i: int, size: int = 1) -> Message:
    return Message(b"x" * size, message_id=str(i))


def check_invariant(queue: TelemetryQueue) -> None:
    s = queue.stats
    done = s.acknowledged + s.delivered_qos0 + s.dropped_overflow + s.dropped_expired + s.lost_qos0
    assert s.accepted == done + len(queue.pending())
    assert queue.bytes == sum(t.size for t in queue.pending())


def test_count_limit_reject() -> None:
    queue = TelemetryQueue("d", limits=QueueLimits(max_messages=3))
    tickets = [queue.add(msg(i), 1, 0.0)[0] for i in range(3)]
    with pytest.raises(QueueFullError):
        queue.add(msg(9), 1, 0.0)
    assert queue.stats.rejected == 1 and queue.stats.accepted == 3
    assert [t.state for t in tickets] == [TicketState.QUEUED] * 3
    check_invariant(queue)


def test_count_limit_drop_oldest() -> None:
    queue = TelemetryQueue(
        "d", limits=QueueLimits(max_messages=3, overflow=OverflowPolicy.DROP_OLDEST)
    )
    tickets = [queue.add(msg(i), 1, 0.0)[0] for i in range(3)]
    _, dropped = queue.add(msg(3), 1, 0.0)
    assert [e.ticket for e in dropped] == [tickets[0]]
    assert tickets[0].state is TicketState.DROPPED_OVERFLOW
    assert [t.message.message_id for t in queue.pending()] == ["1", "2", "3"]
    assert queue.stats.dropped_overflow == 1
    check_invariant(queue)


def test_drop_oldest_prefers_queued_over_in_flight() -> None:
    queue = TelemetryQueue(
        "d",
        limits=QueueLimits(max_messages=3, max_in_flight=1, overflow=OverflowPolicy.DROP_OLDEST),
    )
    tickets = [queue.add(msg(i), 1, 0.0)[0] for i in range(3)]
    assert queue.take(0.0) == [tickets[0]]
    _, dropped = queue.add(msg(3), 1, 0.0)
    assert [e.ticket for e in dropped] == [tickets[1]]  # the oldest queued, not the one in flight
    check_invariant(queue)


def test_drop_oldest_in_flight_when_nothing_is_queued() -> None:
    queue = TelemetryQueue(
        "d", limits=QueueLimits(max_messages=2, overflow=OverflowPolicy.DROP_OLDEST)
    )
    tickets = [queue.add(msg(i), 1, 0.0)[0] for i in range(2)]
    assert queue.take(0.0) == tickets
    queue.publish_sent(tickets[0], 1)
    _, dropped = queue.add(msg(2), 1, 0.0)
    assert [e.ticket for e in dropped] == [tickets[0]]
    assert queue.puback(1) == []  # its late PUBACK matches nothing
    assert queue.stats.unknown_acks == 1
    check_invariant(queue)


def test_byte_limit() -> None:
    one = TelemetryQueue("d").add(msg(0, 100), 1, 0.0)[0].size
    queue = TelemetryQueue("d", limits=QueueLimits(max_bytes=one * 2))
    queue.add(msg(0, 100), 1, 0.0)
    queue.add(msg(1, 100), 1, 0.0)
    with pytest.raises(QueueFullError):
        queue.add(msg(2, 100), 1, 0.0)
    with pytest.raises(QueueFullError):  # never fits, whatever the policy
        TelemetryQueue(
            "d", limits=QueueLimits(max_bytes=10, overflow=OverflowPolicy.DROP_OLDEST)
        ).add(msg(0, 100), 1, 0.0)
    dropping = TelemetryQueue(
        "d", limits=QueueLimits(max_bytes=one * 2, overflow=OverflowPolicy.DROP_OLDEST)
    )
    for i in range(5):
        dropping.add(msg(i, 100), 1, 0.0)
    assert [t.message.message_id for t in dropping.pending()] == ["3", "4"]
    assert dropping.stats.dropped_overflow == 3
    check_invariant(dropping)


def test_age_limit() -> None:
    queue = TelemetryQueue("d", limits=QueueLimits(max_age=10.0, max_in_flight=1))
    a = queue.add(msg(0), 1, 0.0)[0]
    b = queue.add(msg(1), 1, 5.0)[0]
    assert queue.next_deadline() == 10.0
    assert queue.take(1.0) == [a]  # in flight: not expired by age
    assert queue.expire(9.9) == []
    assert [e.ticket for e in queue.expire(15.0)] == [b]
    assert b.state is TicketState.DROPPED_EXPIRED and a.state is TicketState.IN_FLIGHT
    assert queue.stats.dropped_expired == 1
    assert queue.next_deadline() is None
    check_invariant(queue)


def test_message_size_and_qos_checks() -> None:
    queue = TelemetryQueue("d")
    with pytest.raises(HubParseError):
        queue.add(Message(b"x" * MAX_MESSAGE_BYTES), 1, 0.0)
    for qos in (2, -1, True):
        with pytest.raises(HubParseError):
            queue.add(msg(0), qos, 0.0)
    with pytest.raises(HubParseError):
        queue.add(b"raw", 1, 0.0)  # type: ignore[arg-type]
    assert queue.stats.accepted == 0


def test_limits_validation() -> None:
    for kwargs in ({"max_messages": 0}, {"max_bytes": 0}, {"max_in_flight": 0}, {"max_age": 0}):
        with pytest.raises(HubStateError):
            QueueLimits(**kwargs)  # type: ignore[arg-type]


def test_window_ack_and_replay_in_order() -> None:
    queue = TelemetryQueue("d", limits=QueueLimits(max_in_flight=2))
    tickets = [queue.add(msg(i), 1, 0.0)[0] for i in range(5)]
    first = queue.take(0.0)
    assert first == tickets[:2] and queue.take(0.0) == []
    queue.publish_sent(first[0], 1)
    queue.publish_sent(first[1], 2)
    assert [e.ticket for e in queue.puback(1)] == [tickets[0]]
    assert queue.take(0.0) == [tickets[2]]
    # connection lost: 1 and 2 in flight go back, in order, ahead of 3 and 4
    assert queue.connection_lost() == []
    assert [t.message.message_id for t in queue.pending()] == ["1", "2", "3", "4"]
    again = queue.take(1.0)
    assert again == [tickets[1], tickets[2]]
    assert queue.stats.resent == 2 and queue.stats.sent == 5
    assert tickets[1].attempts == 2
    check_invariant(queue)


def test_qos0_lost_only_when_handed_to_a_dead_connection() -> None:
    queue = TelemetryQueue("d", limits=QueueLimits(max_in_flight=1))
    a = queue.add(msg(0), 0, 0.0)[0]
    q1 = queue.add(msg(2), 1, 0.0)[0]
    q2 = queue.add(msg(3), 1, 0.0)[0]
    b = queue.add(msg(1), 0, 0.0)[0]
    # QoS 0 is outside the window; the full window stops "q2", and "b" stays behind it.
    assert queue.take(0.0) == [a, q1]
    events = queue.connection_lost()
    assert [e.ticket for e in events] == [a] and a.state is TicketState.LOST_QOS0
    assert b.state is TicketState.QUEUED and q1.state is TicketState.QUEUED
    assert queue.take(1.0) == [q1]
    queue.publish_sent(q1, 5)
    queue.puback(5)
    assert queue.take(1.0) == [q2, b]
    queue.publish_sent(q2, 6)
    queue.puback(6)
    queue.publish_sent(b, 7)
    assert [e.ticket for e in queue.puback(7)] == [b] and b.state is TicketState.SENT
    assert queue.stats.lost_qos0 == 1 and queue.stats.delivered_qos0 == 1
    check_invariant(queue)


def test_qos0_bypasses_the_window_but_not_the_limits() -> None:
    queue = TelemetryQueue("d", limits=QueueLimits(max_in_flight=1, max_messages=3))
    tickets = [queue.add(msg(i), 0, 0.0)[0] for i in range(3)]
    assert queue.take(0.0) == tickets
    with pytest.raises(QueueFullError):
        queue.add(msg(9), 0, 0.0)  # written-not-yet QoS 0 still counts against the queue
    check_invariant(queue)


def test_bare_messages_use_the_cached_topic() -> None:
    queue = TelemetryQueue("d", "m")
    bare = queue.add(Message(b"abc"), 1, 0.0)[0]
    assert bare.topic == telemetry_topic("d", Message(b"abc"), "m")
    assert bare.size == len(bare.topic) + 3
    with_props = queue.add(Message(b"abc", properties={"k": "v"}), 1, 0.0)[0]
    assert with_props.topic == telemetry_topic("d", Message(b"abc", properties={"k": "v"}), "m")


def test_early_and_unknown_acks() -> None:
    queue = TelemetryQueue("d")
    ticket = queue.add(msg(0), 1, 0.0)[0]
    queue.take(0.0)
    assert queue.puback(5) == []  # PUBACK before publish_sent (threaded client)
    assert queue.stats.unknown_acks == 1
    assert [e.ticket for e in queue.publish_sent(ticket, 5)] == [ticket]
    assert queue.stats.unknown_acks == 0
    assert queue.puback(5) == []  # a duplicate
    assert queue.stats.unknown_acks == 1
    assert queue.stats.acknowledged == 1
    check_invariant(queue)


def test_restore_goes_first_and_respects_limits() -> None:
    queue = TelemetryQueue("d", limits=QueueLimits(max_messages=3))
    queue.add(msg(10), 1, 0.0)
    tickets, dropped = queue.restore([msg(1), (msg(2), 0)], 1.0)
    assert [t.qos for t in tickets] == [1, 0] and dropped == []
    assert [t.message.message_id for t in queue.pending()] == ["1", "2", "10"]
    _, dropped = queue.restore([msg(0)], 2.0)  # over the limit: the oldest goes
    assert [e.ticket.message.message_id for e in dropped] == ["0"]
    assert queue.stats.restored == 3 and queue.stats.accepted == 4
    check_invariant(queue)


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("add"), st.integers(0, 1), st.integers(0, 300)),
            st.tuples(st.just("take"), st.just(0), st.just(0)),
            st.tuples(st.just("ack"), st.integers(0, 30), st.just(0)),
            st.tuples(st.just("lost"), st.just(0), st.just(0)),
            st.tuples(st.just("tick"), st.integers(0, 20), st.just(0)),
        ),
        max_size=60,
    ),
    policy=st.sampled_from(list(OverflowPolicy)),
)
def test_random_operations_keep_invariants(
    ops: list[tuple[str, int, int]], policy: OverflowPolicy
) -> None:
    """Order of first hand-over follows acceptance; counters always add up; bounds hold."""
    limits = QueueLimits(
        max_messages=8, max_bytes=2000, max_age=30.0, overflow=policy, max_in_flight=3
    )
    queue = TelemetryQueue("d", limits=limits)
    now = 0.0
    packet = 0
    sent: dict[int, MessageTicket] = {}
    first_hand_over: list[int] = []
    for op, a, b in ops:
        if op == "add":
            with contextlib.suppress(QueueFullError):
                queue.add(Message(b"p" * b), a, now)
        elif op == "take":
            for ticket in queue.take(now):
                if ticket.attempts == 1:
                    first_hand_over.append(ticket.id)
                packet += 1
                queue.publish_sent(ticket, packet)
                sent[packet] = ticket
        elif op == "ack":
            queue.puback(a)
        elif op == "lost":
            queue.connection_lost()
        else:
            now += a
            queue.expire(now)
        check_invariant(queue)
        assert len(queue) <= limits.max_messages and queue.bytes <= limits.max_bytes
    assert first_hand_over == sorted(first_hand_over)
