"""How the emulated DPS picks a hub: linked hubs with weights and latencies, Azure's allocation
policies (``hashed``, ``geoLatency``, ``static``, ``custom``) and the custom allocation webhook.

The choice functions are pure (no store, no clock). The webhook is split the sans-IO way:
:func:`build_allocation_request` makes Azure's ``AllocationRequest``, :func:`call_webhook` is the
one blocking HTTP call (run it in a worker thread, never on the event loop), and
:func:`interpret_webhook` turns what came back into a hub choice or Azure's failure
(``errorCode`` 400207). :class:`WebhookRunner` runs the calls of a :class:`~emulator.dps_service.
DpsService` in a thread pool and feeds the outcomes back on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import http.client
import json
import logging
import math
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Union
from urllib.parse import urlsplit

from .errors import ValidationError
from .models import (
    EnrollmentGroup,
    IndividualEnrollment,
    validate_host_name,
    validate_initial_twin,
)

__all__ = [
    "DEFAULT_WEBHOOK_TIMEOUT",
    "ERROR_CUSTOM_ALLOCATION_FAILED",
    "MAX_ALLOCATION_WEIGHT",
    "MAX_LATENCY_MS",
    "SERVICE_POLICIES",
    "AllocationCall",
    "AllocationDecision",
    "LinkedHub",
    "LinkedHubRegistry",
    "WebhookOutcome",
    "WebhookRunner",
    "build_allocation_request",
    "call_webhook",
    "candidate_hubs",
    "choose_geo_latency",
    "choose_hashed",
    "effective_policy",
    "interpret_webhook",
    "name_covered",
    "parse_hub_settings",
    "static_hub",
    "validate_allocation_weight",
    "validate_latency",
]

log = logging.getLogger(__name__)

#: Azure's error code for a failed custom allocation ("Custom allocation failed with status
#: code: 400"); the emulator uses it for every webhook failure.
ERROR_CUSTOM_ALLOCATION_FAILED = 400207
#: Seconds DPS waits for the webhook's answer (configurable: ``DpsConfig.webhook_timeout``).
DEFAULT_WEBHOOK_TIMEOUT = 5.0
#: ``allocationWeight`` range; 0 keeps a hub out of ``hashed`` and ``geoLatency`` choices.
MAX_ALLOCATION_WEIGHT = 1000
#: Largest ``latencyMs`` accepted (ten minutes: anything above is a typo).
MAX_LATENCY_MS = 600_000.0
#: Largest webhook answer read (an initial twin is at most 40 KB; payloads are small).
MAX_WEBHOOK_RESPONSE = 256 * 1024
#: Policies a whole DPS instance may default to (``static`` and ``custom`` need per-enrollment
#: settings).
SERVICE_POLICIES = ("hashed", "geoLatency")
#: Nesting limit of a webhook payload (the registration record's limit).
_MAX_PAYLOAD_DEPTH = 64

if TYPE_CHECKING:
    from .store import Store

_Enrollment = Union[IndividualEnrollment, EnrollmentGroup]


# ---------------------------------------------------------------------------- linked hubs


@dataclass(frozen=True)
class LinkedHub:
    """An IoT hub linked to DPS: its host name, ``allocationWeight`` and (for ``geoLatency``)
    the latency DPS should assume to it (``None``: unknown, ranked after every known one)."""

    name: str
    allocation_weight: int = 1
    latency_ms: float | None = None

    def to_json(self) -> dict[str, Any]:
        """``{"name", "allocationWeight", "latencyMs"}`` (``latencyMs`` null when unknown)."""
        return {
            "name": self.name,
            "allocationWeight": self.allocation_weight,
            "latencyMs": self.latency_ms,
        }


def validate_allocation_weight(value: object, field: str = "allocationWeight") -> int:
    """An integer in 0..1000."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"{field} must be a whole number from 0 to {MAX_ALLOCATION_WEIGHT}")
    if not 0 <= value <= MAX_ALLOCATION_WEIGHT:
        raise ValidationError(f"{field} must be from 0 to {MAX_ALLOCATION_WEIGHT}; got {value}")
    return value


def validate_latency(value: object, field: str = "latencyMs") -> float | None:
    """``None`` or a finite number of milliseconds in 0..600000."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"{field} must be a number of milliseconds or null")
    latency = float(value)
    if not math.isfinite(latency) or not 0.0 <= latency <= MAX_LATENCY_MS:
        raise ValidationError(f"{field} must be from 0 to {MAX_LATENCY_MS:g} milliseconds")
    return latency


def parse_hub_settings(name: object, body: object) -> LinkedHub:
    """A linked hub from a service API body ``{"allocationWeight": int, "latencyMs": number}``
    (both optional: weight 1, latency unknown); :class:`ValidationError` names the bad field."""
    hub = validate_host_name(name, "hub name")
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        raise ValidationError("the body must be a JSON object")
    extra = sorted(str(k) for k in body if k not in ("name", "allocationWeight", "latencyMs"))
    if extra:
        raise ValidationError(
            f"unknown field {extra[0]!r}; a hub takes allocationWeight and latencyMs"
        )
    named = body.get("name")
    if named is not None and (not isinstance(named, str) or named.lower() != hub):
        raise ValidationError("name in the body does not match the hub in the path")
    weight = body.get("allocationWeight")
    return LinkedHub(
        name=hub,
        allocation_weight=1 if weight is None else validate_allocation_weight(weight),
        latency_ms=validate_latency(body.get("latencyMs")),
    )


def name_covered(name: str, dns_names: Sequence[str]) -> bool:
    """Whether a certificate with these DNS names (``*.example.net`` wildcards included) is valid
    for host ``name`` (a ``:port`` suffix is ignored)."""
    host = name.partition(":")[0].lower().rstrip(".")
    for pattern in dns_names:
        pattern = pattern.lower().rstrip(".")
        if pattern == host:
            return True
        if pattern.startswith("*."):
            label, _, rest = host.partition(".")
            if label and rest == pattern[2:]:
                return True
    return False


# ---------------------------------------------------------------------------- policies


def effective_policy(enrollment: _Enrollment, default: str = "hashed") -> str:
    """The enrollment's ``allocationPolicy``; without one, ``static`` when it names a hub
    (``iotHubHostName``), else the service's default."""
    if enrollment.allocation_policy:
        return enrollment.allocation_policy
    if enrollment.iot_hub_host_name:
        return "static"
    return default


def candidate_hubs(enrollment: _Enrollment, linked: Sequence[LinkedHub]) -> list[LinkedHub]:
    """The linked hubs this enrollment may use (its ``iotHubs`` when it lists any), by name."""
    wanted = set(enrollment.iot_hubs) if enrollment.iot_hubs else None
    return sorted(
        (hub for hub in linked if wanted is None or hub.name in wanted), key=lambda h: h.name
    )


def static_hub(enrollment: _Enrollment) -> str | None:
    """The hub a ``static`` enrollment names: ``iotHubHostName``, or its only ``iotHubs`` entry."""
    if enrollment.iot_hub_host_name:
        return enrollment.iot_hub_host_name
    if enrollment.iot_hubs and len(enrollment.iot_hubs) == 1:
        return enrollment.iot_hubs[0]
    return None


def _hash(registration_id: str) -> int:
    digest = hashlib.sha256(registration_id.lower().encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def choose_hashed(registration_id: str, hubs: Sequence[LinkedHub]) -> str | None:
    """Evenly weighted distribution: a deterministic hash of the registration id picks a hub,
    each with a share proportional to its ``allocationWeight`` (weight 0: never)."""
    weighted = sorted((h for h in hubs if h.allocation_weight > 0), key=lambda h: h.name)
    total = sum(h.allocation_weight for h in weighted)
    if total == 0:
        return None
    point = _hash(registration_id) % total
    for hub in weighted:
        if point < hub.allocation_weight:
            return hub.name
        point -= hub.allocation_weight
    raise AssertionError("unreachable: the point lies inside the total weight")


def choose_geo_latency(registration_id: str, hubs: Sequence[LinkedHub]) -> str | None:
    """Lowest latency wins; ties (and hubs without a known latency, when none has one) are
    hashed. Hubs of weight 0 take no devices."""
    usable = [h for h in hubs if h.allocation_weight > 0]
    known = [h for h in usable if h.latency_ms is not None]
    if not known:
        return choose_hashed(registration_id, usable)
    best = min(h.latency_ms for h in known if h.latency_ms is not None)
    return choose_hashed(registration_id, [h for h in known if h.latency_ms == best])


# ---------------------------------------------------------------------------- custom webhook


@dataclass(frozen=True)
class AllocationCall:
    """A webhook call DPS waits for: POST ``body`` (an AllocationRequest) to ``url``."""

    operation_id: str
    url: str
    body: dict[str, Any]
    linked_hubs: tuple[str, ...]

    def encode(self) -> bytes:
        """The request body as UTF-8 JSON."""
        return json.dumps(self.body, separators=(",", ":")).encode("utf-8")


@dataclass(frozen=True)
class WebhookOutcome:
    """What the webhook did: an HTTP ``status`` and ``body``, or ``error`` (no answer)."""

    status: int | None
    body: bytes = b""
    error: str | None = None

    @classmethod
    def timed_out(cls, timeout: float) -> WebhookOutcome:
        """No complete answer within ``timeout`` seconds."""
        return cls(None, b"", f"the webhook did not answer within {timeout:g} s")


@dataclass(frozen=True)
class AllocationDecision:
    """The webhook's choice (``hub``, ``initial_twin``, ``payload``), or a failure
    (``error_code``, ``error_message``)."""

    hub: str | None = None
    initial_twin: dict[str, Any] | None = None
    payload: Any = None
    error_code: int | None = None
    error_message: str | None = None

    @classmethod
    def failed(cls, message: str) -> AllocationDecision:
        """A failed custom allocation (errorCode 400207)."""
        return cls(error_code=ERROR_CUSTOM_ALLOCATION_FAILED, error_message=message)


def _enrollment_for_webhook(enrollment: _Enrollment) -> dict[str, Any]:
    """The enrollment as Azure shows it to the webhook: attestation type only, never keys."""
    body = enrollment.to_json()
    body["attestation"] = {"type": enrollment.attestation.TYPE}
    return body


def build_allocation_request(
    enrollment: _Enrollment,
    *,
    registration_id: str,
    linked_hubs: Sequence[str],
    current_hub: str | None,
    current_device_id: str | None,
    payload: Any,
    attestation: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Azure's AllocationRequest: the enrollment, the device's runtime context, the hubs.

    ``attestation`` is what the context shows under the attestation type (``symmetricKey``,
    ``tpm``, ``x509``: e.g. an X.509 device's certificate info); empty when None.
    """
    context: dict[str, Any] = {"registrationId": registration_id}
    if current_hub is not None:
        context["currentIotHubHostName"] = current_hub
    if current_device_id is not None:
        context["currentDeviceId"] = current_device_id
    context[enrollment.attestation.TYPE] = dict(attestation or {})
    if payload is not None:
        context["payload"] = payload
    key = "enrollmentGroup" if isinstance(enrollment, EnrollmentGroup) else "individualEnrollment"
    return {
        key: _enrollment_for_webhook(enrollment),
        "deviceRuntimeContext": context,
        "linkedHubs": list(linked_hubs),
    }


def describe_url(url: str) -> str:
    """``scheme://host[:port]/path`` of a webhook URL, without its query (Azure Functions
    carry their key there), for logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def call_webhook(url: str, body: bytes, timeout: float) -> WebhookOutcome:
    """POST ``body`` to the webhook and read its answer (blocking; at most ``timeout`` seconds
    per socket operation). Never raises: failures come back as ``WebhookOutcome.error``."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(
            host, parts.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(host, parts.port, timeout=timeout)
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "Accept": "application/json",
        "User-Agent": "dps-mqtt-emulator",
    }
    try:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read(MAX_WEBHOOK_RESPONSE + 1)
        status = response.status
    except (socket.timeout, TimeoutError):
        return WebhookOutcome.timed_out(timeout)
    except ConnectionRefusedError:
        return WebhookOutcome(None, b"", "the webhook refused the connection")
    except (OSError, http.client.HTTPException) as exc:
        return WebhookOutcome(None, b"", f"cannot reach the webhook: {exc or type(exc).__name__}")
    finally:
        conn.close()
    if len(data) > MAX_WEBHOOK_RESPONSE:
        return WebhookOutcome(
            None, b"", f"the webhook answered more than {MAX_WEBHOOK_RESPONSE} bytes"
        )
    return WebhookOutcome(status, data)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _depth(value: object, limit: int) -> bool:
    """Whether ``value`` nests at most ``limit`` levels (iteratively: no recursion limit)."""
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            if level >= limit:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, level + 1) for child in children)
    return True


def interpret_webhook(outcome: WebhookOutcome, linked_hubs: Sequence[str]) -> AllocationDecision:
    """Read an AllocationResponse ``{iotHubHostName, initialTwin?, payload?}``; anything else
    (an error status, no answer, bad JSON, a hub that is not linked) is a failed allocation."""
    prefix = "Custom allocation failed"
    if outcome.error is not None:
        return AllocationDecision.failed(f"{prefix}: {outcome.error}")
    status = outcome.status
    if status is None or not 200 <= status <= 299:
        return AllocationDecision.failed(f"{prefix} with status code: {status}")
    try:
        data = json.loads(outcome.body.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return AllocationDecision.failed(f"{prefix}: the webhook's answer is not JSON")
    if not isinstance(data, dict):
        return AllocationDecision.failed(f"{prefix}: the webhook's answer is not a JSON object")
    hub_value = data.get("iotHubHostName")
    if not isinstance(hub_value, str) or not hub_value:
        return AllocationDecision.failed(f"{prefix}: the webhook's answer has no iotHubHostName")
    try:
        hub = validate_host_name(hub_value)
    except ValidationError:
        return AllocationDecision.failed(
            f"{prefix}: the webhook chose {hub_value[:100]!r}, which is not a host name"
        )
    if hub not in linked_hubs:
        return AllocationDecision.failed(
            f"{prefix}: the webhook chose IoT hub {hub!r}, which is not linked to this"
            f" enrollment (linked: {', '.join(linked_hubs) or 'none'})"
        )
    try:
        twin = validate_initial_twin(data.get("initialTwin"))
    except ValidationError as exc:
        return AllocationDecision.failed(f"{prefix}: the webhook's {exc}")
    payload = data.get("payload")
    if not _depth(payload, _MAX_PAYLOAD_DEPTH):
        return AllocationDecision.failed(
            f"{prefix}: the webhook's payload nests deeper than {_MAX_PAYLOAD_DEPTH} levels"
        )
    return AllocationDecision(hub=hub, initial_twin=twin, payload=payload)


# ---------------------------------------------------------------------------- runtime


class WebhookRunner:
    """Runs webhook calls in a small thread pool and hands each outcome back on the loop.

    ``complete(operation_id, outcome, now)`` is called on the event loop (DPS is not
    thread-safe); a call that overruns ``timeout`` (plus a second) is reported as timed out
    even if its thread is still stuck in a socket.
    """

    def __init__(
        self,
        complete: Callable[[str, WebhookOutcome, float], object],
        clock: Callable[[], float],
        *,
        max_workers: int = 8,
    ) -> None:
        self._complete = complete
        self._clock = clock
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=max_workers, thread_name_prefix="dps-webhook"
        )
        self._tasks: set[asyncio.Task[None]] = set()

    def submit(self, calls: Sequence[AllocationCall], timeout: float) -> None:
        """Start ``calls`` (from the event loop)."""
        loop = asyncio.get_running_loop()
        for call in calls:
            task = loop.create_task(self._run(call, timeout))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, call: AllocationCall, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        log.info(
            "custom allocation: calling %s for operation %s",
            describe_url(call.url),
            call.operation_id,
        )
        try:
            future = loop.run_in_executor(
                self._pool, call_webhook, call.url, call.encode(), timeout
            )
            outcome = await asyncio.wait_for(future, timeout + 1.0)
        except asyncio.TimeoutError:
            outcome = WebhookOutcome.timed_out(timeout)
        except RuntimeError as exc:  # the pool is shut down: the emulator is stopping
            log.info("custom allocation not run: %s", exc)
            return
        try:
            self._complete(call.operation_id, outcome, self._clock())
        except Exception:
            log.exception("custom allocation: cannot complete operation %s", call.operation_id)

    async def close(self) -> None:
        """Cancel what is running and release the threads (without waiting for stuck ones)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._pool.shutdown(wait=False, cancel_futures=True)


# ---------------------------------------------------------------------------- service API


class LinkedHubRegistry:
    """The service API's side of linked hubs: list them, link one or change its weight and
    latency, unlink one.

    Only names the emulator's server certificate covers may be linked at run time (devices must
    be able to verify the hub they are sent to); the certificate is issued at start for the
    configured and stored hubs, so other names need a restart with ``--hub NAME``.
    ``unlinked(name)`` is called after a hub is removed (to close its devices' connections).
    """

    def __init__(
        self,
        store: Store,
        certificate_names: Sequence[str],
        unlinked: Callable[[str], object] | None = None,
    ) -> None:
        self._store = store
        self._names = tuple(certificate_names)
        self._unlinked = unlinked

    def list_linked_hubs(self) -> list[dict[str, Any]]:
        """Every linked hub with its settings."""
        return [hub.to_json() for hub in self._store.list_linked_hubs()]

    def put_linked_hub(self, name: str, body: object) -> dict[str, Any]:
        """Link ``name`` (or update it) from ``{"allocationWeight", "latencyMs"}``; nothing is
        changed unless the whole request is valid (:class:`ValidationError` otherwise)."""
        hub = parse_hub_settings(name, body)
        if not name_covered(hub.name, self._names):
            raise ValidationError(
                f"hub {hub.name!r} is not covered by the emulator's server certificate (it"
                f" covers {', '.join(self._names) or 'nothing'}), so devices could not verify"
                f" it; restart the emulator with --hub {hub.name} (the certificate is reissued"
                " at start), or start it with --hostname '*.DOMAIN' to allow hubs of a domain"
            )
        stored = self._store.put_hub(hub)
        log.info(
            "linked hub %s: weight %d, latency %s ms",
            stored.name,
            stored.allocation_weight,
            stored.latency_ms,
        )
        return stored.to_json()

    def remove_linked_hub(self, name: str) -> None:
        """Unlink a hub (:class:`NotFoundError` if it is not linked); its devices' live
        connections are closed and DPS stops assigning devices to it."""
        self._store.remove_hub(name)
        hub = validate_host_name(name, "hub name")
        log.info("hub %s unlinked", hub)
        if self._unlinked is not None:
            self._unlinked(hub)
