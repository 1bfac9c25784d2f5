"""The registration state machine: a device's side of DPS provisioning, with no I/O.

Drive it with :meth:`Registration.start`, :meth:`~Registration.receive` and
:meth:`~Registration.on_timer`; send what :meth:`~Registration.outgoing` returns; wake up at
:meth:`~Registration.next_deadline`. Time is always an argument (seconds, any monotonic origin).
It ends in an :class:`Assignment` or a typed :class:`~dps_proto.errors.DpsError`.
"""

from __future__ import annotations

import enum
import json
import logging
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from .errors import (
    DpsError,
    DpsParseError,
    DpsServiceError,
    DpsStateError,
    ProvisioningTimeout,
    RegistrationDisabled,
    RegistrationFailed,
)
from .payloads import (
    ErrorBody,
    OperationStatus,
    RegisterRequest,
    RegistrationState,
    build_register_payload,
    parse_response_payload,
)
from .topics import RESPONSE_PREFIX, parse_response_topic, poll_topic, register_topic

log = logging.getLogger(__name__)

#: Seconds past the poll window before the next poll, so no closed window holds too many.
_WINDOW_MARGIN = 0.01


@dataclass(frozen=True)
class OutgoingPublish:
    """A request the transport must send: over MQTT, ``payload`` published (QoS 1) to ``topic``;
    over HTTPS, a PUT register or a GET of ``operation_id`` (``kind`` says which)."""

    topic: str
    payload: bytes
    kind: str = "register"
    rid: str = ""
    operation_id: str | None = None


@dataclass(frozen=True)
class TpmChallenge:
    """DPS's answer to an unauthenticated TPM register: the activation blob to import."""

    authentication_key: str
    key_name: str | None


@dataclass(frozen=True)
class Assignment:
    """Where DPS put the device: the hub to connect to and the device id to use there."""

    registration_id: str
    assigned_hub: str
    device_id: str
    substatus: str | None = None
    payload: Any = None
    tpm_authentication_key: str | None = None
    issued_certificate_chain: tuple[str, ...] | None = None
    state: RegistrationState = field(default_factory=RegistrationState, repr=False)

    def to_json(self) -> dict[str, Any]:
        """A JSON-friendly view, as ``dps-mqtt provision`` prints it."""
        out: dict[str, Any] = {
            "registrationId": self.registration_id,
            "assignedHub": self.assigned_hub,
            "deviceId": self.device_id,
            "substatus": self.substatus,
            "payload": self.payload,
        }
        if self.issued_certificate_chain is not None:
            out["issuedCertificateChain"] = list(self.issued_certificate_chain)
        return out


@dataclass(frozen=True)
class RetryPolicy:
    """How patient the device is. Defaults follow Azure's guidance and the SDKs' behaviour."""

    #: Wait between polls when the service gives no ``retry-after``.
    default_poll_interval: float = 2.0
    #: A ``retry-after`` above this is capped (the C SDK ignores values over 300 s).
    max_retry_after: float = 300.0
    #: Exponential back-off after 429/5xx/time-outs without ``retry-after``: base and cap.
    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    #: Consecutive throttles, server errors or time-outs before giving up.
    max_retries: int = 10
    #: How long to wait for the answer to one request before sending it again.
    response_timeout: float = 30.0
    #: At most ``polls_per_window`` polls in any ``poll_window`` seconds (Azure's throttle).
    polls_per_window: int = 5
    poll_window: float = 10.0


class Phase(enum.Enum):
    """Where the registration is."""

    IDLE = "idle"
    REQUESTING = "requesting"  # a request is out, waiting for its answer
    WAITING = "waiting"  # waiting for a timer before the next request
    CHALLENGED = "challenged"  # TPM: waiting for the caller to import the activation blob
    ASSIGNED = "assigned"
    FAILED = "failed"


class Registration:
    """Sans-IO DPS registration for one device."""

    def __init__(
        self,
        request: RegisterRequest,
        *,
        policy: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.request = request
        self.policy = policy or RetryPolicy()
        self._rng = rng or random.Random()
        self._phase = Phase.IDLE
        self._outgoing: list[OutgoingPublish] = []
        self._deadline: float | None = None
        self._next_kind = "register"  # what to send when the timer fires
        self._in_flight_kind = "register"
        self._rid: str | None = None
        self._rid_counter = 0
        self._operation_id: str | None = None
        self._retries = 0
        self._poll_times: deque[float] = deque(maxlen=max(1, self.policy.polls_per_window))
        self._assignment: Assignment | None = None
        self._error: DpsError | None = None
        self._challenge: TpmChallenge | None = None
        self._challenged = False

    # -- public view -------------------------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """The current phase."""
        return self._phase

    @property
    def done(self) -> bool:
        """True once an assignment or a final error is known."""
        return self._phase in (Phase.ASSIGNED, Phase.FAILED)

    @property
    def assignment(self) -> Assignment | None:
        """The assignment, once assigned."""
        return self._assignment

    @property
    def error(self) -> DpsError | None:
        """The final error, once failed."""
        return self._error

    @property
    def operation_id(self) -> str | None:
        """The operation id DPS gave, if any yet."""
        return self._operation_id

    @property
    def in_flight_rid(self) -> str | None:
        """The ``$rid`` of the request awaiting an answer."""
        return self._rid if self._phase is Phase.REQUESTING else None

    def result(self) -> Assignment:
        """The assignment; raises the final error, or :class:`DpsStateError` if not done."""
        if self._assignment is not None:
            return self._assignment
        if self._error is not None:
            raise self._error
        raise DpsStateError("the registration has not finished")

    def outgoing(self) -> list[OutgoingPublish]:
        """Publishes to send now (drained by the call)."""
        out, self._outgoing = self._outgoing, []
        return out

    def next_deadline(self) -> float | None:
        """When :meth:`on_timer` must be called next, or None."""
        return None if self.done else self._deadline

    # -- inputs ------------------------------------------------------------------------------

    def start(self, now: float) -> None:
        """Send the register request."""
        if self._phase is not Phase.IDLE:
            raise DpsStateError(f"start() in phase {self._phase.value}")
        self._send("register", now)

    def retry_now(self, now: float) -> None:
        """Resend the outstanding request at once, e.g. after the transport reconnected."""
        if self.done or self._phase in (Phase.IDLE, Phase.CHALLENGED):
            raise DpsStateError(f"retry_now() in phase {self._phase.value}")
        kind = self._in_flight_kind if self._phase is Phase.REQUESTING else self._next_kind
        self._send(kind, now)

    def on_timer(self, now: float) -> None:
        """Handle a timer: send the next request, or retry one that got no answer in time."""
        if self.done or self._phase is Phase.IDLE or self._deadline is None:
            return
        if now < self._deadline:
            return
        if self._phase is Phase.REQUESTING:
            log.info(
                "no answer to %s within %.0f s; retrying",
                self._in_flight_kind,
                self.policy.response_timeout,
            )
            self._retry_later(self._in_flight_kind, None, now, "time-out", 0)
            return
        self._send(self._next_kind, now)

    def receive(self, topic: str, payload: bytes, now: float) -> bool:
        """Feed an MQTT message the transport received; True if it was the awaited answer."""
        if not isinstance(topic, str) or not topic.startswith(RESPONSE_PREFIX):
            return False
        if self._phase is not Phase.REQUESTING:
            log.debug("ignoring DPS response in phase %s", self._phase.value)
            return False
        try:
            parsed = parse_response_topic(topic)
        except DpsParseError as exc:
            self._fail(exc)
            return True
        if parsed.rid is None:
            log.debug("ignoring DPS response without $rid")
            return False
        return self.receive_response(parsed.rid, parsed.status, parsed.retry_after, payload, now)

    def receive_response(
        self, rid: str, status: int, retry_after: int | None, payload: bytes, now: float
    ) -> bool:
        """Feed an answer in transport-neutral form (HTTPS gives status and Retry-After directly).

        True if it answered the request in flight (``rid``); stale answers are ignored.
        """
        if self._phase is not Phase.REQUESTING or rid != self._rid:
            log.debug("ignoring DPS response for rid %r (waiting for %r)", rid, self.in_flight_rid)
            return False
        if status in (200, 202):
            self._on_status(status, payload, retry_after, now)
        elif status == 429 or status >= 500:
            self._retry_later(self._in_flight_kind, retry_after, now, str(status), status, payload)
        elif status == 401 and self._on_tpm_challenge(payload):
            pass
        else:
            self._fail(_service_error(status, payload))
        return True

    @property
    def challenge(self) -> TpmChallenge | None:
        """The TPM challenge to import, while the phase is :attr:`Phase.CHALLENGED`."""
        return self._challenge if self._phase is Phase.CHALLENGED else None

    def challenge_answered(self, now: float) -> None:
        """The activation blob is imported: register again, now with a TPM-signed SAS token."""
        if self._phase is not Phase.CHALLENGED:
            raise DpsStateError(f"challenge_answered() in phase {self._phase.value}")
        self._challenged = True
        self._send("register", now)

    def _on_tpm_challenge(self, payload: bytes) -> bool:
        """A 401 to an unauthenticated TPM register carries the challenge; take it once."""
        if self.request.tpm is None or self._in_flight_kind != "register" or self._challenged:
            return False
        try:
            body = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            return False
        key = body.get("authenticationKey") if isinstance(body, dict) else None
        if not isinstance(key, str) or not key:
            return False
        key_name = body.get("keyName")
        self._challenge = TpmChallenge(key, key_name if isinstance(key_name, str) else None)
        self._phase = Phase.CHALLENGED
        self._deadline = None
        log.info("TPM challenge received for %r", self.request.registration_id)
        return True

    # -- internals ---------------------------------------------------------------------------

    def _on_status(self, status: int, payload: bytes, retry_after: int | None, now: float) -> None:
        try:
            body = parse_response_payload(payload)
        except DpsParseError as exc:
            self._fail(exc)
            return
        if isinstance(body, ErrorBody):
            self._fail(_service_error(status, payload))
            return
        if body.status == "assigned":
            self._assign(body)
        elif body.status == "failed":
            state = body.registration_state or RegistrationState()
            self._fail(
                RegistrationFailed(
                    self.request.registration_id, state.error_code, state.error_message
                )
            )
        elif body.status == "disabled":
            self._fail(RegistrationDisabled(self.request.registration_id))
        else:
            if body.operation_id:
                self._operation_id = body.operation_id
            if self._operation_id is None:
                # Registering again is a retry: it counts, and waits at least the poll interval.
                log.info("status %r without operationId: registering again", body.status)
                self._retries += 1
                if self._retries > self.policy.max_retries:
                    self._fail(DpsServiceError(status, "DPS keeps answering without operationId"))
                    return
                delay = max(self._retry_after(retry_after, 0.0), self.policy.default_poll_interval)
                self._wait("register", delay, now)
                return
            self._retries = 0
            self._wait(
                "poll", self._retry_after(retry_after, self.policy.default_poll_interval), now
            )

    def _assign(self, body: OperationStatus) -> None:
        state = body.registration_state
        if state is None or not state.assigned_hub or not state.device_id:
            self._fail(DpsParseError("status 'assigned' without assignedHub and deviceId"))
            return
        self._assignment = Assignment(
            registration_id=state.registration_id or self.request.registration_id,
            assigned_hub=state.assigned_hub,
            device_id=state.device_id,
            substatus=state.substatus,
            payload=state.payload,
            tpm_authentication_key=state.tpm_authentication_key,
            issued_certificate_chain=state.issued_certificate_chain,
            state=state,
        )
        self._phase = Phase.ASSIGNED
        self._deadline = None
        log.info("assigned to %s as %s", state.assigned_hub, state.device_id)

    def _retry_later(
        self,
        kind: str,
        retry_after: int | None,
        now: float,
        why: str,
        status: int,
        payload: bytes = b"",
    ) -> None:
        self._retries += 1
        if self._retries > self.policy.max_retries:
            if status:
                self._fail(_service_error(status, payload))
            else:
                self._fail(
                    ProvisioningTimeout(
                        f"DPS did not answer {self.policy.max_retries + 1} requests"
                    )
                )
            return
        exponent = min(self._retries - 1, 1023)  # 2.0 ** 1024 would overflow a float
        backoff = min(self.policy.backoff_cap, self.policy.backoff_base * 2.0**exponent)
        jittered = backoff / 2 + self._rng.uniform(0, backoff / 2)
        delay = self._retry_after(retry_after, jittered)
        log.info("%s answered %s; retry %d in %.1f s", kind, why, self._retries, delay)
        self._wait(kind, delay, now)

    def _retry_after(self, retry_after: int | None, fallback: float) -> float:
        if retry_after is None:
            return fallback
        return float(min(retry_after, self.policy.max_retry_after))

    def _wait(self, kind: str, delay: float, now: float) -> None:
        self._phase = Phase.WAITING
        self._next_kind = kind
        self._deadline = now + max(0.0, delay)

    def _send(self, kind: str, now: float) -> None:
        if kind == "poll":
            window_start = self._poll_times[0] if self._poll_times else None
            full = len(self._poll_times) == self._poll_times.maxlen
            # The window is closed at both ends: the 6th poll waits until just after it.
            window_end = (window_start or 0.0) + self.policy.poll_window
            if full and window_start is not None and now <= window_end:
                self._wait("poll", window_end + _WINDOW_MARGIN - now, now)
                return
        self._rid_counter += 1
        self._rid = str(self._rid_counter)
        if kind == "poll" and self._operation_id is not None:
            self._poll_times.append(now)
            message = OutgoingPublish(
                poll_topic(self._rid, self._operation_id),
                b"",
                kind="poll",
                rid=self._rid,
                operation_id=self._operation_id,
            )
        else:
            kind = "register"
            message = OutgoingPublish(
                register_topic(self._rid),
                build_register_payload(self.request),
                kind="register",
                rid=self._rid,
            )
        self._outgoing.append(message)
        self._in_flight_kind = kind
        self._phase = Phase.REQUESTING
        self._deadline = now + self.policy.response_timeout

    def _fail(self, error: DpsError) -> None:
        self._error = error
        self._phase = Phase.FAILED
        self._deadline = None
        log.warning("registration of %r failed: %s", self.request.registration_id, error)


def _service_error(status: int, payload: bytes) -> DpsServiceError:
    """Turn an error status and body into a :class:`DpsServiceError` with what DPS said."""
    try:
        body = parse_response_payload(payload)
    except DpsParseError:
        return DpsServiceError(status, "no readable error body")
    if isinstance(body, ErrorBody):
        return DpsServiceError(
            status,
            body.message or "no message",
            error_code=body.error_code,
            tracking_id=body.tracking_id,
        )
    return DpsServiceError(
        status, f"unexpected status {status} with operation status {body.status!r}"
    )
