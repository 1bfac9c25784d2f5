"""Twin requests (GET, reported PATCH): ``$rid`` correlation, retries, time-outs, reconnects.

Rules:

* Each request gets a ``$rid`` (a counter) that it keeps across retries and reconnects.
* An answer with 429 or 5xx is retried after an exponential back-off with jitter, up to
  ``RetryPolicy.max_retries`` times; then, or on any other error status, the request fails with
  :class:`HubRequestError` carrying the status.
* Every attempt has ``timeout`` seconds to be answered. The clock of an attempt starts when it is
  published, or when it starts waiting (offline, or for a retry): a request never waits longer
  than ``timeout`` for a connection either. An expired attempt fails with :class:`HubTimeout`.
* A request in flight when the connection drops is sent again once after the reconnect; if the
  connection drops a second time while it is in flight, it fails with ``HubRequestError(0, ..)``.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from .backoff import SHARED_RNG, BackoffPolicy
from .errors import HubError, HubRequestError, HubStateError, HubTimeout


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of twin requests answered 429 or 5xx."""

    max_retries: int = 5
    backoff: BackoffPolicy = field(default_factory=lambda: BackoffPolicy(1.0, 30.0, 0.5))


class RequestState(enum.Enum):
    """Where a request is."""

    WAITING = "waiting"  # to be published (offline, or waiting out a retry back-off)
    IN_FLIGHT = "in_flight"  # published, answer awaited
    DONE = "done"


@dataclass(eq=False)
class Request:
    """A twin request. ``internal`` marks the GET the session issues itself after a connect."""

    kind: Literal["get", "patch"]
    rid: str
    topic: str
    payload: bytes
    created_at: float
    internal: bool = False
    patch: dict[str, Any] | None = None
    state: RequestState = RequestState.WAITING
    attempts: int = 0
    retries: int = 0
    carried_over: bool = False
    send_at: float = 0.0
    deadline: float = 0.0

    @property
    def done(self) -> bool:
        """True once answered or failed."""
        return self.state is RequestState.DONE


class RequestTracker:
    """Outstanding twin requests, by ``$rid``."""

    def __init__(
        self,
        timeout: float = 30.0,
        policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if not timeout > 0:
            raise HubStateError("the request time-out must be positive")
        self.timeout = timeout
        self.policy = policy or RetryPolicy()
        self._rng = rng if rng is not None else SHARED_RNG
        self._requests: dict[str, Request] = {}
        self._counter = 0

    def next_rid(self) -> str:
        """A fresh ``$rid``."""
        self._counter += 1
        return str(self._counter)

    def add(self, request: Request, now: float) -> Request:
        """Track ``request`` (made with :meth:`next_rid`); it waits to be published."""
        request.state = RequestState.WAITING
        request.send_at = now
        request.deadline = now + self.timeout
        self._requests[request.rid] = request
        return request

    def outstanding(self) -> list[Request]:
        """Requests not yet done, oldest first."""
        return list(self._requests.values())

    def find(self, rid: str) -> Request | None:
        """The in-flight request with this ``$rid``, if any."""
        request = self._requests.get(rid)
        return request if request is not None and request.state is RequestState.IN_FLIGHT else None

    def take(self, now: float) -> list[Request]:
        """Requests to publish now (call only while connected); they become in flight."""
        out: list[Request] = []
        for request in self._requests.values():
            if request.state is RequestState.WAITING and request.send_at <= now:
                request.state = RequestState.IN_FLIGHT
                request.attempts += 1
                request.deadline = now + self.timeout
                out.append(request)
        return out

    def complete(self, request: Request) -> None:
        """The request got its answer."""
        request.state = RequestState.DONE
        self._requests.pop(request.rid, None)

    def retry_or_fail(
        self, request: Request, now: float, status: int, message: str
    ) -> HubError | None:
        """After a 429/5xx answer: schedule a retry (None) or give up (the error to report)."""
        if request.retries >= self.policy.max_retries:
            self.complete(request)
            return HubRequestError(status, f"{message} (after {request.retries} retries)")
        delay = self.policy.backoff.delay(request.retries, self._rng)
        request.retries += 1
        request.state = RequestState.WAITING
        request.send_at = now + delay
        request.deadline = request.send_at + self.timeout
        return None

    def fail(self, request: Request) -> None:
        """Give up on ``request`` (the caller reports why)."""
        self.complete(request)

    def connection_lost(self, now: float) -> list[tuple[Request, HubError]]:
        """In-flight requests wait for the next connection, once; the second time they fail."""
        failed: list[tuple[Request, HubError]] = []
        for request in list(self._requests.values()):
            if request.state is not RequestState.IN_FLIGHT:
                continue
            if request.carried_over:
                self.complete(request)
                failed.append(
                    (request, HubRequestError(0, "the connection was lost twice while in flight"))
                )
            else:
                request.carried_over = True
                request.state = RequestState.WAITING
                request.send_at = now
                request.deadline = now + self.timeout
        return failed

    def expire(self, now: float) -> list[tuple[Request, HubError]]:
        """Requests whose attempt ran out of time."""
        failed: list[tuple[Request, HubError]] = []
        for request in list(self._requests.values()):
            if request.deadline <= now:
                self.complete(request)
                what = (
                    "was not answered"
                    if request.state is RequestState.IN_FLIGHT
                    else "could not be sent"
                )
                failed.append(
                    (request, HubTimeout(f"twin {request.kind} {request.rid} {what} in time"))
                )
        return failed

    def fail_all(self, error: HubError) -> list[tuple[Request, HubError]]:
        """Fail every outstanding request with ``error``."""
        failed = [(request, error) for request in self._requests.values()]
        for request, _ in failed:
            request.state = RequestState.DONE
        self._requests.clear()
        return failed

    def next_deadline(self, connected: bool) -> float | None:
        """The earliest time-out, and while connected the earliest retry to publish."""
        times: list[float] = []
        for request in self._requests.values():
            times.append(request.deadline)
            if connected and request.state is RequestState.WAITING:
                times.append(request.send_at)
        return min(times) if times else None
