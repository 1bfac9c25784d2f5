"""A small typed client for the emulator's service API (used by the CLI, the demo and tests).

Standard library only (``http.client``), one connection per call. Every failure is a
:class:`ServiceApiError`: an error answer carries the HTTP status and Azure's ``errorCode``; a
connection failure has status 0.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
from typing import Any
from urllib.parse import quote, urlsplit

from .errors import EmulatorError

__all__ = ["REPROVISION_POLICIES", "ServiceApiError", "ServiceClient", "allocation_fields"]

#: Largest answer the client reads (the API's lists can be long, but not unbounded).
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
#: Largest body the service API accepts (its ``MAX_BODY_BYTES``); bigger ones fail here, before
#: sending, because the server closes the connection without reading them.
MAX_REQUEST_BYTES = 1024 * 1024


class ServiceApiError(EmulatorError):
    """The service API answered with an error, or could not be reached (``status`` 0)."""

    def __init__(self, status: int, error_code: int | None, message: str) -> None:
        self.status = status
        self.error_code = error_code
        self.message = message
        if status == 0:
            text = message
        else:
            code = f" (errorCode {error_code})" if error_code is not None else ""
            text = f"service API answered {status}{code}: {message}"
        super().__init__(text)


def _symmetric_key_attestation(
    primary_key: str | None, secondary_key: str | None
) -> dict[str, Any]:
    keys: dict[str, str] = {}
    if primary_key is not None:
        keys["primaryKey"] = primary_key
    if secondary_key is not None:
        keys["secondaryKey"] = secondary_key
    return {"type": "symmetricKey", "symmetricKey": keys}


def _x509_attestation(kind: str, primary: str, secondary: str | None) -> dict[str, Any]:
    certificates: dict[str, Any] = {"primary": {"certificate": primary}}
    if secondary is not None:
        certificates["secondary"] = {"certificate": secondary}
    return {"type": "x509", "x509": {kind: certificates}}


#: ``reprovision`` shorthands and the ``reprovisionPolicy`` each stands for.
REPROVISION_POLICIES = {
    "migrate": {"updateHubAssignment": True, "migrateDeviceData": True},
    "reset": {"updateHubAssignment": True, "migrateDeviceData": False},
    "never": {"updateHubAssignment": False, "migrateDeviceData": False},
}


def _enrollment_body(
    identity: dict[str, Any],
    provisioning_status: str,
    *,
    device_id: str | None = None,
    iot_hub_host_name: str | None,
    initial_twin: dict[str, Any] | None,
    allocation: dict[str, Any],
) -> dict[str, Any]:
    """An enrollment or group JSON body: ``identity`` (id and attestation), the status, the
    optional fields that are set, then :func:`allocation_fields`."""
    optional = {
        "deviceId": device_id,
        "iotHubHostName": iot_hub_host_name,
        "initialTwin": initial_twin,
    }
    body = {**identity, "provisioningStatus": provisioning_status}
    body.update({name: value for name, value in optional.items() if value is not None})
    body.update(allocation_fields(**allocation))
    return body


def allocation_fields(
    *,
    allocation_policy: str | None = None,
    iot_hubs: list[str] | None = None,
    webhook_url: str | None = None,
    webhook_api_version: str = "2021-10-01",
    reprovision: str | None = None,
) -> dict[str, Any]:
    """Enrollment fields for hub allocation: ``allocationPolicy`` (hashed, geoLatency, static,
    custom), ``iotHubs``, ``customAllocationDefinition`` (from ``webhook_url``) and
    ``reprovisionPolicy`` (``reprovision``: migrate, reset or never)."""
    body: dict[str, Any] = {}
    if allocation_policy is not None:
        body["allocationPolicy"] = allocation_policy
    if iot_hubs is not None:
        body["iotHubs"] = list(iot_hubs)
    if webhook_url is not None:
        body["customAllocationDefinition"] = {
            "webhookUrl": webhook_url,
            "apiVersion": webhook_api_version,
        }
    if reprovision is not None:
        if reprovision not in REPROVISION_POLICIES:
            raise ServiceApiError(
                0, None, f"reprovision must be one of {', '.join(REPROVISION_POLICIES)}"
            )
        body["reprovisionPolicy"] = dict(REPROVISION_POLICIES[reprovision])
    return body


class ServiceClient:
    """Calls the emulator's service API at ``base_url`` (``http://127.0.0.1:8480``)."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ServiceApiError(
                0, None, f"the service API URL must be http://HOST:PORT, got {base_url!r}"
            )
        try:
            port = parts.port or 80
        except ValueError as exc:
            raise ServiceApiError(0, None, f"bad port in service API URL {base_url!r}") from exc
        self._host = parts.hostname
        self._port = port
        self._prefix = parts.path.rstrip("/")
        self._timeout = timeout
        self.base_url = base_url.rstrip("/")

    # ------------------------------------------------------------------ plumbing

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send one request; return the decoded JSON answer (``None`` when it has no body).

        ``timeout`` (seconds) overrides the client's socket time-out for this call.
        """
        send_headers = {"Accept": "application/json", **(headers or {})}
        payload: bytes | None = None
        if body is not None:
            try:
                payload = json.dumps(body, allow_nan=False).encode("utf-8")
            except (TypeError, ValueError) as exc:
                raise ServiceApiError(0, None, f"the request body is not JSON: {exc}") from exc
            if len(payload) > MAX_REQUEST_BYTES:
                raise ServiceApiError(
                    413, None, f"the request body is larger than {MAX_REQUEST_BYTES} bytes"
                )
            send_headers["Content-Type"] = "application/json"
        elif method in ("PUT", "POST", "PATCH"):
            payload = b""
        conn = http.client.HTTPConnection(
            self._host, self._port, timeout=self._timeout if timeout is None else timeout
        )
        try:
            conn.request(method, self._prefix + path, body=payload, headers=send_headers)
            response = conn.getresponse()
            data = response.read(MAX_RESPONSE_BYTES + 1)
            status = response.status
        except (OSError, http.client.HTTPException) as exc:
            raise ServiceApiError(
                0, None, f"cannot reach the service API at {self.base_url}: {_describe(exc)}"
            ) from exc
        finally:
            conn.close()
        if len(data) > MAX_RESPONSE_BYTES:
            raise ServiceApiError(status, None, "the answer is too large")
        decoded: Any = None
        if data:
            try:
                decoded = json.loads(data.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as exc:
                if status >= 400:
                    raise ServiceApiError(status, None, "error answer is not JSON") from exc
                raise ServiceApiError(status, None, "the answer is not valid JSON") from exc
        if status >= 400:
            error_code: int | None = None
            message = http.client.responses.get(status, "error")
            if isinstance(decoded, dict):
                code = decoded.get("errorCode")
                if isinstance(code, int) and not isinstance(code, bool):
                    error_code = code
                if isinstance(decoded.get("message"), str):
                    message = decoded["message"]
            raise ServiceApiError(status, error_code, message)
        return decoded

    def _get_object(self, path: str) -> dict[str, Any]:
        return _as_object(self.request("GET", path))

    def _get_list(self, path: str) -> list[Any]:
        value = self.request("GET", path)
        if not isinstance(value, list):
            raise ServiceApiError(200, None, f"expected a JSON list from GET {path}")
        return value

    def _put_object(self, path: str, body: dict[str, Any], etag: str | None) -> dict[str, Any]:
        headers = {"If-Match": f'"{etag}"'} if etag else None
        return _as_object(self.request("PUT", path, body, headers=headers))

    # ------------------------------------------------------------------ API

    def _delete_object(self, path: str, etag: str | None) -> None:
        headers = {"If-Match": f'"{etag}"'} if etag else None
        self.request("DELETE", path, headers=headers)

    def info(self) -> dict[str, Any]:
        """The emulator's id scope, endpoints and CA certificate path."""
        return self._get_object("/info")

    def list_hubs(self) -> list[str]:
        """Host names of the linked hubs."""
        return [
            str(hub.get("name")) if isinstance(hub, dict) else str(hub)
            for hub in self._get_list("/hubs")
        ]

    def list_linked_hubs(self) -> list[dict[str, Any]]:
        """The linked hubs: ``{"name", "allocationWeight", "latencyMs"}`` each."""
        return [_as_object(item) for item in self._get_list("/hubs")]

    def put_hub(
        self, name: str, *, allocation_weight: int | None = None, latency_ms: float | None = None
    ) -> dict[str, Any]:
        """Link a hub (its name must be covered by the emulator's certificate) or replace its
        settings: ``allocation_weight`` 0..1000 (default 1), ``latency_ms`` for ``geoLatency``."""
        body: dict[str, Any] = {}
        if allocation_weight is not None:
            body["allocationWeight"] = allocation_weight
        if latency_ms is not None:
            body["latencyMs"] = latency_ms
        return _as_object(self.request("PUT", f"/hubs/{_segment(name)}", body))

    def remove_hub(self, name: str) -> None:
        """Unlink a hub (its devices are disconnected; DPS no longer assigns to it)."""
        self.request("DELETE", f"/hubs/{_segment(name)}")

    # individual enrollments

    def create_enrollment(
        self,
        registration_id: str,
        *,
        primary_key: str | None = None,
        secondary_key: str | None = None,
        device_id: str | None = None,
        iot_hub_host_name: str | None = None,
        initial_twin: dict[str, Any] | None = None,
        provisioning_status: str = "enabled",
        **allocation: Any,
    ) -> dict[str, Any]:
        """Create (or replace) a symmetric-key enrollment; keys left out are generated.

        ``allocation``: see :func:`allocation_fields` (policy, hubs, webhook, reprovisioning).
        """
        body = _enrollment_body(
            {
                "registrationId": registration_id,
                "attestation": _symmetric_key_attestation(primary_key, secondary_key),
            },
            provisioning_status,
            device_id=device_id,
            iot_hub_host_name=iot_hub_host_name,
            initial_twin=initial_twin,
            allocation=allocation,
        )
        return self.put_enrollment(body)

    def put_enrollment(self, body: dict[str, Any], *, etag: str | None = None) -> dict[str, Any]:
        """PUT an ``IndividualEnrollment`` JSON object; with ``etag``, only over that version."""
        registration_id = body.get("registrationId")
        if not isinstance(registration_id, str) or not registration_id:
            raise ServiceApiError(0, None, "the enrollment needs a registrationId")
        return self._put_object(f"/enrollments/{_segment(registration_id)}", body, etag)

    def get_enrollment(self, registration_id: str) -> dict[str, Any]:
        """One enrollment (404 as :class:`ServiceApiError` if absent)."""
        return self._get_object(f"/enrollments/{_segment(registration_id)}")

    def list_enrollments(self) -> list[dict[str, Any]]:
        """All individual enrollments."""
        return [_as_object(item) for item in self._get_list("/enrollments")]

    def delete_enrollment(self, registration_id: str, *, etag: str | None = None) -> None:
        """Delete an enrollment; with ``etag``, only that version."""
        self._delete_object(f"/enrollments/{_segment(registration_id)}", etag)

    # enrollment groups

    def create_group(
        self,
        group_id: str,
        *,
        primary_key: str | None = None,
        secondary_key: str | None = None,
        iot_hub_host_name: str | None = None,
        initial_twin: dict[str, Any] | None = None,
        provisioning_status: str = "enabled",
        **allocation: Any,
    ) -> dict[str, Any]:
        """Create (or replace) a symmetric-key enrollment group; keys left out are generated.

        ``allocation``: see :func:`allocation_fields` (policy, hubs, webhook, reprovisioning).
        """
        body = _enrollment_body(
            {
                "enrollmentGroupId": group_id,
                "attestation": _symmetric_key_attestation(primary_key, secondary_key),
            },
            provisioning_status,
            iot_hub_host_name=iot_hub_host_name,
            initial_twin=initial_twin,
            allocation=allocation,
        )
        return self.put_group(body)

    def create_x509_enrollment(
        self,
        registration_id: str,
        certificate: str,
        *,
        secondary_certificate: str | None = None,
        device_id: str | None = None,
        iot_hub_host_name: str | None = None,
        initial_twin: dict[str, Any] | None = None,
        provisioning_status: str = "enabled",
        **allocation: Any,
    ) -> dict[str, Any]:
        """Create (or replace) an X.509 individual enrollment: ``certificate`` is the device's
        own certificate (PEM or base64 DER; its CN is the registration id)."""
        body = _enrollment_body(
            {
                "registrationId": registration_id,
                "attestation": _x509_attestation(
                    "clientCertificates", certificate, secondary_certificate
                ),
            },
            provisioning_status,
            device_id=device_id,
            iot_hub_host_name=iot_hub_host_name,
            initial_twin=initial_twin,
            allocation=allocation,
        )
        return self.put_enrollment(body)

    def create_x509_group(
        self,
        group_id: str,
        certificate: str,
        *,
        secondary_certificate: str | None = None,
        iot_hub_host_name: str | None = None,
        initial_twin: dict[str, Any] | None = None,
        provisioning_status: str = "enabled",
        **allocation: Any,
    ) -> dict[str, Any]:
        """Create (or replace) an X.509 enrollment group: ``certificate`` is the root or
        intermediate CA (PEM or base64 DER) that signed its devices' certificates."""
        body = _enrollment_body(
            {
                "enrollmentGroupId": group_id,
                "attestation": _x509_attestation(
                    "signingCertificates", certificate, secondary_certificate
                ),
            },
            provisioning_status,
            iot_hub_host_name=iot_hub_host_name,
            initial_twin=initial_twin,
            allocation=allocation,
        )
        return self.put_group(body)

    def put_group(self, body: dict[str, Any], *, etag: str | None = None) -> dict[str, Any]:
        """PUT an ``EnrollmentGroup`` JSON object; with ``etag``, only over that version."""
        group_id = body.get("enrollmentGroupId")
        if not isinstance(group_id, str) or not group_id:
            raise ServiceApiError(0, None, "the enrollment group needs an enrollmentGroupId")
        return self._put_object(f"/enrollmentGroups/{_segment(group_id)}", body, etag)

    def get_group(self, group_id: str) -> dict[str, Any]:
        """One enrollment group (404 as :class:`ServiceApiError` if absent)."""
        return self._get_object(f"/enrollmentGroups/{_segment(group_id)}")

    def list_groups(self) -> list[dict[str, Any]]:
        """All enrollment groups."""
        return [_as_object(item) for item in self._get_list("/enrollmentGroups")]

    def delete_group(self, group_id: str, *, etag: str | None = None) -> None:
        """Delete an enrollment group; with ``etag``, only that version."""
        self._delete_object(f"/enrollmentGroups/{_segment(group_id)}", etag)

    # registrations

    def list_registrations(self) -> list[dict[str, Any]]:
        """Every device's latest registration record."""
        return [_as_object(item) for item in self._get_list("/registrations")]

    def get_registration(self, registration_id: str) -> dict[str, Any]:
        """One device's registration record (404 as :class:`ServiceApiError` if absent)."""
        return self._get_object(f"/registrations/{_segment(registration_id)}")

    def delete_registration(self, registration_id: str) -> None:
        """Forget a device's registration record."""
        self.request("DELETE", f"/registrations/{_segment(registration_id)}")

    # hub: devices and twins

    def list_devices(self) -> list[dict[str, Any]]:
        """Every hub device identity (created by DPS assignments)."""
        return [_as_object(item) for item in self._get_list("/devices")]

    def get_device(self, device_id: str) -> dict[str, Any]:
        """One hub device identity, with ``connectionState`` and pending C2D count."""
        return self._get_object(f"/devices/{_segment(device_id)}")

    def set_device_status(self, device_id: str, status: str) -> dict[str, Any]:
        """Enable or disable a hub device identity (``"enabled"`` / ``"disabled"``); disabling
        closes its connection and refuses its next ones."""
        body = {"status": status}
        return _as_object(self.request("PATCH", f"/devices/{_segment(device_id)}", body))

    def get_twin(self, device_id: str) -> dict[str, Any]:
        """A device twin: ``tags`` and ``properties.desired`` / ``properties.reported``."""
        return self._get_object(f"/twins/{_segment(device_id)}")

    def update_twin(
        self,
        device_id: str,
        *,
        desired: dict[str, Any] | None = None,
        tags: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Merge-patch tags and desired properties (``None`` members delete); the new twin."""
        body: dict[str, Any] = {}
        if tags is not None:
            body["tags"] = tags
        if desired is not None:
            body["properties"] = {"desired": desired}
        return _as_object(self.request("PATCH", f"/twins/{_segment(device_id)}", body))

    def invoke_method(
        self,
        device_id: str,
        method_name: str,
        payload: Any = None,
        *,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Call a direct method; ``{"status": <device status>, "payload": <JSON>}``.

        ``timeout`` is ``responseTimeoutInSeconds`` (hub default 30 s). A device that is offline
        answers 404, one that does not answer in time 504 (as :class:`ServiceApiError`).
        """
        body: dict[str, Any] = {"methodName": method_name, "payload": payload}
        if timeout is not None:
            body["responseTimeoutInSeconds"] = timeout
        wait = (30.0 if timeout is None else timeout) + self._timeout
        return _as_object(
            self.request("POST", f"/twins/{_segment(device_id)}/methods", body, timeout=wait)
        )

    # hub: cloud-to-device and telemetry

    def send_c2d(
        self,
        device_id: str,
        payload: str | bytes | Any = "",
        *,
        properties: dict[str, str] | None = None,
        **system_properties: str,
    ) -> None:
        """Queue a C2D message. Text is sent as UTF-8, bytes as they are, other values as JSON;
        ``system_properties`` are ``messageId``, ``correlationId``, ``userId``, ``contentType``,
        ``contentEncoding``, ``expiryTimeUtc``."""
        body: dict[str, Any] = dict(system_properties)
        if isinstance(payload, bytes):
            body["payloadBase64"] = base64.b64encode(payload).decode("ascii")
        else:
            body["payload"] = payload
        if properties:
            body["properties"] = properties
        self.request("POST", f"/devices/{_segment(device_id)}/messages/deviceBound", body)

    def telemetry(
        self, device_id: str, since: int = 0, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Stored telemetry of a device with ``seq > since``, oldest first."""
        query = f"?since={int(since)}" + (f"&limit={int(limit)}" if limit is not None else "")
        path = f"/devices/{_segment(device_id)}/messages/events{query}"
        return [_as_object(item) for item in self._get_list(path)]


def _segment(value: str) -> str:
    """Percent-encode one path segment (``/`` included); an empty id is refused here."""
    if not value:
        raise ServiceApiError(0, None, "an id must not be empty")
    return quote(value, safe="")


def _as_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ServiceApiError(200, None, "expected a JSON object from the service API")
    return value


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is `dps-mqtt emulator` running?)"
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return "timed out"
    return str(exc) or type(exc).__name__
