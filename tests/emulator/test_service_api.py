"""Tests of the emulator's service API: every route through ServiceClient and raw http.client."""

from __future__ import annotations

import base64
import http.client
import json
import logging
import re
import socket
import string
import threading
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.models import RegistrationRecord
from emulator.service_api import MAX_BODY_BYTES, Request, Response, ServiceApi
from emulator.service_client import ServiceApiError, ServiceClient
from emulator.store import Store

KEY_A = base64.b64encode(bytes(range(32))).decode()
KEY_B = base64.b64encode(bytes(range(32, 64))).decode()
HUB = "hub1.example.net"
INFO = {"idScope": "0ne00000A0A", "serviceApi": "x", "caCertificate": "/tmp/ca.pem"}
START = 1_800_000_000.0
TIMESTAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{6}Z")
ID_CHARS = string.ascii_letters + string.digits + "-._:"
TIMEOUT = 10.0


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store() -> Iterator[Store]:
    with Store() as db:
        db.add_hub(HUB)
        db.add_hub("hub2.example.net")
        yield db


@pytest.fixture
def api(store: Store, clock: FakeClock) -> Iterator[ServiceApi]:
    server = ServiceApi(store, lambda: dict(INFO), clock=clock)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(api: ServiceApi) -> ServiceClient:
    return ServiceClient(api.url, timeout=TIMEOUT)


def raw(
    api: ServiceApi,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    """One request through http.client; the answer's status, headers and decoded JSON (or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=TIMEOUT)
    try:
        send = dict(headers or {})
        if body is not None and "Content-Type" not in send:
            send["Content-Type"] = "application/json"
        conn.request(method, path, body=body, headers=send)
        response = conn.getresponse()
        data = response.read()
        answer = {k.lower(): v for k, v in response.getheaders()}
        return response.status, answer, json.loads(data) if data else None
    finally:
        conn.close()


def assert_error(body: Any, error_code: int) -> None:
    """Azure's error shape: errorCode, message, trackingId (a UUID) and timestampUtc."""
    assert isinstance(body, dict)
    assert body["errorCode"] == error_code
    assert isinstance(body["message"], str) and body["message"]
    uuid.UUID(body["trackingId"])
    assert TIMESTAMP_RE.fullmatch(body["timestampUtc"])


def enrollment_body(registration_id: str = "device-1", **extra: Any) -> dict[str, Any]:
    return {
        "registrationId": registration_id,
        "attestation": {
            "type": "symmetricKey",
            "symmetricKey": {"primaryKey": KEY_A, "secondaryKey": KEY_B},
        },
        **extra,
    }


def snapshot(store: Store) -> tuple[list[Any], list[Any], list[Any]]:
    return (
        [e.to_json() for e in store.list_enrollments()],
        [g.to_json() for g in store.list_groups()],
        [r.to_json() for r in store.list_registrations()],
    )


def registration(registration_id: str, group: str | None = None) -> RegistrationRecord:
    return RegistrationRecord(
        registration_id=registration_id,
        status="assigned",
        assigned_hub=HUB,
        device_id=registration_id,
        substatus="initialAssignment",
        created="2026-11-28T16:57:35.123456Z",
        last_updated="2026-11-28T16:57:35.123456Z",
        etag="abc",
        enrollment_group_id=group,
    )


# ---------------------------------------------------------------------------- lifecycle, info


def test_info_and_hubs(client: ServiceClient, api: ServiceApi) -> None:
    assert client.info() == INFO
    assert client.list_hubs() == [HUB, "hub2.example.net"]
    assert api.url == f"http://127.0.0.1:{api.port}"


def test_port_before_start_and_double_stop(store: Store) -> None:
    server = ServiceApi(store, dict)
    with pytest.raises(Exception, match="not started"):
        _ = server.port
    server.start()
    try:
        with pytest.raises(Exception, match="already started"):
            server.start()
    finally:
        server.stop()
    server.stop()


def test_query_string_is_ignored(api: ServiceApi) -> None:
    status, _, body = raw(api, "GET", "/info?api-version=2021-10-01")
    assert status == 200
    assert body == INFO


# ---------------------------------------------------------------------------- enrollments


def test_enrollment_crud(client: ServiceClient, clock: FakeClock) -> None:
    created = client.create_enrollment(
        "Device-1",
        primary_key=KEY_A,
        secondary_key=KEY_B,
        device_id="Device-One",
        iot_hub_host_name=HUB,
        initial_twin={"tags": {"site": "a"}, "properties": {"desired": {"rate": 5}}},
    )
    assert created["registrationId"] == "device-1"
    assert created["deviceId"] == "Device-One"
    assert created["attestation"]["symmetricKey"] == {"primaryKey": KEY_A, "secondaryKey": KEY_B}
    assert created["iotHubHostName"] == HUB
    assert created["provisioningStatus"] == "enabled"
    assert created["createdDateTimeUtc"] == created["lastUpdatedDateTimeUtc"]
    assert created["etag"]
    assert client.get_enrollment("DEVICE-1") == created
    assert client.list_enrollments() == [created]

    clock.now += 60
    replaced = client.put_enrollment({**created, "provisioningStatus": "disabled"})
    assert replaced["provisioningStatus"] == "disabled"
    assert replaced["createdDateTimeUtc"] == created["createdDateTimeUtc"]
    assert replaced["lastUpdatedDateTimeUtc"] != created["lastUpdatedDateTimeUtc"]
    assert replaced["etag"] != created["etag"]

    client.delete_enrollment("device-1")
    assert client.list_enrollments() == []
    with pytest.raises(ServiceApiError) as excinfo:
        client.get_enrollment("device-1")
    assert (excinfo.value.status, excinfo.value.error_code) == (404, 404201)
    with pytest.raises(ServiceApiError) as excinfo:
        client.delete_enrollment("device-1")
    assert excinfo.value.status == 404


def test_enrollment_keys_are_generated(client: ServiceClient) -> None:
    created = client.create_enrollment("device-2")
    keys = created["attestation"]["symmetricKey"]
    assert len(base64.b64decode(keys["primaryKey"], validate=True)) == 32
    assert len(base64.b64decode(keys["secondaryKey"], validate=True)) == 32
    assert keys["primaryKey"] != keys["secondaryKey"]


def test_enrollment_read_only_fields_are_ignored(api: ServiceApi, clock: FakeClock) -> None:
    body = enrollment_body(
        createdDateTimeUtc="2001-01-01T00:00:00.000000Z",
        lastUpdatedDateTimeUtc="2001-01-01T00:00:00.000000Z",
        etag="made-up",
    )
    status, headers, stored = raw(api, "PUT", "/enrollments/device-1", json.dumps(body).encode())
    assert status == 200
    assert not stored["createdDateTimeUtc"].startswith("2001")
    assert stored["etag"] != "made-up"
    assert headers["etag"] == f'"{stored["etag"]}"'


def test_enrollment_id_is_taken_from_path_and_must_match(api: ServiceApi) -> None:
    body = enrollment_body()
    del body["registrationId"]
    status, _, stored = raw(api, "PUT", "/enrollments/from-path", json.dumps(body).encode())
    assert status == 200
    assert stored["registrationId"] == "from-path"

    body = enrollment_body("DEVICE-9")
    status, _, stored = raw(api, "PUT", "/enrollments/device-9", json.dumps(body).encode())
    assert status == 200
    assert stored["registrationId"] == "device-9"

    body = enrollment_body("other")
    status, _, error = raw(api, "PUT", "/enrollments/device-9", json.dumps(body).encode())
    assert status == 400
    assert_error(error, 400004)


def test_percent_encoded_ids(api: ServiceApi, client: ServiceClient) -> None:
    client.create_enrollment("dev:1")
    status, _, body = raw(api, "GET", "/enrollments/dev%3A1")
    assert status == 200
    assert body["registrationId"] == "dev:1"
    status, _, body = raw(api, "GET", "/enrollments/a%2Fb")
    assert status == 400
    assert_error(body, 400004)
    status, _, body = raw(api, "GET", "/enrollments/%FF")
    assert status == 400
    assert_error(body, 400004)


def test_unlinked_hub_is_refused(client: ServiceClient, store: Store) -> None:
    with pytest.raises(ServiceApiError) as excinfo:
        client.create_enrollment("device-1", iot_hub_host_name="elsewhere.example.net")
    assert (excinfo.value.status, excinfo.value.error_code) == (400, 400004)
    with pytest.raises(ServiceApiError):
        client.put_enrollment(enrollment_body(iotHubs=[HUB, "elsewhere.example.net"]))
    assert store.list_enrollments() == []


def test_if_match(api: ServiceApi, client: ServiceClient) -> None:
    created = client.create_enrollment("device-1")
    updated = client.put_enrollment({**created, "deviceId": "x"}, etag=created["etag"])
    assert updated["deviceId"] == "x"
    with pytest.raises(ServiceApiError) as excinfo:
        client.put_enrollment({**created, "deviceId": "y"}, etag=created["etag"])
    assert (excinfo.value.status, excinfo.value.error_code) == (412, 412002)
    with pytest.raises(ServiceApiError) as excinfo:
        client.delete_enrollment("device-1", etag=created["etag"])
    assert excinfo.value.status == 412
    assert client.get_enrollment("device-1")["deviceId"] == "x"

    body = json.dumps(enrollment_body("device-2")).encode()
    status, _, error = raw(api, "PUT", "/enrollments/device-2", body, {"If-Match": "*"})
    assert status == 412
    assert_error(error, 412002)
    body = json.dumps(enrollment_body()).encode()
    status, _, error = raw(api, "PUT", "/enrollments/device-1", body, {"If-Match": '"nope"'})
    assert status == 412
    status, _, stored = raw(
        api, "PUT", "/enrollments/device-1", json.dumps(enrollment_body()).encode(),
        {"If-Match": "*"},
    )
    assert status == 200
    status, _, _ = raw(api, "DELETE", "/enrollments/device-1", None, {"If-Match": stored["etag"]})
    assert status == 204


# ---------------------------------------------------------------------------- groups


def test_group_crud(client: ServiceClient, clock: FakeClock) -> None:
    created = client.create_group(
        "Group-A", primary_key=KEY_A, iot_hub_host_name=HUB, provisioning_status="disabled"
    )
    assert created["enrollmentGroupId"] == "group-a"
    assert created["attestation"]["symmetricKey"]["primaryKey"] == KEY_A
    assert created["provisioningStatus"] == "disabled"
    assert client.get_group("group-a") == created
    assert client.list_groups() == [created]

    clock.now += 5
    replaced = client.put_group({**created, "provisioningStatus": "enabled"}, etag=created["etag"])
    assert replaced["createdDateTimeUtc"] == created["createdDateTimeUtc"]
    assert replaced["lastUpdatedDateTimeUtc"] != created["lastUpdatedDateTimeUtc"]
    with pytest.raises(ServiceApiError) as excinfo:
        client.put_group(created, etag=created["etag"])
    assert excinfo.value.status == 412

    client.delete_group("GROUP-A")
    with pytest.raises(ServiceApiError) as excinfo:
        client.get_group("group-a")
    assert (excinfo.value.status, excinfo.value.error_code) == (404, 404204)
    with pytest.raises(ServiceApiError):
        client.delete_group("group-a")


def test_group_rejects_tpm_and_mismatched_id(api: ServiceApi, store: Store) -> None:
    body = {"enrollmentGroupId": "g", "attestation": {"type": "tpm"}}
    status, _, error = raw(api, "PUT", "/enrollmentGroups/g", json.dumps(body).encode())
    assert status == 400
    assert_error(error, 400004)
    body = {"enrollmentGroupId": "h", "attestation": {"type": "symmetricKey"}}
    status, _, _ = raw(api, "PUT", "/enrollmentGroups/g", json.dumps(body).encode())
    assert status == 400
    assert store.list_groups() == []


# ---------------------------------------------------------------------------- registrations


def test_registrations(client: ServiceClient, store: Store) -> None:
    assert client.list_registrations() == []
    store.put_registration(registration("device-1"))
    store.put_registration(registration("device-2", group="group-a"))
    listed = client.list_registrations()
    assert [r["registrationId"] for r in listed] == ["device-1", "device-2"]
    shown = client.get_registration("Device-2")
    assert shown["assignedHub"] == HUB
    assert shown["symmetricKey"] == {"enrollmentGroupId": "group-a"}
    client.delete_registration("device-1")
    with pytest.raises(ServiceApiError) as excinfo:
        client.get_registration("device-1")
    assert (excinfo.value.status, excinfo.value.error_code) == (404, 404202)
    with pytest.raises(ServiceApiError) as excinfo:
        client.delete_registration("device-1")
    assert excinfo.value.status == 404
    assert [r["registrationId"] for r in client.list_registrations()] == ["device-2"]


# ---------------------------------------------------------------------------- HTTP errors


def test_unknown_route_and_wrong_method(api: ServiceApi) -> None:
    status, _, body = raw(api, "GET", "/nope")
    assert status == 404
    assert_error(body, 404001)
    status, _, body = raw(api, "GET", "/enrollments/a/b")
    assert status == 404
    status, headers, body = raw(api, "POST", "/enrollments/device-1", b"{}")
    assert status == 405
    assert_error(body, 405001)
    assert headers["allow"] == "DELETE, GET, PUT"
    status, _, body = raw(api, "DELETE", "/enrollments")
    assert status == 405
    status, _, body = raw(api, "BREW", "/info")
    assert status == 501
    assert_error(body, 501001)


def test_length_required_and_bad_length(api: ServiceApi) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=TIMEOUT)
    try:
        conn.putrequest("PUT", "/enrollments/device-1")
        conn.putheader("Content-Type", "application/json")
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 411
        assert_error(json.loads(response.read()), 411001)
    finally:
        conn.close()
    status, _, body = raw(api, "PUT", "/enrollments/device-1", None, {"Content-Length": "-1"})
    assert status == 400
    assert_error(body, 400004)
    status, _, body = raw(api, "PUT", "/enrollments/device-1", None, {"Content-Length": "abc"})
    assert status == 400
    status, _, body = raw(
        api, "PUT", "/enrollments/device-1", None,
        {"Transfer-Encoding": "chunked", "Content-Type": "application/json"},
    )
    assert status == 411


def test_body_too_large_is_refused_before_reading(api: ServiceApi, store: Store) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", api.port, timeout=TIMEOUT)
    try:
        conn.putrequest("PUT", "/enrollments/device-1")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(MAX_BODY_BYTES + 1))
        conn.endheaders()
        response = conn.getresponse()
        assert response.status == 413
        assert_error(json.loads(response.read()), 413001)
    finally:
        conn.close()
    status, _, _ = raw(api, "PUT", "/enrollments/x", None, {"Content-Length": "9" * 40})
    assert status == 413
    client = ServiceClient(api.url)
    with pytest.raises(ServiceApiError) as excinfo:
        client.put_enrollment(enrollment_body(initialTwin={"tags": {"pad": "a" * MAX_BODY_BYTES}}))
    assert excinfo.value.status == 413
    assert store.list_enrollments() == []


def test_bad_bodies(api: ServiceApi, store: Store) -> None:
    huge_float = json.dumps(enrollment_body(initialTwin={"tags": {"x": 1}})).replace(
        '"x": 1', '"x": 1e999'
    )
    bodies = (b"{", b"\xff\xfe", b"[]", b"42", b"null", b'{"a": NaN}', b"[" * 100_000, b"")
    for body in (*bodies, huge_float.encode()):
        status, _, error = raw(api, "PUT", "/enrollments/device-1", body)
        assert status == 400, body[:20]
        assert_error(error, 400004)
    status, _, error = raw(
        api, "PUT", "/enrollments/device-1", b"{}", {"Content-Type": "text/plain"}
    )
    assert status == 415
    assert_error(error, 415001)
    assert store.list_enrollments() == []


def test_foreign_host_header_is_refused(api: ServiceApi) -> None:
    status, _, body = raw(api, "GET", "/enrollments", None, {"Host": "attacker.example"})
    assert status == 403
    assert_error(body, 403002)
    for host in ("localhost", f"localhost:{api.port}", "127.0.0.1", "[::1]:80"):
        status, _, _ = raw(api, "GET", "/enrollments", None, {"Host": host})
        assert status == 200, host


def test_handler_crash_is_a_500_and_the_server_lives(
    api: ServiceApi, caplog: pytest.LogCaptureFixture
) -> None:
    def boom(request: Request) -> Response:
        raise RuntimeError("secret detail")

    api.add_route("GET", "/boom", boom)
    with caplog.at_level(logging.ERROR, logger="emulator.service_api"):
        status, _, body = raw(api, "GET", "/boom")
    assert status == 500
    assert_error(body, 500001)
    assert "secret detail" not in body["message"]
    assert any(record.exc_info for record in caplog.records)
    status, _, _ = raw(api, "GET", "/info")
    assert status == 200


def test_added_routes_get_decoded_params(api: ServiceApi) -> None:
    seen: list[Request] = []

    def twin(request: Request) -> Response:
        seen.append(request)
        return Response(200, {"deviceId": request.params["deviceId"], "body": request.json()})

    api.add_route("PATCH", "/devices/{deviceId}/twin", twin)
    status, _, body = raw(api, "PATCH", "/devices/my%20device/twin?api-version=1", b'{"a": 1}')
    assert status == 200
    assert body == {"deviceId": "my device", "body": {"a": 1}}
    assert seen[0].query == {"api-version": ["1"]}
    status, _, _ = raw(api, "GET", "/devices/x/twin")
    assert status == 405


def test_keys_are_not_logged(api: ServiceApi, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        raw(api, "PUT", "/enrollments/device-1", json.dumps(enrollment_body()).encode())
        raw(api, "GET", "/enrollments/device-1")
    assert caplog.records
    assert KEY_A not in caplog.text
    assert KEY_B not in caplog.text


# ---------------------------------------------------------------------------- robustness


def test_concurrent_requests(client: ServiceClient, store: Store) -> None:
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for n in range(8):
                rid = f"dev-{index}-{n}"
                client.create_enrollment(rid, primary_key=KEY_A, secondary_key=KEY_B)
                assert client.get_enrollment(rid)["registrationId"] == rid
                client.list_enrollments()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT * 3)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert len(store.list_enrollments()) == 64


def test_partial_requests_do_not_hurt_the_server(api: ServiceApi, store: Store) -> None:
    partials = (
        b"PUT /enrollments/device-1 HTT",
        b"PUT /enrollments/device-1 HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Le",
        b"PUT /enrollments/device-1 HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"registrationId",
        b"\x00\x01\x02garbage\r\n\r\n",
    )
    for data in partials:
        with socket.create_connection(("127.0.0.1", api.port), timeout=TIMEOUT) as sock:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(TIMEOUT)
            while sock.recv(4096):
                pass
    status, _, body = raw(api, "GET", "/info")
    assert (status, body) == (200, INFO)
    assert store.list_enrollments() == []


# ---------------------------------------------------------------------------- property-based

_BAD_CHAR = st.characters(exclude_categories=["Cs"], exclude_characters=ID_CHARS)
_GOOD_ID = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=20)
_BAD_IDS = st.one_of(
    st.just("a" * 129),
    st.text(alphabet=ID_CHARS, min_size=129, max_size=200),
    st.builds(lambda a, c, b: a + c + b, _GOOD_ID, _BAD_CHAR, _GOOD_ID),
    st.sampled_from([".abc", "abc.", "_x", "x:", ""]),
)
_BAD_KEYS = st.one_of(
    st.binary(min_size=1, max_size=15).map(lambda b: base64.b64encode(b).decode()),
    st.binary(min_size=65, max_size=100).map(lambda b: base64.b64encode(b).decode()),
    st.text(min_size=1, max_size=50).filter(lambda t: not re.fullmatch(r"[A-Za-z0-9+/=]*", t)),
    st.sampled_from(["AAAA", "A===", KEY_A[:-1], KEY_A + "A", 42, [], {}]),
)
_NON_OBJECTS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.text(max_size=20),
    st.lists(st.integers(), max_size=3),
)


def _bad_id_body(bad_id: str) -> tuple[str, bytes]:
    return quote("device-1", safe=""), json.dumps(enrollment_body(bad_id)).encode()


def _bad_path_id(bad_id: str) -> tuple[str, bytes]:
    body = enrollment_body()
    del body["registrationId"]
    return quote(bad_id, safe="") or "%20", json.dumps(body).encode()


def _bad_key(key: object) -> tuple[str, bytes]:
    body = enrollment_body()
    body["attestation"]["symmetricKey"]["primaryKey"] = key
    return "device-1", json.dumps(body).encode()


_BAD_REQUESTS = st.one_of(
    _BAD_IDS.map(_bad_id_body),
    _BAD_IDS.map(_bad_path_id),
    _BAD_KEYS.map(_bad_key),
    _NON_OBJECTS.map(lambda v: ("device-1", json.dumps(v).encode())),
    st.binary(max_size=200).map(lambda b: ("device-1", b)),
)


@pytest.fixture(scope="module")
def shared_api() -> Iterator[tuple[ServiceApi, Store]]:
    with Store() as db:
        db.add_hub(HUB)
        server = ServiceApi(db, dict)
        server.start()
        try:
            yield server, db
        finally:
            server.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=_BAD_REQUESTS, kind=st.sampled_from(["enrollments", "enrollmentGroups"]))
def test_invalid_bodies_are_400_and_change_nothing(
    shared_api: tuple[ServiceApi, Store], request: tuple[str, bytes], kind: str
) -> None:
    api, store = shared_api
    path_id, body = request
    if kind == "enrollmentGroups":
        body = body.replace(b'"registrationId"', b'"enrollmentGroupId"')
    before = snapshot(store)
    status, _, error = raw(api, "PUT", f"/{kind}/{path_id}", body)
    assert status == 400
    assert_error(error, 400004)
    assert snapshot(store) == before
