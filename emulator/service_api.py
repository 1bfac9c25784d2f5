"""The emulator's service API: HTTP + JSON on loopback, shaped like Azure's DPS service REST API.

Standard library only (``http.server`` in a daemon thread). It manages individual enrollments,
enrollment groups and registration records in the :class:`~emulator.store.Store`, reports the
emulator's endpoints (``GET /info``) and lets other parts of the emulator add routes; the hub's
(devices, twins, direct methods, C2D, telemetry) come with :meth:`ServiceApi.add_hub_routes`.
Every failure is answered with Azure's error JSON and the matching HTTP status; a handler that
crashes costs its request a 500, never the server its thread. Bodies are never logged: enrollment
bodies carry symmetric keys.
"""

from __future__ import annotations

import base64
import dataclasses
import ipaddress
import json
import logging
import re
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Protocol, TypeVar, Union
from urllib.parse import parse_qs, unquote

from hub_proto.errors import HubParseError
from hub_proto.topics import check_id

from .allocation import static_hub
from .errors import ConflictError, EmulatorError, NotFoundError, ValidationError
from .hub_service import HubServiceError
from .models import (
    EnrollmentGroup,
    IndividualEnrollment,
    utc_now_iso,
    validate_enrollment_group_id,
    validate_registration_id,
)
from .store import Store

__all__ = [
    "MAX_BODY_BYTES",
    "ApiError",
    "Handler",
    "HubApi",
    "LinkedHubApi",
    "Request",
    "Response",
    "ServiceApi",
]

logger = logging.getLogger(__name__)

#: An enrollment record (individual or group) going through the shared PUT path.
_R = TypeVar("_R", IndividualEnrollment, EnrollmentGroup)

#: Largest request body the API reads; anything bigger is refused with 413 before reading it.
MAX_BODY_BYTES = 1024 * 1024
#: Socket timeout per connection, so a client that stalls mid-request cannot hold a thread.
CONNECTION_TIMEOUT = 10.0
#: How long :meth:`ServiceApi.stop` waits for the serving thread.
STOP_TIMEOUT = 5.0
#: Random bytes in a key the API generates when an enrollment omits it (Azure generates 32).
GENERATED_KEY_BYTES = 32
#: Most telemetry messages one ``GET /devices/{id}/messages/events`` returns.
MAX_TELEMETRY_PAGE = 1000

# Error codes (6 digits, the first three being the HTTP status), as Azure's service API uses them.
ERROR_INVALID_ARGUMENT = 400004
ERROR_FORBIDDEN_HOST = 403002
ERROR_NOT_FOUND = 404001
ERROR_ENROLLMENT_NOT_FOUND = 404201
ERROR_REGISTRATION_NOT_FOUND = 404202
ERROR_GROUP_NOT_FOUND = 404204
ERROR_METHOD_NOT_ALLOWED = 405001
ERROR_LENGTH_REQUIRED = 411001
ERROR_PRECONDITION_FAILED = 412002
ERROR_TOO_LARGE = 413001
ERROR_UNSUPPORTED_MEDIA_TYPE = 415001
ERROR_SERVER = 500001

_METHODS_WITH_BODY = frozenset({"PUT", "POST", "PATCH"})
_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})

#: A JSON value as handlers return it.
JsonValue = Union[dict[str, Any], list[Any], str, int, float, bool, None]


class ApiError(EmulatorError):
    """Raise from a handler to answer with an error: HTTP ``status``, Azure ``error_code``."""

    def __init__(
        self,
        status: int,
        error_code: int,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.status = status
        self.error_code = error_code
        self.message = message
        self.headers = dict(headers or {})
        super().__init__(f"{status} ({error_code}): {message}")


@dataclass(frozen=True)
class Request:
    """One parsed API request; ``params`` are the percent-decoded ``{name}`` parts of the path."""

    method: str
    path: str
    params: Mapping[str, str]
    query: Mapping[str, list[str]]
    headers: Mapping[str, str]
    body: bytes

    def header(self, name: str) -> str | None:
        """A request header by case-insensitive name, or ``None``."""
        return self.headers.get(name.lower())

    def json(self) -> Any:
        """The body as JSON; :class:`ApiError` 400 if it is empty, not UTF-8 or not JSON."""
        if not self.body:
            raise ApiError(400, ERROR_INVALID_ARGUMENT, "the request needs a JSON body")
        try:
            text = self.body.decode("utf-8")
            return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
        except UnicodeDecodeError as exc:
            raise ApiError(400, ERROR_INVALID_ARGUMENT, "the body is not UTF-8") from exc
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, ERROR_INVALID_ARGUMENT, "the body is not valid JSON") from exc


@dataclass
class Response:
    """A handler's answer: status, a JSON body (``None``: no body) and extra headers."""

    status: int = 200
    body: JsonValue = None
    headers: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Request], Response]


class HubApi(Protocol):
    """What the hub routes call (:class:`emulator.router.HubRuntime`); thread-safe, and raising
    :class:`~emulator.hub_service.HubServiceError` for answers other than success."""

    def list_devices(self) -> list[dict[str, Any]]:
        """Every device identity."""
        ...

    def get_device(self, device_id: str) -> dict[str, Any]:
        """One device identity."""
        ...

    def get_twin(self, device_id: str) -> dict[str, Any]:
        """One twin."""
        ...

    def update_twin(self, device_id: str, body: Any) -> dict[str, Any]:
        """Patch tags and desired properties; the new twin."""
        ...

    def invoke_method(self, device_id: str, body: Any) -> dict[str, Any]:
        """Call a direct method; ``{"status", "payload"}``."""
        ...

    def send_c2d(self, device_id: str, body: Any) -> None:
        """Queue a cloud-to-device message."""
        ...

    def telemetry(self, device_id: str, since: int, limit: int) -> list[dict[str, Any]]:
        """Stored telemetry after sequence number ``since``."""
        ...

    def set_device_status(self, device_id: str, body: Any) -> dict[str, Any]:
        """Enable or disable a device identity; the device."""
        ...


class LinkedHubApi(Protocol):
    """What the linked-hub routes call (:class:`emulator.allocation.LinkedHubRegistry`),
    raising :class:`ValidationError` (400) or :class:`NotFoundError` (404)."""

    def list_linked_hubs(self) -> list[dict[str, Any]]:
        """Every linked hub with its allocation settings."""
        ...

    def put_linked_hub(self, name: str, body: Any) -> dict[str, Any]:
        """Link a hub or change its settings; the stored hub."""
        ...

    def remove_linked_hub(self, name: str) -> None:
        """Unlink a hub."""
        ...


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text} is too large")
    return value


def _shorten(path: str, limit: int = 200) -> str:
    return path if len(path) <= limit else path[:limit] + "..."


def _generate_key() -> str:
    return base64.b64encode(secrets.token_bytes(GENERATED_KEY_BYTES)).decode("ascii")


def _etag_from_header(value: str | None) -> str | None:
    """The etag an ``If-Match`` header names (``*`` kept as is), without ``W/`` and quotes."""
    if value is None:
        return None
    text = value.strip()
    if text.startswith("W/"):
        text = text[2:]
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return text


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: str
    segments: tuple[str, ...]
    handler: Handler

    def match(self, segments: list[str]) -> dict[str, str] | None:
        if len(segments) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for want, got in zip(self.segments, segments):
            name = _PARAM_RE.fullmatch(want)
            if name is not None:
                if not got:
                    return None
                params[name.group(1)] = unquote(got, errors="strict")
            elif want != got:
                return None
        return params


def _split_path(path: str) -> list[str]:
    if path != "/" and path.endswith("/"):
        path = path[:-1]
    return path.split("/")[1:]


class ServiceApi:
    """The service API server: bind with :meth:`start`, stop with :meth:`stop`."""

    def __init__(
        self,
        store: Store,
        info: Callable[[], dict[str, Any]],
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._info = info
        self._host = host
        self._requested_port = port
        self._clock = clock
        self._routes: tuple[_Route, ...] = ()
        self._routes_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._add_builtin_routes()

    # ------------------------------------------------------------------ lifecycle

    @property
    def port(self) -> int:
        """The bound port (the ephemeral one when constructed with ``port=0``)."""
        if self._server is None:
            raise EmulatorError("the service API is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Base URL of the API, e.g. ``http://127.0.0.1:8480``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Bind the listener and serve requests in a daemon thread."""
        if self._server is not None:
            raise EmulatorError("the service API is already started")
        if not _is_loopback(self._host):
            logger.warning(
                "the service API listens on %s, which is not loopback: it has no authentication"
                " and hands out enrollment keys",
                self._host,
            )
        server_class = _Server6 if ":" in self._host else _Server
        try:
            server = server_class((self._host, self._requested_port), _RequestHandler)
        except OSError as exc:
            raise EmulatorError(
                f"cannot listen on {self._host}:{self._requested_port}: {exc}"
            ) from exc
        server.api = self
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"service-api:{server.server_address[1]}",
            daemon=True,
        )
        self._server = server
        self._thread = thread
        thread.start()
        logger.info("service API listening on %s", self.url)

    def stop(self) -> None:
        """Stop serving, close the listener and wait (bounded) for the thread. Safe to repeat."""
        server, thread = self._server, self._thread
        if server is None:
            return
        if thread is not None and thread.is_alive():
            server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(STOP_TIMEOUT)
            if thread.is_alive():
                logger.warning("the service API thread did not stop within %.0f s", STOP_TIMEOUT)
        self._server = None
        self._thread = None

    def __enter__(self) -> ServiceApi:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ routing

    def add_route(self, method: str, pattern: str, handler: Handler) -> None:
        """Serve ``method`` on ``pattern`` (like ``/devices/{deviceId}/twin``) with ``handler``.

        ``{name}`` matches one non-empty path segment, handed to the handler percent-decoded in
        ``request.params``. A route added for a method and pattern already served replaces it.
        """
        method = method.upper()
        if not pattern.startswith("/"):
            raise ValueError(f"route pattern must start with '/': {pattern!r}")
        route = _Route(method, pattern, tuple(_split_path(pattern)), handler)
        with self._routes_lock:
            kept = [r for r in self._routes if (r.method, r.pattern) != (method, pattern)]
            self._routes = (*kept, route)

    def _resolve(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        segments = _split_path(path)
        allowed: set[str] = set()
        for route in self._routes:
            try:
                params = route.match(segments)
            except UnicodeDecodeError as exc:
                raise ApiError(400, ERROR_INVALID_ARGUMENT, "the path is not UTF-8") from exc
            if params is None:
                continue
            if route.method == method:
                return route.handler, params
            allowed.add(route.method)
        if allowed:
            raise ApiError(
                405,
                ERROR_METHOD_NOT_ALLOWED,
                f"{method} is not allowed on {_shorten(path)}",
                headers={"Allow": ", ".join(sorted(allowed))},
            )
        raise ApiError(404, ERROR_NOT_FOUND, f"no such resource: {_shorten(path)}")

    def _handle(self, request: Request) -> Response:
        """Run the matching handler and turn every failure into an error response."""
        try:
            handler, params = self._resolve(request.method, request.path)
            return handler(dataclasses.replace(request, params=params))
        except ApiError as exc:
            return self.error_response(exc.status, exc.error_code, exc.message, exc.headers)
        except ValidationError as exc:
            return self.error_response(400, ERROR_INVALID_ARGUMENT, str(exc))
        except NotFoundError as exc:
            return self.error_response(404, ERROR_NOT_FOUND, str(exc))
        except ConflictError as exc:
            return self.error_response(412, ERROR_PRECONDITION_FAILED, str(exc))
        except Exception:
            logger.exception("service API: %s %s failed", request.method, request.path)
            return self.error_response(500, ERROR_SERVER, "internal error in the emulator")

    def error_response(
        self,
        status: int,
        error_code: int,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        """Azure's error JSON: ``errorCode``, ``message``, ``trackingId``, ``timestampUtc``."""
        body = {
            "errorCode": error_code,
            "message": message,
            "trackingId": str(uuid.uuid4()),
            "timestampUtc": utc_now_iso(self._clock()),
        }
        return Response(status, body, dict(headers or {}))

    def _host_allowed(self, host_header: str | None) -> bool:
        """Refuse Host names that are not loopback, so DNS rebinding cannot read keys."""
        if host_header is None or not _is_loopback(self._host):
            return True
        host = host_header.strip().lower()
        if host.startswith("["):
            host = host[1 : host.find("]")] if "]" in host else host
        else:
            host = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        return host == self._host.lower() or _is_loopback(host)

    # ------------------------------------------------------------------ built-in routes

    def _add_builtin_routes(self) -> None:
        self.add_route("GET", "/info", self._get_info)
        self.add_route("GET", "/hubs", self._list_hubs)
        self.add_route("GET", "/enrollments", self._list_enrollments)
        self.add_route("GET", "/enrollments/{registrationId}", self._get_enrollment)
        self.add_route("PUT", "/enrollments/{registrationId}", self._put_enrollment)
        self.add_route("DELETE", "/enrollments/{registrationId}", self._delete_enrollment)
        self.add_route("GET", "/enrollmentGroups", self._list_groups)
        self.add_route("GET", "/enrollmentGroups/{enrollmentGroupId}", self._get_group)
        self.add_route("PUT", "/enrollmentGroups/{enrollmentGroupId}", self._put_group)
        self.add_route("DELETE", "/enrollmentGroups/{enrollmentGroupId}", self._delete_group)
        self.add_route("GET", "/registrations", self._list_registrations)
        self.add_route("GET", "/registrations/{registrationId}", self._get_registration)
        self.add_route("DELETE", "/registrations/{registrationId}", self._delete_registration)

    def add_hub_routes(self, hub: HubApi) -> None:
        """Serve the hub's routes (shapes after Azure's IoT Hub service REST API).

        ``GET /devices``, ``GET /devices/{id}``, ``GET /twins/{id}``, ``PATCH /twins/{id}``
        (``{"tags", "properties": {"desired"}}``), ``POST /twins/{id}/methods``
        (``{"methodName", "payload", "responseTimeoutInSeconds"}``),
        ``POST /devices/{id}/messages/deviceBound`` (a JSON body, see
        :meth:`emulator.hub_service.HubService.parse_c2d_body`; 204) and
        ``GET /devices/{id}/messages/events?since=SEQ&limit=N`` (stored telemetry, oldest first),
        ``PATCH`` (or ``PUT``) ``/devices/{id}`` ``{"status": "enabled" | "disabled"}``.
        """

        def device_id(request: Request) -> str:
            try:
                return check_id(request.params["deviceId"])
            except HubParseError as exc:
                raise ApiError(400, ERROR_INVALID_ARGUMENT, str(exc)) from exc

        def call(func: Callable[[], Any], status: int = 200) -> Response:
            try:
                result = func()
            except HubServiceError as exc:
                raise ApiError(exc.status, exc.error_code, exc.message) from exc
            return Response(status, None if status == 204 else result)

        def list_devices(request: Request) -> Response:
            return call(hub.list_devices)

        def get_device(request: Request) -> Response:
            ident = device_id(request)
            return call(lambda: hub.get_device(ident))

        def get_twin(request: Request) -> Response:
            ident = device_id(request)
            return call(lambda: hub.get_twin(ident))

        def patch_twin(request: Request) -> Response:
            ident = device_id(request)
            body = request.json()
            return call(lambda: hub.update_twin(ident, body))

        def invoke(request: Request) -> Response:
            ident = device_id(request)
            body = request.json()
            return call(lambda: hub.invoke_method(ident, body))

        def send_c2d(request: Request) -> Response:
            ident = device_id(request)
            body = request.json()
            return call(lambda: hub.send_c2d(ident, body), 204)

        def telemetry(request: Request) -> Response:
            ident = device_id(request)
            since = _query_int(request, "since", 0, 0, 2**63 - 1)
            limit = _query_int(request, "limit", MAX_TELEMETRY_PAGE, 1, MAX_TELEMETRY_PAGE)
            return call(lambda: hub.telemetry(ident, since, limit))

        def set_status(request: Request) -> Response:
            ident = device_id(request)
            body = request.json()
            return call(lambda: hub.set_device_status(ident, body))

        self.add_route("GET", "/devices", list_devices)
        self.add_route("GET", "/devices/{deviceId}", get_device)
        self.add_route("PATCH", "/devices/{deviceId}", set_status)
        self.add_route("PUT", "/devices/{deviceId}", set_status)
        self.add_route("GET", "/twins/{deviceId}", get_twin)
        self.add_route("PATCH", "/twins/{deviceId}", patch_twin)
        self.add_route("POST", "/twins/{deviceId}/methods", invoke)
        self.add_route("POST", "/devices/{deviceId}/messages/deviceBound", send_c2d)
        self.add_route("GET", "/devices/{deviceId}/messages/events", telemetry)

    def add_linked_hub_routes(self, hubs: LinkedHubApi) -> None:
        """``GET /hubs`` (``[{"name", "allocationWeight", "latencyMs"}]``), ``PUT /hubs/{name}``
        (``{"allocationWeight": 0..1000, "latencyMs": number | null}``, both optional) and
        ``DELETE /hubs/{name}``."""

        def list_hubs(request: Request) -> Response:
            return Response(200, hubs.list_linked_hubs())

        def put_hub(request: Request) -> Response:
            body = request.json() if request.body else {}
            return Response(200, hubs.put_linked_hub(request.params["name"], body))

        def delete_hub(request: Request) -> Response:
            hubs.remove_linked_hub(request.params["name"])
            return Response(204)

        self.add_route("GET", "/hubs", list_hubs)
        self.add_route("PUT", "/hubs/{name}", put_hub)
        self.add_route("DELETE", "/hubs/{name}", delete_hub)

    def _now(self) -> str:
        return utc_now_iso(self._clock())

    def _get_info(self, request: Request) -> Response:
        return Response(200, self._info())

    def _list_hubs(self, request: Request) -> Response:
        return Response(200, [hub.to_json() for hub in self._store.list_linked_hubs()])

    def _check_hubs(self, iot_hub_host_name: str | None, iot_hubs: list[str] | None) -> None:
        """Refuse hubs that are not linked (when any are), as Azure does."""
        linked = self._store.list_hubs()
        if not linked:
            return
        named = ([iot_hub_host_name] if iot_hub_host_name else []) + list(iot_hubs or [])
        for hub in named:
            if hub not in linked:
                raise ValidationError(
                    f"IoT hub {hub!r} is not linked to this DPS; linked: {', '.join(linked)}"
                )

    @staticmethod
    def _body_object(request: Request, id_field: str, path_id: str) -> dict[str, Any]:
        """The JSON object body with its id checked against (or filled in from) the path."""
        data = request.json()
        if not isinstance(data, dict):
            raise ApiError(400, ERROR_INVALID_ARGUMENT, "the body must be a JSON object")
        body_id = data.get(id_field)
        if body_id is None:
            return {**data, id_field: path_id}
        if not isinstance(body_id, str) or body_id.lower() != path_id:
            raise ApiError(
                400,
                ERROR_INVALID_ARGUMENT,
                f"{id_field} in the body does not match the one in the path",
            )
        return data

    @staticmethod
    def _precondition(if_match: str | None, current_etag: str | None, what: str) -> str | None:
        """Check ``If-Match`` against the stored etag; return the etag to compare-and-set on."""
        wanted = _etag_from_header(if_match)
        if wanted is None or wanted == "":
            return None
        if current_etag is None or (wanted != "*" and wanted != current_etag):
            raise ApiError(
                412, ERROR_PRECONDITION_FAILED, f"{what} has changed: the etag does not match"
            )
        return current_etag

    def _store_record(
        self,
        request: Request,
        record: _R,
        existing: _R | None,
        now: str,
        what: str,
        put: Callable[..., _R],
    ) -> Response:
        """Check hubs, allocation and ``If-Match``, keep the creation time, store atomically."""
        self._check_hubs(record.iot_hub_host_name, record.iot_hubs)
        _check_allocation(record)
        expected = self._precondition(
            request.header("If-Match"), None if existing is None else existing.etag, what
        )
        record = dataclasses.replace(
            record,
            etag="",
            created=now if existing is None else existing.created,
            last_updated=now,
        )
        try:
            stored = put(record, expected_etag=expected)
        except ConflictError as exc:
            raise ApiError(412, ERROR_PRECONDITION_FAILED, str(exc)) from exc
        logger.info("%s %s", what, "replaced" if existing else "created")
        return Response(200, stored.to_json(), {"ETag": f'"{stored.etag}"'})

    # individual enrollments

    def _list_enrollments(self, request: Request) -> Response:
        return Response(200, [e.to_json() for e in self._store.list_enrollments()])

    def _get_enrollment(self, request: Request) -> Response:
        registration_id = validate_registration_id(request.params["registrationId"])
        enrollment = self._store.get_enrollment(registration_id)
        if enrollment is None:
            raise _enrollment_not_found(registration_id)
        return Response(200, enrollment.to_json(), {"ETag": f'"{enrollment.etag}"'})

    def _put_enrollment(self, request: Request) -> Response:
        registration_id = validate_registration_id(request.params["registrationId"])
        data = self._body_object(request, "registrationId", registration_id)
        now = self._now()
        enrollment = IndividualEnrollment.from_json(data, now=now, generate_key=_generate_key)
        existing = self._store.get_enrollment(registration_id)
        return self._store_record(
            request,
            enrollment,
            existing,
            now,
            f"enrollment {registration_id}",
            self._store.put_enrollment,
        )

    def _delete_enrollment(self, request: Request) -> Response:
        registration_id = validate_registration_id(request.params["registrationId"])
        expected = _etag_from_header(request.header("If-Match"))
        if expected == "*":
            expected = None
        try:
            self._store.delete_enrollment(registration_id, expected_etag=expected or None)
        except NotFoundError as exc:
            raise _enrollment_not_found(registration_id) from exc
        logger.info("enrollment %s deleted", registration_id)
        return Response(204)

    # enrollment groups

    def _list_groups(self, request: Request) -> Response:
        return Response(200, [g.to_json() for g in self._store.list_groups()])

    def _get_group(self, request: Request) -> Response:
        group_id = validate_enrollment_group_id(request.params["enrollmentGroupId"])
        group = self._store.get_group(group_id)
        if group is None:
            raise _group_not_found(group_id)
        return Response(200, group.to_json(), {"ETag": f'"{group.etag}"'})

    def _put_group(self, request: Request) -> Response:
        group_id = validate_enrollment_group_id(request.params["enrollmentGroupId"])
        data = self._body_object(request, "enrollmentGroupId", group_id)
        now = self._now()
        group = EnrollmentGroup.from_json(data, now=now, generate_key=_generate_key)
        existing = self._store.get_group(group_id)
        return self._store_record(
            request, group, existing, now, f"enrollment group {group_id}", self._store.put_group
        )

    def _delete_group(self, request: Request) -> Response:
        group_id = validate_enrollment_group_id(request.params["enrollmentGroupId"])
        expected = _etag_from_header(request.header("If-Match"))
        if expected == "*":
            expected = None
        try:
            self._store.delete_group(group_id, expected_etag=expected or None)
        except NotFoundError as exc:
            raise _group_not_found(group_id) from exc
        logger.info("enrollment group %s deleted", group_id)
        return Response(204)

    # registrations

    def _list_registrations(self, request: Request) -> Response:
        return Response(200, [r.to_json() for r in self._store.list_registrations()])

    def _get_registration(self, request: Request) -> Response:
        registration_id = validate_registration_id(request.params["registrationId"])
        record = self._store.get_registration(registration_id)
        if record is None:
            raise _registration_not_found(registration_id)
        return Response(200, record.to_json())

    def _delete_registration(self, request: Request) -> Response:
        registration_id = validate_registration_id(request.params["registrationId"])
        try:
            self._store.delete_registration(registration_id)
        except NotFoundError as exc:
            raise _registration_not_found(registration_id) from exc
        logger.info("registration %s deleted", registration_id)
        return Response(204)


def _query_int(request: Request, name: str, default: int, minimum: int, maximum: int) -> int:
    """An integer query parameter in ``minimum..maximum`` (400 otherwise)."""
    values = request.query.get(name)
    if not values:
        return default
    text = values[-1]
    if not text.isascii() or not text.isdigit() or len(text) > 19:
        raise ApiError(400, ERROR_INVALID_ARGUMENT, f"{name} must be a whole number")
    value = int(text)
    if not minimum <= value <= maximum:
        raise ApiError(
            400, ERROR_INVALID_ARGUMENT, f"{name} must be between {minimum} and {maximum}"
        )
    return value


def _check_allocation(enrollment: IndividualEnrollment | EnrollmentGroup) -> None:
    """Refuse allocation policies that lack what they need (a webhook, a hub)."""
    policy = enrollment.allocation_policy
    if policy == "custom" and enrollment.custom_allocation_definition is None:
        raise ValidationError(
            "allocationPolicy 'custom' needs customAllocationDefinition {webhookUrl, apiVersion}"
        )
    if policy == "static" and static_hub(enrollment) is None:
        raise ValidationError(
            "allocationPolicy 'static' needs iotHubHostName (or exactly one hub in iotHubs)"
        )


def _enrollment_not_found(registration_id: str) -> ApiError:
    return ApiError(
        404, ERROR_ENROLLMENT_NOT_FOUND, f"enrollment {registration_id!r} does not exist"
    )


def _group_not_found(group_id: str) -> ApiError:
    return ApiError(404, ERROR_GROUP_NOT_FOUND, f"enrollment group {group_id!r} does not exist")


def _registration_not_found(registration_id: str) -> ApiError:
    return ApiError(
        404,
        ERROR_REGISTRATION_NOT_FOUND,
        f"registration {registration_id!r} does not exist",
    )


def _is_loopback(host: str) -> bool:
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    """One thread per connection; threads are daemons so a stuck client never blocks exit."""

    daemon_threads = True
    request_queue_size = 64
    api: ServiceApi

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.debug("service API: connection from %s failed", client_address, exc_info=True)


class _Server6(_Server):
    address_family = socket.AF_INET6


class _RequestHandler(BaseHTTPRequestHandler):
    """Reads one request (bounded), hands it to :class:`ServiceApi`, writes the JSON answer."""

    server: _Server
    timeout = CONNECTION_TIMEOUT
    server_version = "dps-mqtt-emulator"
    disable_nagle_algorithm = True

    def version_string(self) -> str:
        return self.server_version

    def do_GET(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def _serve(self) -> None:
        self.close_connection = True
        api = self.server.api
        path, _, query_string = self.path.partition("?")
        method = self.command
        try:
            response = self._read_and_handle(api, method, path, query_string)
            payload = _encode(response)
        except _Disconnected:
            logger.debug("service API: %s %s: client went away mid-request", method, path)
            return
        except Exception:
            logger.exception("service API: %s %s failed", method, path)
            response = api.error_response(500, ERROR_SERVER, "internal error in the emulator")
            payload = _encode(response)
        self._send(response, payload, method, path)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """Answer requests ``http.server`` itself rejects (bad request line, unknown method) in
        Azure's error JSON rather than HTML."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        response = self.server.api.error_response(code, code * 1000 + 1, message or phrase)
        self._send(response, _encode(response), self.command or "-", self._log_path())

    def _read_and_handle(
        self, api: ServiceApi, method: str, path: str, query_string: str
    ) -> Response:
        headers = {key.lower(): value for key, value in self.headers.items()}
        if not path.startswith("/"):
            return api.error_response(400, ERROR_INVALID_ARGUMENT, "the path must start with '/'")
        if not api._host_allowed(headers.get("host")):
            return api.error_response(
                403, ERROR_FORBIDDEN_HOST, "the Host header must name a loopback address"
            )
        try:
            body = self._read_body(method, headers)
        except ApiError as exc:
            return api.error_response(exc.status, exc.error_code, exc.message, exc.headers)
        query = parse_qs(query_string, keep_blank_values=True)
        request = Request(method, path, {}, query, headers, body)
        return api._handle(request)

    def _read_body(self, method: str, headers: Mapping[str, str]) -> bytes:
        """Read exactly Content-Length bytes, refusing before reading when it is too large."""
        if "transfer-encoding" in headers:
            raise ApiError(411, ERROR_LENGTH_REQUIRED, "chunked bodies are not supported")
        lengths = set(self.headers.get_all("Content-Length") or [])
        if len(lengths) > 1:
            raise ApiError(400, ERROR_INVALID_ARGUMENT, "conflicting Content-Length headers")
        length_text = headers.get("content-length")
        if length_text is None:
            if method in _METHODS_WITH_BODY:
                raise ApiError(411, ERROR_LENGTH_REQUIRED, "Content-Length is required")
            return b""
        text = length_text.strip()
        if not text.isdigit() or not text.isascii():
            raise ApiError(400, ERROR_INVALID_ARGUMENT, "Content-Length is not a number")
        if len(text) > 12 or int(text) > MAX_BODY_BYTES:
            raise ApiError(413, ERROR_TOO_LARGE, f"the body is larger than {MAX_BODY_BYTES} bytes")
        length = int(text)
        if length == 0:
            return b""
        content_type = headers.get("content-type", "")
        if content_type.split(";", 1)[0].strip().lower() != "application/json":
            raise ApiError(
                415, ERROR_UNSUPPORTED_MEDIA_TYPE, "the body must be sent as application/json"
            )
        try:
            body = self.rfile.read(length)
        except OSError as exc:
            raise _Disconnected from exc
        if len(body) != length:
            raise _Disconnected
        return body

    def _send(self, response: Response, payload: bytes, method: str, path: str) -> None:
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if payload:
                self.send_header("Content-Type", "application/json; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            self.send_header("Connection", "close")
            self.end_headers()
            if payload:
                self.wfile.write(payload)
        except OSError:
            logger.debug("service API: %s %s: could not send the answer", method, path)

    def _log_path(self) -> str:
        path = getattr(self, "path", None)
        return "-" if not isinstance(path, str) else path.split("?", 1)[0][:200]

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        status = code.value if isinstance(code, HTTPStatus) else code
        logger.debug("service API: %s %s -> %s", self.command or "-", self._log_path(), status)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("service API: " + format, *args)


def _encode(response: Response) -> bytes:
    if response.body is None:
        return b""
    return json.dumps(response.body, allow_nan=False).encode("utf-8")


class _Disconnected(Exception):
    """The client closed or stalled before sending the whole body: there is no one to answer."""
