"""The bounded outgoing telemetry queue: what is accepted, in flight, acknowledged or dropped.

Rules:

* A message is accepted into a queue bounded by count, bytes and (optionally) age. When full, the
  :class:`OverflowPolicy` either rejects the new message (:class:`QueueFullError`, the default:
  nothing accepted is ever dropped for space) or drops the oldest *queued* message (the oldest in
  flight only when nothing is queued).
* Messages leave in order. At most ``max_in_flight`` QoS 1 messages are in flight at a time (a
  QoS 1 message stays in flight until its PUBACK). QoS 0 has no acknowledgement, so the window
  does not apply to it: a QoS 0 message is handed to the connection as soon as it reaches the
  front of the queue, and stays in flight (still counted by the queue's count and byte limits)
  until the MQTT client reports it written; the socket is then its only limit.
* On connection loss, in-flight QoS 1 messages go back to the front of the queue in their order
  and are sent again after the reconnect (``resent`` counts these repeats: the hub may see
  duplicates, so give messages a ``message_id`` if the receiver must de-duplicate). In-flight
  QoS 0 messages were handed to a dead connection: they end as ``LOST_QOS0``; QoS 0 messages not
  yet handed out wait for the reconnect like any other.
* ``max_age`` drops messages still queued (not in flight) that long after acceptance.
* The size of a message is its topic (with the property bag) plus its payload, in bytes; Azure
  refuses messages over 256 KB, so larger ones raise :class:`HubParseError`.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from .errors import HubParseError, HubStateError, QueueFullError
from .events import MessageDone
from .message import Message
from .topics import telemetry_topic, telemetry_topic_prefix

#: Azure's limit on one device-to-cloud message.
MAX_MESSAGE_BYTES = 256 * 1024
#: Acknowledgements that arrive before ``publish_sent`` are kept this long (count) for matching.
_MAX_EARLY_ACKS = 256


class OverflowPolicy(enum.Enum):
    """What happens to a new message when the queue is full."""

    REJECT = "reject"
    DROP_OLDEST = "drop_oldest"


class TicketState(enum.Enum):
    """Where a telemetry message is."""

    QUEUED = "queued"
    IN_FLIGHT = "in_flight"
    ACKNOWLEDGED = "acknowledged"  # QoS 1: PUBACK received
    SENT = "sent"  # QoS 0: written by the MQTT client
    DROPPED_OVERFLOW = "dropped_overflow"
    DROPPED_EXPIRED = "dropped_expired"
    LOST_QOS0 = "lost_qos0"


FINAL_STATES = frozenset(
    [
        TicketState.ACKNOWLEDGED,
        TicketState.SENT,
        TicketState.DROPPED_OVERFLOW,
        TicketState.DROPPED_EXPIRED,
        TicketState.LOST_QOS0,
    ]
)


@dataclass(frozen=True)
class QueueLimits:
    """Bounds of the outgoing queue (in-flight messages count too)."""

    max_messages: int = 1000
    max_bytes: int = 16 * 1024 * 1024
    max_age: float | None = None
    overflow: OverflowPolicy = OverflowPolicy.REJECT
    max_in_flight: int = 20

    def __post_init__(self) -> None:
        if self.max_messages < 1 or self.max_bytes < 1 or self.max_in_flight < 1:
            raise HubStateError("queue limits must be positive")
        if self.max_age is not None and not self.max_age > 0:
            raise HubStateError("max_age must be positive (or None)")
        if not isinstance(self.overflow, OverflowPolicy):
            raise HubStateError("overflow must be an OverflowPolicy")


@dataclass(eq=False)
class MessageTicket:
    """One accepted message and what became of it (updated in place by the session)."""

    id: int
    message: Message
    qos: int
    topic: str
    size: int
    accepted_at: float
    state: TicketState = TicketState.QUEUED
    #: How many times the message was handed to a connection.
    attempts: int = 0

    @property
    def done(self) -> bool:
        """True once the message reached a final state."""
        return self.state in FINAL_STATES


@dataclass
class QueueStats:
    """Counters since the session began. Invariant: ``accepted`` = ``acknowledged`` +
    ``delivered_qos0`` + ``dropped_overflow`` + ``dropped_expired`` + ``lost_qos0`` + pending."""

    accepted: int = 0  # includes ``restored``
    restored: int = 0
    rejected: int = 0
    sent: int = 0  # hand-overs to a connection, repeats included
    resent: int = 0  # hand-overs after the first
    acknowledged: int = 0
    delivered_qos0: int = 0
    dropped_overflow: int = 0
    dropped_expired: int = 0
    lost_qos0: int = 0
    unknown_acks: int = 0  # acks matching no message in flight (duplicates, stale ids)


class TelemetryQueue:
    """Bounded FIFO of telemetry tickets with in-flight tracking."""

    def __init__(
        self, device_id: str, module_id: str | None = None, limits: QueueLimits | None = None
    ) -> None:
        self.device_id = device_id
        self.module_id = module_id
        self.limits = limits or QueueLimits()
        self.stats = QueueStats()
        self._queue: deque[MessageTicket] = deque()
        self._in_flight: dict[int, MessageTicket] = {}  # ticket id -> ticket, in hand-over order
        self._by_packet: dict[int, MessageTicket] = {}
        self._early_acks: dict[int, None] = {}
        self._bytes = 0
        self._next_id = 0
        self._in_flight_qos1 = 0
        #: The topic of a message without properties, and its length in bytes (cached).
        self._bare_topic = telemetry_topic_prefix(device_id, module_id)
        self._bare_topic_bytes = len(self._bare_topic.encode("utf-8", "surrogatepass"))

    # -- views -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._queue) + len(self._in_flight)

    @property
    def bytes(self) -> int:
        """Bytes held by messages not yet done."""
        return self._bytes

    def pending(self) -> list[MessageTicket]:
        """Messages not yet done, oldest first (in flight, then queued): what a spool persists."""
        return [*self._in_flight.values(), *self._queue]

    def next_deadline(self) -> float | None:
        """When the oldest queued message expires (None without ``max_age``)."""
        if self.limits.max_age is None or not self._queue:
            return None
        return min(t.accepted_at for t in self._queue) + self.limits.max_age

    # -- admission -------------------------------------------------------------------------

    def _make_ticket(self, message: Message, qos: int, now: float) -> MessageTicket:
        if not isinstance(message, Message):
            raise HubParseError("send_message needs a Message")
        if isinstance(qos, bool) or qos not in (0, 1):
            raise HubParseError("telemetry QoS must be 0 or 1 (Azure closes the connection on 2)")
        if _is_bare(message):
            topic = self._bare_topic
            size = self._bare_topic_bytes + len(message.payload)
        else:
            topic = telemetry_topic(self.device_id, message, self.module_id)
            size = len(topic.encode("utf-8", "surrogatepass")) + len(message.payload)
        if size > MAX_MESSAGE_BYTES:
            raise HubParseError(f"message of {size} bytes exceeds Azure's 256 KB limit")
        self._next_id += 1
        return MessageTicket(self._next_id, message, qos, topic, size, now)

    def _fits(self, count: int, size: int) -> bool:
        return count <= self.limits.max_messages and size <= self.limits.max_bytes

    def add(
        self, message: Message, qos: int, now: float
    ) -> tuple[MessageTicket, list[MessageDone]]:
        """Accept a message at the back; returns its ticket and any tickets dropped for room."""
        ticket = self._make_ticket(message, qos, now)
        if ticket.size > self.limits.max_bytes:
            self.stats.rejected += 1
            raise QueueFullError(f"a {ticket.size}-byte message never fits the queue's byte limit")
        if self.limits.overflow is OverflowPolicy.REJECT and not self._fits(
            len(self) + 1, self._bytes + ticket.size
        ):
            self.stats.rejected += 1
            raise QueueFullError(
                f"telemetry queue full ({len(self)} messages, {self._bytes} bytes)"
            )
        events = self._make_room(1, ticket.size)
        self._queue.append(ticket)
        self._bytes += ticket.size
        self.stats.accepted += 1
        return ticket, events

    def restore(
        self, items: Iterable[Message | tuple[Message, int]], now: float
    ) -> tuple[list[MessageTicket], list[MessageDone]]:
        """Put spooled messages (oldest first) at the *front* of the queue, ahead of newer ones.

        Their age restarts at ``now``. If they do not all fit, the oldest are dropped whatever the
        overflow policy (counted in ``dropped_overflow``).
        """
        tickets: list[MessageTicket] = []
        for item in items:
            message, qos = item if isinstance(item, tuple) else (item, 1)
            tickets.append(self._make_ticket(message, qos, now))
        for ticket in reversed(tickets):
            self._queue.appendleft(ticket)
            self._bytes += ticket.size
        self.stats.accepted += len(tickets)
        self.stats.restored += len(tickets)
        return tickets, self._make_room(0, 0)

    def _make_room(self, count: int, size: int) -> list[MessageDone]:
        events: list[MessageDone] = []
        while len(self) and not self._fits(len(self) + count, self._bytes + size):
            if self._queue:
                victim = self._queue.popleft()
            else:
                _, victim = next(iter(self._in_flight.items()))
                self._forget_in_flight(victim)
            events.append(self._finish(victim, TicketState.DROPPED_OVERFLOW))
        return events

    # -- sending ---------------------------------------------------------------------------

    def expire(self, now: float) -> list[MessageDone]:
        """Drop queued messages older than ``max_age``."""
        max_age = self.limits.max_age
        if max_age is None or not self._queue:
            return []
        events: list[MessageDone] = []
        keep: deque[MessageTicket] = deque()
        for ticket in self._queue:
            if ticket.accepted_at + max_age <= now:
                events.append(self._finish(ticket, TicketState.DROPPED_EXPIRED))
            else:
                keep.append(ticket)
        self._queue = keep
        return events

    def take(self, now: float) -> list[MessageTicket]:
        """Hand out the next messages, oldest first, until a QoS 1 message finds the in-flight
        window full (QoS 0 messages do not count against the window)."""
        out: list[MessageTicket] = []
        queue = self._queue
        window = self.limits.max_in_flight
        while queue:
            ticket = queue[0]
            if ticket.qos == 1:
                if self._in_flight_qos1 >= window:
                    break
                self._in_flight_qos1 += 1
            queue.popleft()
            ticket.state = TicketState.IN_FLIGHT
            ticket.attempts += 1
            self.stats.sent += 1
            if ticket.attempts > 1:
                self.stats.resent += 1
            self._in_flight[ticket.id] = ticket
            out.append(ticket)
        return out

    def publish_sent(self, ticket: MessageTicket, packet_id: int) -> list[MessageDone]:
        """The transport handed ``ticket`` to its client, which gave it ``packet_id``."""
        if self._in_flight.get(ticket.id) is not ticket:
            return []
        self._by_packet[packet_id] = ticket
        if packet_id in self._early_acks:
            del self._early_acks[packet_id]
            self.stats.unknown_acks -= 1
            return self.puback(packet_id)
        return []

    def puback(self, packet_id: int) -> list[MessageDone]:
        """The client reports ``packet_id`` done (PUBACK, or written for QoS 0)."""
        ticket = self._by_packet.pop(packet_id, None)
        if ticket is None:
            self.stats.unknown_acks += 1
            self._early_acks[packet_id] = None
            while len(self._early_acks) > _MAX_EARLY_ACKS:
                del self._early_acks[next(iter(self._early_acks))]
            return []
        self._in_flight.pop(ticket.id, None)
        if ticket.qos == 1:
            self._in_flight_qos1 -= 1
            return [self._finish(ticket, TicketState.ACKNOWLEDGED)]
        return [self._finish(ticket, TicketState.SENT)]

    def connection_lost(self) -> list[MessageDone]:
        """Put in-flight QoS 1 messages back at the front (in order); QoS 0 ones are lost."""
        events: list[MessageDone] = []
        back: list[MessageTicket] = []
        for ticket in self._in_flight.values():
            if ticket.qos == 1:
                ticket.state = TicketState.QUEUED
                back.append(ticket)
            else:
                events.append(self._finish(ticket, TicketState.LOST_QOS0))
        self._in_flight.clear()
        self._in_flight_qos1 = 0
        self._by_packet.clear()
        self._early_acks.clear()
        self._queue.extendleft(reversed(back))
        return events

    # -- internals -------------------------------------------------------------------------

    def _forget_in_flight(self, ticket: MessageTicket) -> None:
        if self._in_flight.pop(ticket.id, None) is not None and ticket.qos == 1:
            self._in_flight_qos1 -= 1
        for packet_id, held in list(self._by_packet.items()):
            if held is ticket:
                del self._by_packet[packet_id]

    def _finish(self, ticket: MessageTicket, state: TicketState) -> MessageDone:
        ticket.state = state
        self._bytes -= ticket.size
        counter = _COUNTERS[state]
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        return MessageDone(ticket)


_COUNTERS = {
    TicketState.ACKNOWLEDGED: "acknowledged",
    TicketState.SENT: "delivered_qos0",
    TicketState.DROPPED_OVERFLOW: "dropped_overflow",
    TicketState.DROPPED_EXPIRED: "dropped_expired",
    TicketState.LOST_QOS0: "lost_qos0",
}
_BARE_FIELDS = tuple(
    name for name in Message.__dataclass_fields__ if name not in ("payload", "properties")
)


def _is_bare(message: Message) -> bool:
    """True for a message with no application and no system properties (an empty bag)."""
    if message.properties:
        return False
    return all(getattr(message, name) is None for name in _BARE_FIELDS)
