"""Tests of hub_proto.session: the connection lifecycle, back-off, auth failures, SAS renewal."""

from __future__ import annotations

import random
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub_proto import (
    Backoff,
    BackoffPolicy,
    ConnectionState,
    HubAuthError,
    HubSession,
    HubStateError,
    Message,
    OverflowPolicy,
    QueueFullError,
    QueueLimits,
    RequestFailed,
    SessionFailed,
    TokenRenewalDue,
)

from .harness import HOST, Link, make_session

S = ConnectionState

# -- reaching every state ------------------------------------------------------------------------


def in_state(state: ConnectionState) -> HubSession:
    session = make_session(max_auth_failures=1)
    if state is S.IDLE:
        return session
    if state is S.CLOSED:
        session.close(0.0)
        return session
    session.connect_started(0.0)
    if state is S.CONNECTING:
        return session
    if state is S.FAILED:
        session.connect_failed(0.0, 5)
    elif state is S.BACKOFF:
        session.connect_failed(0.0, None)
    else:
        session.connection_made(0.0, False)
    assert session.state is state
    return session


INPUTS: dict[str, Callable[[HubSession], object]] = {
    "connect_started": lambda s: s.connect_started(1.0),
    "connection_made": lambda s: s.connection_made(1.0, False),
    "connection_made_present": lambda s: s.connection_made(1.0, True),
    "connect_failed_network": lambda s: s.connect_failed(1.0, None),
    "connect_failed_unavailable": lambda s: s.connect_failed(1.0, 3),
    "connect_failed_auth": lambda s: s.connect_failed(1.0, 4),
    "lost_network": lambda s: s.connection_lost(1.0, "network"),
    "lost_auth": lambda s: s.connection_lost(1.0, "auth"),
    "lost_renewal": lambda s: s.connection_lost(1.0, "renewal"),
    "close": lambda s: s.close(1.0),
    "on_timer": lambda s: s.on_timer(1.0),
}
ERR = "error"
# With max_auth_failures=1, one auth failure fails the session.
TABLE: dict[ConnectionState, dict[str, ConnectionState | str]] = {
    S.IDLE: {
        "connect_started": S.CONNECTING,
        "connection_made": ERR,
        "connection_made_present": ERR,
        "connect_failed_network": ERR,
        "connect_failed_unavailable": ERR,
        "connect_failed_auth": ERR,
        "lost_network": S.IDLE,
        "lost_auth": S.IDLE,
        "lost_renewal": S.IDLE,
        "close": S.CLOSED,
        "on_timer": S.IDLE,
    },
    S.CONNECTING: {
        "connect_started": ERR,
        "connection_made": S.CONNECTED,
        "connection_made_present": S.CONNECTED,
        "connect_failed_network": S.BACKOFF,
        "connect_failed_unavailable": S.BACKOFF,
        "connect_failed_auth": S.FAILED,
        "lost_network": S.BACKOFF,
        "lost_auth": S.FAILED,
        "lost_renewal": S.BACKOFF,
        "close": S.CLOSED,
        "on_timer": S.CONNECTING,
    },
    S.CONNECTED: {
        "connect_started": ERR,
        "connection_made": ERR,
        "connection_made_present": ERR,
        "connect_failed_network": ERR,
        "connect_failed_unavailable": ERR,
        "connect_failed_auth": ERR,
        "lost_network": S.BACKOFF,
        "lost_auth": S.FAILED,
        "lost_renewal": S.BACKOFF,
        "close": S.CLOSED,
        "on_timer": S.CONNECTED,
    },
    S.BACKOFF: {
        "connect_started": S.CONNECTING,
        "connection_made": ERR,
        "connection_made_present": ERR,
        "connect_failed_network": ERR,
        "connect_failed_unavailable": ERR,
        "connect_failed_auth": ERR,
        "lost_network": S.BACKOFF,
        "lost_auth": S.BACKOFF,
        "lost_renewal": S.BACKOFF,
        "close": S.CLOSED,
        "on_timer": S.BACKOFF,
    },
    S.CLOSED: {name: ERR for name in INPUTS}
    | {
        "lost_network": S.CLOSED,
        "lost_auth": S.CLOSED,
        "lost_renewal": S.CLOSED,
        "close": S.CLOSED,
        "on_timer": S.CLOSED,
    },
    S.FAILED: {name: ERR for name in INPUTS}
    | {
        "lost_network": S.FAILED,
        "lost_auth": S.FAILED,
        "lost_renewal": S.FAILED,
        "close": S.FAILED,
        "on_timer": S.FAILED,
    },
}


@pytest.mark.parametrize("state", list(S))
@pytest.mark.parametrize("name", list(INPUTS))
def test_every_state_and_input(state: ConnectionState, name: str) -> None:
    session = in_state(state)
    expected = TABLE[state][name]
    if expected == ERR:
        with pytest.raises(HubStateError):
            INPUTS[name](session)
        assert session.state is state  # a refused input changes nothing
    else:
        INPUTS[name](session)
        assert session.state is expected
    if session.state is S.BACKOFF:
        assert session.next_connect_at() is not None
        assert session.next_deadline() is not None
    if session.state in (S.CLOSED, S.FAILED):
        assert not session.should_connect(1e9)
        assert session.next_deadline() is None


def test_table_covers_everything() -> None:
    assert set(TABLE) == set(S)
    for row in TABLE.values():
        assert set(row) == set(INPUTS)


def test_unknown_disconnect_reason() -> None:
    session = in_state(S.CONNECTED)
    with pytest.raises(HubStateError):
        session.connection_lost(1.0, "bored")  # type: ignore[arg-type]


def test_should_connect_and_next_connect_at() -> None:
    session = make_session(backoff=BackoffPolicy(2.0, 60.0, 0.0))
    assert session.should_connect(0.0) and session.next_connect_at() is None
    session.connect_started(0.0)
    assert not session.should_connect(0.0)
    session.connect_failed(10.0, None)
    assert session.next_connect_at() == 12.0
    assert not session.should_connect(11.9) and session.should_connect(12.0)
    assert session.next_deadline() == 12.0


def test_identity() -> None:
    session = make_session(client_type="dps-mqtt/0.1", model_id="dtmi:x;1")
    assert session.client_id == "dev1"
    assert session.username == (
        f"{HOST}/dev1/?api-version=2021-04-12&DeviceClientType=dps-mqtt%2F0.1&model-id=dtmi%3Ax%3B1"
    )
    module = HubSession("dev1", host=HOST, module_id="mod")
    assert module.client_id == "dev1/mod"
    assert module.username == f"{HOST}/dev1/mod/?api-version=2021-04-12"


def test_subscriptions_needed() -> None:
    assert make_session().subscriptions_needed() == [
        ("$iothub/twin/res/#", 1),
        ("$iothub/twin/PATCH/properties/desired/#", 1),
        ("$iothub/methods/POST/#", 0),
        ("devices/dev1/messages/devicebound/#", 1),
    ]
    assert make_session(twin=False, c2d=False).subscriptions_needed() == [
        ("$iothub/methods/POST/#", 0)
    ]
    assert make_session(twin=False, methods=False, c2d=False).subscriptions_needed() == []
    module = HubSession("dev1", host=HOST, module_id="m")
    assert ("devices/dev1/messages/devicebound/#", 1) not in module.subscriptions_needed()
    # the same list on every connection, whether or not the server kept the session
    session = make_session()
    link = Link(session)
    link.connect(0.0, session_present=True)
    assert session.session_present
    assert len(session.subscriptions_needed()) == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        {"token_ttl": 0},
        {"renew_margin": 0},
        {"renew_margin": 1},
        {"max_auth_failures": 0},
        {"request_timeout": 0},
    ],
)
def test_bad_settings(kwargs: dict[str, float]) -> None:
    with pytest.raises(HubStateError):
        make_session(**kwargs)


# -- back-off ------------------------------------------------------------------------------------


def test_reconnect_backoff_grows_caps_and_jitters_reproducibly() -> None:
    policy = BackoffPolicy(base=1.0, cap=20.0, jitter=0.5)
    session = make_session(backoff=policy, rng=random.Random(99))
    reference = Backoff(policy, random.Random(99))
    now = 0.0
    delays = []
    for _ in range(12):
        assert session.should_connect(now)
        session.connect_started(now)
        session.connect_failed(now, None)
        at = session.next_connect_at()
        assert at is not None
        delays.append(at - now)
        now = at
    assert delays == pytest.approx([reference.next_delay() for _ in range(12)])
    for attempt, delay in enumerate(delays):
        ceiling = min(20.0, 2.0**attempt)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 20.0 and delays[-1] >= 10.0


def test_stable_connection_resets_backoff_and_flapping_does_not() -> None:
    session = make_session(backoff=BackoffPolicy(1.0, 100.0, 0.0), stable_after=30.0)
    now = 0.0
    for _ in range(4):  # delays 1, 2, 4, 8
        session.connect_started(now)
        session.connect_failed(now, None)
        now = session.next_connect_at() or now
    session.connect_started(now)
    session.connection_made(now)
    session.connection_lost(now + 5.0, "network")  # flapping: 5 s < stable_after
    assert session.next_connect_at() == now + 5.0 + 16.0
    now = session.next_connect_at() or now
    session.connect_started(now)
    session.connection_made(now)
    session.connection_lost(now + 60.0, "network")  # stable: back to the base delay
    assert session.next_connect_at() == now + 60.0 + 1.0


def test_renewal_reconnects_at_once() -> None:
    session = in_state(S.CONNECTED)
    session.connection_lost(5.0, "renewal")
    assert session.state is S.BACKOFF and session.next_connect_at() == 5.0
    assert session.should_connect(5.0)


# -- authentication failures ---------------------------------------------------------------------


@pytest.mark.parametrize("code", [2, 4, 5])
def test_auth_failures_stop_after_n(code: int) -> None:
    session = make_session(max_auth_failures=3, backoff=BackoffPolicy(1.0, 10.0, 0.0))
    link = Link(session)
    request = None
    now = 0.0
    for attempt in range(1, 4):
        assert session.should_connect(now)
        session.connect_started(now)
        if attempt == 1:
            request = session.get_twin(now)  # waits offline for a connection
        events = session.connect_failed(now, code)
        assert session.auth_failures == attempt
        if attempt < 3:
            assert session.state is S.BACKOFF and events == []
            now = session.next_connect_at() or now
    assert session.state is S.FAILED
    assert isinstance(session.error, HubAuthError) and session.error.return_code == code
    failed = [e for e in events if isinstance(e, RequestFailed)]
    assert [e.request for e in failed] == [request]
    assert isinstance(failed[0].error, HubAuthError)
    assert any(isinstance(e, SessionFailed) and e.error is session.error for e in events)
    assert not session.should_connect(1e9) and session.next_deadline() is None
    with pytest.raises(HubStateError):
        session.send_message(Message(b"x"), 1, now)
    with pytest.raises(HubStateError):
        session.get_twin(now)
    assert link.pump(now) == []


def test_success_resets_auth_failures() -> None:
    session = make_session(max_auth_failures=2)
    session.connect_started(0.0)
    session.connect_failed(0.0, 5)
    session.connect_started(10.0)
    session.connection_made(10.0)
    assert session.auth_failures == 0
    session.connection_lost(20.0, "auth")  # the hub dropped us over the token
    assert session.state is S.BACKOFF and session.auth_failures == 1
    session.connect_started(30.0)
    session.connect_failed(30.0, 4)
    assert session.state is S.FAILED and session.error is not None
    assert session.error.return_code == 4


@pytest.mark.parametrize("code", [None, 1, 3, 99])
def test_other_failures_retry_forever(code: int | None) -> None:
    session = make_session(max_auth_failures=1, backoff=BackoffPolicy(1.0, 5.0, 0.5))
    now = 0.0
    for _ in range(100):
        session.connect_started(now)
        assert session.connect_failed(now, code) == []
        assert session.state is S.BACKOFF
        now = session.next_connect_at() or now
    assert session.error is None


# -- SAS token renewal ---------------------------------------------------------------------------


@pytest.mark.parametrize("drops", [False, True])
def test_token_renewal_over_48_hours(drops: bool) -> None:
    """1 h tokens over 48 simulated hours: every connection is renewed at 80 % of its token's
    life, none outlives its token, and unexpected drops do not confuse the schedule."""
    ttl, margin = 3600.0, 0.2
    session = make_session(
        token_ttl=ttl, renew_margin=margin, backoff=BackoffPolicy(1.0, 30.0, 0.5), twin=False
    )
    rng = random.Random(5)
    end = 48 * 3600.0
    now = 0.0
    renewals = 0
    issued_at = None
    while now < end:
        if session.should_connect(now):
            session.connect_started(now)
            issued_at = now
            now += rng.uniform(0.05, 2.0)  # TCP + TLS + CONNACK
            session.connection_made(now)
            assert session.renew_at == issued_at + ttl * (1 - margin)
            continue
        deadline = session.next_deadline()
        assert deadline is not None
        if drops and session.state is S.CONNECTED and rng.random() < 0.2:
            # an unexpected drop somewhere before the renewal point
            now = rng.uniform(now, deadline)
            session.connection_lost(now, "network")
            continue
        assert deadline >= now
        now = deadline
        assert issued_at is not None
        events = session.on_timer(now)
        if session.state is S.CONNECTED:
            assert session.token_expiry_due(now)
            assert events == [TokenRenewalDue(issued_at + ttl * (1 - margin))]
            assert now < issued_at + ttl  # never after expiry
            assert session.on_timer(now) == []  # said once
            session.connection_lost(now, "renewal")
            renewals += 1
    assert renewals >= (40 if drops else 59)
    if not drops:
        assert renewals <= 60


def test_renewal_point_not_due_before_time() -> None:
    session = make_session(token_ttl=100.0, renew_margin=0.25, twin=False)
    session.connect_started(0.0)
    session.connection_made(1.0)
    assert session.renew_at == 75.0
    assert not session.token_expiry_due(74.9) and session.on_timer(74.9) == []
    assert session.token_expiry_due(75.0)
    assert session.next_deadline() is not None


def test_renewal_only_while_connected() -> None:
    session = make_session(token_ttl=10.0)
    session.connect_started(0.0)
    assert not session.token_expiry_due(100.0)  # still connecting
    session.connect_failed(1.0, None)
    assert session.renew_at is None and not session.token_expiry_due(100.0)


# -- random driving ------------------------------------------------------------------------------

OPS = [
    "connect",
    "made",
    "failed",
    "failed_auth",
    "lost",
    "lost_auth",
    "send",
    "pump",
    "ack",
    "get",
    "answer",
    "desired",
    "method",
    "timer",
]


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(st.tuples(st.sampled_from(OPS), st.floats(0, 40)), max_size=50),
    seed=st.integers(0, 2**16),
)
def test_random_driving_keeps_invariants(ops: list[tuple[str, float]], seed: int) -> None:
    """Whatever the order of inputs: only our errors, counters add up, and after on_timer() and
    outgoing() the next deadline is in the future unless a connect is due (no busy loop)."""
    session = make_session(
        rng=random.Random(seed),
        max_auth_failures=4,
        request_timeout=15.0,
        queue=QueueLimits(max_messages=5, max_age=100.0, overflow=OverflowPolicy.DROP_OLDEST),
    )
    link = Link(session)
    now = 0.0
    version = 0
    for op, dt in ops:
        now += dt
        try:
            if op == "connect":
                session.connect_started(now)
            elif op == "made":
                session.connection_made(now, False)
                link.published = []
            elif op == "failed":
                session.connect_failed(now, None)
            elif op == "failed_auth":
                session.connect_failed(now, 5)
            elif op == "lost":
                session.connection_lost(now, "network")
            elif op == "lost_auth":
                session.connection_lost(now, "auth")
            elif op == "send":
                session.send_message(Message(b"x"), 1, now)
            elif op == "pump":
                link.pump(now)
            elif op == "ack":
                link.ack_all()
            elif op == "get":
                session.get_twin(now)
            elif op == "answer":
                for _, publish in link.published:
                    if publish.topic.startswith("$iothub/twin/"):
                        rid = publish.topic.rsplit("=", 1)[1]
                        status = random.Random(rid).choice([200, 204, 429, 500, 400])
                        session.receive(f"$iothub/twin/res/{status}/?$rid={rid}", b"{}", now)
            elif op == "desired":
                version += 1
                session.receive(
                    f"$iothub/twin/PATCH/properties/desired/?$version={version}", b"{}", now
                )
            elif op == "method":
                session.receive("$iothub/methods/POST/m/?$rid=1", b"", now)
            else:
                session.on_timer(now)
        except (HubStateError, QueueFullError):
            pass
        session.on_timer(now)
        session.outgoing(now)
        deadline = session.next_deadline()
        if deadline is not None and deadline <= now:
            assert session.should_connect(now)
        stats = session.stats
        done = (
            stats.acknowledged
            + stats.delivered_qos0
            + stats.dropped_overflow
            + stats.dropped_expired
            + stats.lost_qos0
        )
        assert stats.accepted == done + len(session.pending())
        assert len(session.pending()) <= 5
