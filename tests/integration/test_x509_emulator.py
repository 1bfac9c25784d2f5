"""X.509 attestation and CSR certificate issuance, device stack against the emulator over real
loopback TLS: DPS over MQTT and HTTPS, then the hub with the certificate.

The PKI is made fresh in every test (tests/support/pki.py); nothing is checked in.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from dps_proto import (
    Assignment,
    DpsConnectionError,
    DpsServiceError,
    RegistrationDisabled,
    chain_pem,
    generate_key_and_csr,
    provision,
    provision_https,
)
from emulator.server import Emulator
from emulator.service_client import ServiceClient
from hub_proto import HubClient, Message, TicketState
from tests.conftest import ID_SCOPE
from tests.support.pki import expired, make_cert

# -- helpers ------------------------------------------------------------------------------------


def _dps(emulator: Emulator, registration_id: str, *, https: bool = False) -> dict[str, Any]:
    assert emulator.https is not None
    return {
        "provisioning_host": "localhost",
        "port": emulator.https.port if https else emulator.mqtt_port,
        "ca_file": str(emulator.ca_file),
        "id_scope": ID_SCOPE,
        "registration_id": registration_id,
        "timeout": 20.0,
    }


def _provision(
    emulator: Emulator, registration_id: str, cert: str, key: str, *, https: bool = False
) -> Assignment:
    register = provision_https if https else provision
    return register(
        client_cert=cert, client_key=key, **_dps(emulator, registration_id, https=https)
    )


def _hub_round_trip(emulator: Emulator, assignment: Assignment, cert: str, key: str) -> None:
    """Connect to the assigned hub with the certificate and get one message acknowledged."""
    with HubClient.from_assignment(
        assignment,
        client_cert=cert,
        client_key=key,
        port=emulator.mqtt_port,
        ca_file=str(emulator.ca_file),
    ) as hub:
        hub.connect(timeout=15)
        ticket = hub.send_message(Message(b'{"x509": true}'))
        assert hub.wait_for(ticket, timeout=15) is TicketState.ACKNOWLEDGED
        assert "desired" in hub.get_twin(timeout=15)


def _refused_over_mqtt(emulator: Emulator, registration_id: str, cert: str, key: str) -> None:
    with pytest.raises(DpsConnectionError) as info:
        _provision(emulator, registration_id, cert, key)
    assert info.value.return_code == 5  # CONNACK "not authorized"


def _refused_over_https(emulator: Emulator, registration_id: str, cert: str, key: str) -> None:
    with pytest.raises(DpsServiceError) as info:
        _provision(emulator, registration_id, cert, key, https=True)
    assert (info.value.status, info.value.error_code) == (401, 401002)
    assert "Invalid certificate." in str(info.value)


# -- individual enrollments ---------------------------------------------------------------------


def test_individual_x509_over_mqtt_and_https_then_the_hub(
    emulator: Emulator, service: ServiceClient, tmp_path: Path
) -> None:
    device = make_cert("x509-dev-1")
    cert, key = device.write(tmp_path, "dev")
    created = service.create_x509_enrollment("x509-dev-1", device.pem, device_id="hub-x509-1")
    info = created["attestation"]["x509"]["clientCertificates"]["primary"]["info"]
    sha256 = device.cert.fingerprint(hashes.SHA256()).hex().upper()
    assert info["sha256Thumbprint"] == sha256 and info["subjectName"] == "CN=x509-dev-1"

    over_mqtt = _provision(emulator, "x509-dev-1", cert, key)
    over_https = _provision(emulator, "x509-dev-1", cert, key, https=True)

    for assignment in (over_mqtt, over_https):
        assert (assignment.assigned_hub, assignment.device_id) == ("localhost", "hub-x509-1")
        state = assignment.state.x509
        assert state is not None and state["certificateInfo"]["sha256Thumbprint"] == sha256
        assert assignment.state.symmetric_key_group is None
    record = service.get_registration("x509-dev-1")
    assert record["x509"]["certificateInfo"]["subjectName"] == "CN=x509-dev-1"
    assert "symmetricKey" not in record
    auth = service.get_device("hub-x509-1")["authentication"]
    assert auth["type"] == "selfSigned"
    assert auth["x509Thumbprint"]["primaryThumbprint"] == sha256

    _hub_round_trip(emulator, over_mqtt, cert, key)


def test_enrollment_created_just_before_is_trusted_without_sni(
    emulator: Emulator, service: ServiceClient, tmp_path: Path
) -> None:
    """The TLS anchors follow the enrollments, also for clients that send no SNI (an IP)."""
    device = make_cert("x509-ip")
    cert, key = device.write(tmp_path, "dev")
    service.create_x509_enrollment("x509-ip", device.pem)

    assignment = provision(
        client_cert=cert,
        client_key=key,
        **{**_dps(emulator, "x509-ip"), "provisioning_host": "127.0.0.1"},
    )
    assert assignment.device_id == "x509-ip"


def test_key_in_the_certificate_file_and_secondary_certificate(
    emulator: Emulator, service: ServiceClient, tmp_path: Path
) -> None:
    old, new = make_cert("x509-rollover"), make_cert("x509-rollover")
    service.create_x509_enrollment("x509-rollover", old.pem, secondary_certificate=new.pem)
    both = tmp_path / "both.pem"
    both.write_bytes(new.pem.encode() + new.key_pem)

    assignment = provision(client_cert=str(both), **_dps(emulator, "x509-rollover"))

    _hub_round_trip(emulator, assignment, str(both), str(both))


# -- groups -------------------------------------------------------------------------------------


def test_group_by_root_ca_and_by_intermediate(
    emulator: Emulator, service: ServiceClient, tmp_path: Path
) -> None:
    root = make_cert("Test Root CA", ca=True)
    intermediate = make_cert("Test Intermediate CA", issuer=root, ca=True, path_length=0)
    other_root = make_cert("Other Root CA", ca=True)
    service.create_x509_group("by-root", root.pem)
    service.create_x509_group("by-intermediate", other_root.pem)
    second_intermediate = make_cert("Second Intermediate", issuer=other_root, ca=True)
    service.create_x509_group("by-second-intermediate", second_intermediate.pem)

    # Leaf signed by the enrolled root itself.
    direct = make_cert("grp-direct", issuer=root)
    cert, key = direct.write(tmp_path, "direct")
    assignment = _provision(emulator, "grp-direct", cert, key)
    assert assignment.state.x509 is not None
    assert assignment.state.x509["enrollmentGroupId"] == "by-root"
    assert assignment.device_id == "grp-direct"

    # Leaf signed by an intermediate the device presents; the group enrolled the root.
    chained = make_cert("grp-chained", issuer=intermediate)
    cert, key = chained.write(tmp_path, "chained", intermediate)
    assignment = _provision(emulator, "grp-chained", cert, key, https=True)
    assert assignment.state.x509 is not None
    assert assignment.state.x509["enrollmentGroupId"] == "by-root"
    assert service.get_device("grp-chained")["authentication"]["type"] == "certificateAuthority"
    _hub_round_trip(emulator, assignment, cert, key)

    # The group enrolled the intermediate: the leaf alone is enough.
    under = make_cert("grp-under-intermediate", issuer=second_intermediate)
    cert, key = under.write(tmp_path, "under")
    assignment = _provision(emulator, "grp-under-intermediate", cert, key)
    assert assignment.state.x509 is not None
    assert assignment.state.x509["enrollmentGroupId"] == "by-second-intermediate"

    # Without the intermediate in its chain, a device of the root group cannot be verified.
    missing = make_cert("grp-missing", issuer=intermediate)
    cert, key = missing.write(tmp_path, "missing")
    with pytest.raises(DpsConnectionError):
        _provision(emulator, "grp-missing", cert, key)


# -- refusals -----------------------------------------------------------------------------------


def test_refusals_carry_azures_codes(
    emulator: Emulator, service: ServiceClient, tmp_path: Path
) -> None:
    root = make_cert("Refusal Root", ca=True)
    service.create_x509_group("refusals", root.pem)

    # Expired leaf from the enrolled CA: the handshake passes, DPS refuses (401002 / CONNACK 5).
    cert, key = expired("old-dev", issuer=root).write(tmp_path, "expired")
    _refused_over_mqtt(emulator, "old-dev", cert, key)
    _refused_over_https(emulator, "old-dev", cert, key)

    # CN is not the registration id.
    cert, key = make_cert("real-name", issuer=root).write(tmp_path, "cn")
    _refused_over_mqtt(emulator, "other-name", cert, key)
    _refused_over_https(emulator, "other-name", cert, key)

    # An individual enrollment holds another certificate: it wins over the group.
    service.create_x509_enrollment("pinned", make_cert("pinned").pem)
    cert, key = make_cert("pinned", issuer=root).write(tmp_path, "pinned")
    _refused_over_mqtt(emulator, "pinned", cert, key)
    _refused_over_https(emulator, "pinned", cert, key)

    # A CA the emulator has never seen: refused in the TLS handshake (stdlib ssl has no verify
    # callback), a connection error rather than 401002.
    stranger = make_cert("Stranger CA", ca=True)
    cert, key = make_cert("stranger-dev", issuer=stranger).write(tmp_path, "stranger")
    with pytest.raises(DpsConnectionError, match=r"certificate|CONNACK"):
        _provision(emulator, "stranger-dev", cert, key)
    with pytest.raises(DpsConnectionError, match="certificate"):
        _provision(emulator, "stranger-dev", cert, key, https=True)

    # A deleted group's CA stays a TLS anchor, but DPS refuses its devices.
    service.delete_group("refusals")
    cert, key = make_cert("after-delete", issuer=root).write(tmp_path, "after")
    _refused_over_https(emulator, "after-delete", cert, key)


def test_disabled_x509_enrollment_and_group(
    emulator: Emulator, service: ServiceClient, tmp_path: Path
) -> None:
    device = make_cert("x509-off")
    service.create_x509_enrollment("x509-off", device.pem, provisioning_status="disabled")
    cert, key = device.write(tmp_path, "off")
    with pytest.raises(RegistrationDisabled):
        _provision(emulator, "x509-off", cert, key)
    with pytest.raises(RegistrationDisabled):
        _provision(emulator, "x509-off", cert, key, https=True)
    assert service.get_registration("x509-off")["status"] == "disabled"

    root = make_cert("Disabled Group CA", ca=True)
    service.create_x509_group("off-group", root.pem, provisioning_status="disabled")
    cert, key = make_cert("off-group-dev", issuer=root).write(tmp_path, "off-group")
    with pytest.raises(RegistrationDisabled):
        _provision(emulator, "off-group-dev", cert, key)


def test_hub_refuses_another_devices_certificate(
    emulator: Emulator, service: ServiceClient, tmp_path: Path
) -> None:
    first, second = make_cert("hub-a"), make_cert("hub-b")
    service.create_x509_enrollment("hub-a", first.pem)
    service.create_x509_enrollment("hub-b", second.pem)
    cert_a, key_a = first.write(tmp_path, "a")
    cert_b, key_b = second.write(tmp_path, "b")
    assignment = _provision(emulator, "hub-a", cert_a, key_a)
    _provision(emulator, "hub-b", cert_b, key_b)

    from hub_proto import HubAuthError, HubError

    with (
        HubClient.from_assignment(
            assignment,
            client_cert=cert_b,  # hub-b's certificate for device hub-a
            client_key=key_b,
            port=emulator.mqtt_port,
            ca_file=str(emulator.ca_file),
            max_auth_failures=1,
        ) as hub,
        pytest.raises((HubAuthError, HubError)),
    ):
        hub.connect(timeout=10)


# -- certificate issuance (CSR) -----------------------------------------------------------------


def test_csr_over_mqtt_issues_a_certificate_the_hub_accepts(
    emulator: Emulator, service: ServiceClient, tmp_path: Path
) -> None:
    enrollment = service.create_enrollment("csr-dev")
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]
    key_pem, csr_der = generate_key_and_csr("csr-dev")

    assignment = provision(symmetric_key=key, csr=csr_der, **_dps(emulator, "csr-dev"))

    chain = assignment.issued_certificate_chain
    assert chain is not None and len(chain) == 2
    leaf = x509.load_der_x509_certificate(base64.b64decode(chain[0]))
    ca = x509.load_pem_x509_certificate(emulator.ca_file.read_bytes())
    leaf.verify_directly_issued_by(ca)
    assert base64.b64decode(chain[1]) == ca.public_bytes(serialization.Encoding.DER)
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "csr-dev"
    usage = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in usage
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 29 < lifetime.total_seconds() / 86400 <= 31

    cert_file, key_file = tmp_path / "issued.pem", tmp_path / "issued.key"
    cert_file.write_bytes(chain_pem(chain))
    key_file.write_bytes(key_pem)
    _hub_round_trip(emulator, assignment, str(cert_file), str(key_file))
    auth = service.get_device("csr-dev")["authentication"]
    assert auth["type"] == "sas" and "x509Thumbprint" in auth


def test_x509_device_with_csr_over_https(
    emulator: Emulator, service: ServiceClient, tmp_path: Path
) -> None:
    device = make_cert("x509-csr")
    service.create_x509_enrollment("x509-csr", device.pem)
    cert, key = device.write(tmp_path, "dev")
    _, csr_der = generate_key_and_csr("x509-csr")

    assignment = provision_https(
        client_cert=cert, client_key=key, csr=csr_der, **_dps(emulator, "x509-csr", https=True)
    )

    assert assignment.issued_certificate_chain is not None
    assert assignment.state.x509 is not None


def _csr(registration_id: str, key: Any) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, registration_id)])
    request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("make_csr", "message"),
    [
        (lambda: _csr("someone-else", ec.generate_private_key(ec.SECP384R1())), "subject CN"),
        (lambda: _csr("csr-bad", rsa.generate_private_key(65537, 2048)), "EC P-384"),
        (lambda: _csr("csr-bad", ec.generate_private_key(ec.SECP256R1())), "secp256r1"),
    ],
    ids=["wrong-cn", "rsa-key", "p256-key"],
)
def test_bad_csr_is_a_400_with_a_clear_message(
    emulator: Emulator, service: ServiceClient, make_csr: Any, message: str
) -> None:
    enrollment = service.create_enrollment("csr-bad")
    key = enrollment["attestation"]["symmetricKey"]["primaryKey"]

    with pytest.raises(DpsServiceError, match=message) as info:
        provision(symmetric_key=key, csr=make_csr(), **_dps(emulator, "csr-bad"))

    assert (info.value.status, info.value.error_code) == (400, 400004)
    with pytest.raises(Exception, match="does not exist"):
        service.get_registration("csr-bad")  # refused before any assignment


def test_csr_with_an_old_api_version_is_refused_by_the_device_stack(emulator: Emulator) -> None:
    _, csr_der = generate_key_and_csr("old-api")
    with pytest.raises(Exception, match="2025-07-01-preview"):
        provision(
            symmetric_key=base64.b64encode(b"k" * 32).decode(),
            csr=csr_der,
            api_version="2021-06-01",
            **_dps(emulator, "old-api"),
        )


def test_x509_with_the_asyncio_transports(
    emulator: Emulator, service: ServiceClient, tmp_path: Path
) -> None:
    import asyncio

    from dps_proto import provision_async, provision_https_async
    from hub_proto import AsyncHubClient

    device = make_cert("x509-async")
    service.create_x509_enrollment("x509-async", device.pem)
    cert, key = device.write(tmp_path, "dev")

    async def main() -> None:
        assignment = await provision_async(
            client_cert=cert, client_key=key, **_dps(emulator, "x509-async")
        )
        again = await provision_https_async(
            client_cert=cert, client_key=key, **_dps(emulator, "x509-async", https=True)
        )
        assert again.device_id == assignment.device_id == "x509-async"
        async with AsyncHubClient.from_assignment(
            assignment,
            client_cert=cert,
            client_key=key,
            port=emulator.mqtt_port,
            ca_file=str(emulator.ca_file),
        ) as hub:
            await hub.connect(timeout=15)
            ticket = await hub.send_message(Message(b"async"))
            assert await hub.wait_for(ticket, timeout=15) is TicketState.ACKNOWLEDGED

    asyncio.run(main())
