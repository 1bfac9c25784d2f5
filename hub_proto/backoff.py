"""Exponential back-off with jitter, with an injectable random source (for reproducible tests)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .errors import HubStateError

#: Exponents above this are capped anyway; stops ``2 ** attempt`` from growing without bound.
_MAX_EXPONENT = 62

#: The jitter source shared by every back-off, request tracker and session not given its own.
SHARED_RNG = random.Random()


@dataclass(frozen=True)
class BackoffPolicy:
    """Delay before retry ``n`` (0-based): ``min(cap, base * 2**n)``, then shortened by up to
    ``jitter`` of itself at random, so a fleet that lost its hub at once does not come back at
    once. ``jitter`` = 0 gives exact delays; 1 gives "full jitter" (anything in [0, delay])."""

    base: float = 1.0
    cap: float = 60.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (self.base >= 0 and self.cap >= 0 and 0.0 <= self.jitter <= 1.0):
            raise HubStateError("back-off needs base >= 0, cap >= 0 and 0 <= jitter <= 1")

    def ceiling(self, attempt: int) -> float:
        """The delay for ``attempt`` before jitter."""
        return float(min(self.cap, self.base * 2 ** min(max(0, attempt), _MAX_EXPONENT)))

    def delay(self, attempt: int, rng: random.Random) -> float:
        """The jittered delay for ``attempt``: uniform in ``[ceiling * (1 - jitter), ceiling]``."""
        ceiling = self.ceiling(attempt)
        return ceiling - rng.uniform(0.0, ceiling * self.jitter) if self.jitter else ceiling


class Backoff:
    """A back-off counter: each :meth:`next_delay` is longer, up to the cap, until :meth:`reset`."""

    def __init__(
        self, policy: BackoffPolicy | None = None, rng: random.Random | None = None
    ) -> None:
        self.policy = policy or BackoffPolicy()
        self._rng = rng if rng is not None else SHARED_RNG
        self.attempt = 0

    def next_delay(self) -> float:
        """The delay before the next try; counts one more attempt."""
        delay = self.policy.delay(self.attempt, self._rng)
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the base delay (after a success)."""
        self.attempt = 0
