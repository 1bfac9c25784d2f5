"""Tests of hub_proto.backoff: growth, cap and jitter with a seeded random source."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub_proto import Backoff, BackoffPolicy, HubStateError


def test_exact_growth_and_cap_without_jitter() -> None:
    backoff = Backoff(BackoffPolicy(base=1.0, cap=60.0, jitter=0.0), random.Random(1))
    assert [backoff.next_delay() for _ in range(9)] == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    backoff.reset()
    assert backoff.next_delay() == 1.0


def test_seeded_jitter_is_reproducible_and_bounded() -> None:
    policy = BackoffPolicy(base=0.5, cap=30.0, jitter=0.5)
    first = Backoff(policy, random.Random(42))
    second = Backoff(policy, random.Random(42))
    delays = [first.next_delay() for _ in range(20)]
    assert delays == [second.next_delay() for _ in range(20)]
    for attempt, delay in enumerate(delays):
        ceiling = policy.ceiling(attempt)
        assert ceiling * 0.5 <= delay <= ceiling
    assert len(set(delays)) > 10  # jitter actually varies the delays
    assert max(delays) <= 30.0


def test_full_jitter_spreads_a_fleet() -> None:
    policy = BackoffPolicy(base=1.0, cap=8.0, jitter=1.0)
    rng = random.Random(7)
    delays = [policy.delay(3, rng) for _ in range(200)]
    assert min(delays) < 2.0 and max(delays) > 6.0
    assert all(0.0 <= d <= 8.0 for d in delays)


@settings(max_examples=100, deadline=None)
@given(
    base=st.floats(0, 100),
    cap=st.floats(0, 1000),
    jitter=st.floats(0, 1),
    attempt=st.integers(0, 10_000),
    seed=st.integers(0, 2**32),
)
def test_delay_always_within_cap(
    base: float, cap: float, jitter: float, attempt: int, seed: int
) -> None:
    policy = BackoffPolicy(base, cap, jitter)
    delay = policy.delay(attempt, random.Random(seed))
    assert 0.0 <= delay <= min(cap, base * 2 ** min(attempt, 62)) + 1e-9


@pytest.mark.parametrize(
    ("base", "cap", "jitter"), [(-1, 1, 0), (1, -1, 0), (1, 1, -0.1), (1, 1, 1.1)]
)
def test_bad_policy(base: float, cap: float, jitter: float) -> None:
    with pytest.raises(HubStateError):
        BackoffPolicy(base, cap, jitter)
