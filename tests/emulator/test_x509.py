"""X.509 in the emulator: enrolled certificates, chain verification, CSRs and issuance, the
attestation model, the DPS service's certificate checks and the TLS anchors."""

from __future__ import annotations

import base64
import contextlib
import datetime
import ssl
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emulator.certs import ensure_certificates
from emulator.client_trust import ClientTrust, peer_chain
from emulator.dps_service import ConnectRefused, DpsConfig, DpsService
from emulator.errors import ValidationError
from emulator.models import EnrollmentGroup, IndividualEnrollment, RegistrationRecord
from emulator.store import Store
from emulator.x509 import (
    CertificateIssuer,
    CertificateRejected,
    CsrError,
    certificate_info,
    normalise_certificate,
    parse_csr,
    verify_chain,
)
from tests.support.pki import DAY, Issued, expired, make_cert

NOW = time.time()
STAMP = "2026-01-01T00:00:00.000000Z"


def _no_key() -> str:
    raise AssertionError("no key should be generated")


def _csr(common_name: str, key: ec.EllipticCurvePrivateKey | None = None) -> str:
    key = key or ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    request = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA384())
    return base64.b64encode(request.public_bytes(serialization.Encoding.DER)).decode()


# ---------------------------------------------------------------------------- certificates


def test_enrolled_certificates_are_read_in_every_usual_form() -> None:
    device = make_cert("dev")
    b64_der = base64.b64encode(device.der).decode()
    b64_pem = base64.b64encode(device.pem.encode()).decode()
    for text in (device.pem, b64_der, b64_pem, "junk before\n" + device.pem):
        assert normalise_certificate(text, "f", ca=False) == device.pem
    with pytest.raises(ValidationError, match="must be a CA certificate"):
        normalise_certificate(device.pem, "f", ca=True)
    for bad in ("", "not base64!", base64.b64encode(b"0" * 40).decode(), 42):
        with pytest.raises(ValidationError, match=r"^f "):
            normalise_certificate(bad, "f", ca=False)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300).map(base64.b64encode)))
def test_arbitrary_certificate_text_raises_only_validation_error(value: str | bytes) -> None:
    text = value.decode() if isinstance(value, bytes) else value
    with contextlib.suppress(ValidationError):
        normalise_certificate(text, "f", ca=False)


def test_certificate_info_has_azures_fields() -> None:
    device = make_cert("dev-info")
    info = certificate_info(device.cert)
    assert info["subjectName"] == info["issuerName"] == "CN=dev-info"
    assert info["sha256Thumbprint"] == device.cert.fingerprint(hashes.SHA256()).hex().upper()
    assert info["sha1Thumbprint"] == device.cert.fingerprint(hashes.SHA1()).hex().upper()
    assert info["version"] == 3 and info["notBeforeUtc"].endswith("Z")
    assert int(info["serialNumber"], 16) == device.cert.serial_number


# ---------------------------------------------------------------------------- chains


def test_chain_through_intermediates_to_the_anchor() -> None:
    root = make_cert("root", ca=True)
    middle = make_cert("middle", issuer=root, ca=True, path_length=1)
    lower = make_cert("lower", issuer=middle, ca=True, path_length=0)
    leaf = make_cert("leaf", issuer=lower)
    path = verify_chain([leaf.cert, lower.cert, middle.cert], root.cert, NOW)
    assert [c.subject for c in path] == [c.cert.subject for c in (leaf, lower, middle, root)]
    # Presented in any order, with the anchor itself included: still found.
    assert len(verify_chain([leaf.cert, root.cert, middle.cert, lower.cert], root.cert, NOW)) == 4
    # Anchored at an intermediate.
    assert len(verify_chain([leaf.cert], lower.cert, NOW)) == 2


@pytest.mark.parametrize(
    "case", ["other-root", "missing-link", "expired-leaf", "expired-issuer", "not-ca", "path-len"]
)
def test_chain_refusals(case: str) -> None:
    root = make_cert("root", ca=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    if case == "other-root":
        chain, anchor = [make_cert("leaf", issuer=make_cert("x", ca=True)).cert], root.cert
    elif case == "missing-link":
        middle = make_cert("middle", issuer=root, ca=True)
        chain, anchor = [make_cert("leaf", issuer=middle).cert], root.cert
    elif case == "expired-leaf":
        chain, anchor = [expired("leaf", issuer=root).cert], root.cert
    elif case == "expired-issuer":
        middle = make_cert(
            "middle", issuer=root, ca=True, not_before=now - 5 * DAY, not_after=now - DAY
        )
        chain, anchor = [make_cert("leaf", issuer=middle).cert, middle.cert], root.cert
    elif case == "not-ca":
        not_ca = make_cert("not-a-ca", issuer=root)
        chain, anchor = [make_cert("leaf", issuer=not_ca).cert, not_ca.cert], root.cert
    else:
        short = make_cert("short", ca=True, path_length=0)
        middle = make_cert("middle", issuer=short, ca=True)
        chain, anchor = [make_cert("leaf", issuer=middle).cert, middle.cert], short.cert
    with pytest.raises(CertificateRejected):
        verify_chain(chain, anchor, NOW)


# ---------------------------------------------------------------------------- CSRs and issuance


def test_csr_checks() -> None:
    assert parse_csr(_csr("Dev-1"), "dev-1").subject.rfc4514_string() == "CN=Dev-1"
    with pytest.raises(CsrError, match="must equal the registration id"):
        parse_csr(_csr("dev-2"), "dev-1")
    with pytest.raises(CsrError, match="secp256r1"):
        parse_csr(_csr("dev-1", ec.generate_private_key(ec.SECP256R1())), "dev-1")
    with pytest.raises(CsrError, match="base64"):
        parse_csr("-----BEGIN CERTIFICATE REQUEST-----", "dev-1")
    with pytest.raises(CsrError, match="readable"):
        parse_csr(base64.b64encode(b"\x30\x03abc").decode(), "dev-1")


@settings(max_examples=200)
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(base64.b64encode)))
def test_arbitrary_csr_raises_only_csr_error(value: str | bytes) -> None:
    text = value.decode() if isinstance(value, bytes) else value
    with contextlib.suppress(CsrError):
        parse_csr(text, "dev-1")


def test_issued_certificate(tmp_path: Path) -> None:
    issuer = CertificateIssuer.from_paths(ensure_certificates(tmp_path, ["localhost"]))
    request = parse_csr(_csr("dev-1"), "dev-1")
    leaf_der, ca_der = issuer.issue(request, "dev-1", NOW)
    leaf = x509.load_der_x509_certificate(leaf_der)
    leaf.verify_directly_issued_by(issuer.ca_cert)
    assert x509.load_der_x509_certificate(ca_der) == issuer.ca_cert
    assert leaf.public_key() == request.public_key()
    constraints = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert not constraints.ca
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= datetime.timedelta(
        days=30, minutes=5
    )


# ---------------------------------------------------------------------------- the model


def _individual(certificate: str, **extra: object) -> dict[str, object]:
    x509_body = {"clientCertificates": {"primary": {"certificate": certificate}}, **extra}
    return {"registrationId": "dev-1", "attestation": {"type": "x509", "x509": x509_body}}


def test_x509_enrollments_round_trip() -> None:
    device, other = make_cert("dev-1"), make_cert("dev-1")
    data = _individual(base64.b64encode(device.der).decode())
    data["attestation"]["x509"]["clientCertificates"]["secondary"] = {  # type: ignore[index]
        "certificate": other.pem
    }
    enrollment = IndividualEnrollment.from_json(data, now=STAMP, generate_key=_no_key)
    as_json = enrollment.to_json()
    certificates = as_json["attestation"]["x509"]["clientCertificates"]
    assert certificates["primary"]["certificate"] == device.pem
    assert certificates["secondary"]["info"]["subjectName"] == "CN=dev-1"
    again = IndividualEnrollment.from_json(as_json, now=STAMP, generate_key=_no_key)
    assert again == enrollment

    root = make_cert("root", ca=True)
    group_json = {
        "enrollmentGroupId": "g",
        "attestation": {
            "type": "x509",
            "x509": {"signingCertificates": {"primary": {"certificate": root.pem}}},
        },
    }
    group = EnrollmentGroup.from_json(group_json, now=STAMP, generate_key=_no_key)
    assert EnrollmentGroup.from_json(group.to_json(), now=STAMP, generate_key=_no_key) == group


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"type": "x509", "x509": {}}, "exactly one of"),
        ({"type": "x509", "x509": {"caReferences": {"primary": "ca"}}}, "caReferences"),
        ({"type": "x509", "x509": {"clientCertificates": {}}}, "primary is required"),
        (
            {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": "x"}}}},
            "not a readable",
        ),
    ],
)
def test_x509_attestation_errors(data: dict[str, object], message: str) -> None:
    body = {"registrationId": "dev-1", "attestation": data}
    with pytest.raises(ValidationError, match=message):
        IndividualEnrollment.from_json(body, now=STAMP, generate_key=_no_key)


def test_x509_kind_must_fit_individual_or_group() -> None:
    root = make_cert("root", ca=True)
    signing = {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": ""}}}}
    signing["x509"]["signingCertificates"]["primary"]["certificate"] = root.pem  # type: ignore[index]
    with pytest.raises(ValidationError, match="individual enrollments take"):
        IndividualEnrollment.from_json(
            {"registrationId": "d", "attestation": signing}, now=STAMP, generate_key=_no_key
        )
    client = _individual(make_cert("d").pem)["attestation"]
    with pytest.raises(ValidationError, match="enrollment groups take"):
        EnrollmentGroup.from_json(
            {"enrollmentGroupId": "g", "attestation": client}, now=STAMP, generate_key=_no_key
        )


def test_registration_record_keeps_x509_state() -> None:
    state = {"certificateInfo": {"subjectName": "CN=d"}, "enrollmentGroupId": "grp"}
    record = RegistrationRecord("d", "assigned", "h", "d", None, STAMP, STAMP, "", x509=state)
    data = record.to_json()
    assert data["x509"] == state and "symmetricKey" not in data
    parsed = RegistrationRecord.from_json(data)
    assert parsed.x509 == state and parsed.enrollment_group_id == "grp"
    with pytest.raises(ValidationError, match="x509 must be a JSON object"):
        RegistrationRecord.from_json({**data, "x509": "no"})


# ---------------------------------------------------------------------------- DPS checks


def _service(store: Store) -> DpsService:
    return DpsService(store, DpsConfig(id_scope="0ne1"))


def _put_individual(store: Store, device: Issued, registration_id: str = "dev-1") -> None:
    data = _individual(device.pem)
    data["registrationId"] = registration_id
    store.put_enrollment(IndividualEnrollment.from_json(data, now=STAMP, generate_key=_no_key))


def test_dps_accepts_the_enrolled_certificate_and_judges_time_by_its_clock() -> None:
    device = make_cert("dev-1")
    with Store() as store:
        _put_individual(store, device)
        service = _service(store)
        identity = service.verify_certificate("0ne1", "DEV-1", [device.der], "2021-06-01", NOW)
        assert identity.x509 is not None and identity.enrollment_group_id is None
        assert identity.x509["certificateInfo"]["subjectName"] == "CN=dev-1"
        with pytest.raises(ConnectRefused, match="expired") as info:
            service.verify_certificate("0ne1", "dev-1", [device.der], "v", NOW + 30 * 86400)
        assert info.value.return_code == 5
        with pytest.raises(ConnectRefused, match="not valid before"):
            service.verify_certificate("0ne1", "dev-1", [device.der], "v", NOW - 30 * 86400)
        with pytest.raises(ConnectRefused, match="unknown ID scope"):
            service.verify_certificate("0ne2", "dev-1", [device.der], "v", NOW)
        with pytest.raises(ConnectRefused, match="unreadable"):
            service.verify_certificate("0ne1", "dev-1", [b"junk"], "v", NOW)
        with pytest.raises(ConnectRefused, match="neither a SAS token nor"):
            service.authenticate("dev-1", "0ne1/registrations/dev-1/api-version=v", None, NOW)


def test_dps_group_lookup_and_symmetric_key_enrollments() -> None:
    root = make_cert("root", ca=True)
    with Store() as store:
        group_json = {
            "enrollmentGroupId": "grp",
            "attestation": {
                "type": "x509",
                "x509": {"signingCertificates": {"primary": {"certificate": root.pem}}},
            },
        }
        store.put_group(EnrollmentGroup.from_json(group_json, now=STAMP, generate_key=_no_key))
        symmetric = {"registrationId": "sym-dev", "attestation": {"type": "symmetricKey"}}
        key = base64.b64encode(b"k" * 32).decode()
        store.put_enrollment(
            IndividualEnrollment.from_json(symmetric, now=STAMP, generate_key=lambda: key)
        )
        service = _service(store)
        leaf = make_cert("member", issuer=root)
        identity = service.verify_certificate("0ne1", "member", [leaf.der], "v", NOW)
        assert identity.enrollment_group_id == "grp"
        assert identity.x509 is not None
        assert identity.x509["signingCertificateInfo"]["subjectName"] == "CN=root"
        sym_leaf = make_cert("sym-dev", issuer=root)
        with pytest.raises(ConnectRefused, match=r"not an X\.509 one"):
            service.verify_certificate("0ne1", "sym-dev", [sym_leaf.der], "v", NOW)


# ---------------------------------------------------------------------------- TLS anchors


def test_client_trust_follows_the_enrollments(tmp_path: Path) -> None:
    paths = ensure_certificates(tmp_path, ["localhost"])
    with Store() as store:
        trust = ClientTrust(paths, store)
        context = trust.context
        assert context.verify_mode is ssl.CERT_OPTIONAL
        assert context.verify_flags & ssl.VERIFY_X509_PARTIAL_CHAIN
        assert trust.anchor_count == 0 and trust.sync() == 0
        _put_individual(store, make_cert("dev-1"))
        assert trust.sync() == 1
        assert trust.sync() == 0  # nothing changed: nothing to do
        store.delete_enrollment("dev-1")
        assert trust.sync() == 0 and trust.anchor_count == 1  # anchors are only ever added
        assert context.cert_store_stats()["x509"] == 2  # the emulator CA and the enrolled one


def test_peer_chain_without_tls_or_certificate() -> None:
    assert peer_chain(None) == ()

    class NoCertificate:
        def getpeercert(self, binary_form: bool = False) -> None:
            return None

    assert peer_chain(NoCertificate()) == ()


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=20), inner),
    max_leaves=10,
)
_x509_keys = st.sampled_from(
    ["clientCertificates", "signingCertificates", "caReferences", "primary", "certificate"]
)


@settings(max_examples=200)
@given(st.dictionaries(_x509_keys, _json | st.dictionaries(_x509_keys, _json), max_size=3))
def test_arbitrary_x509_attestation_raises_only_validation_error(body: dict[str, object]) -> None:
    data = {"registrationId": "d", "attestation": {"type": "x509", "x509": body}}
    with contextlib.suppress(ValidationError):
        IndividualEnrollment.from_json(data, now=STAMP, generate_key=_no_key)
    group = {"enrollmentGroupId": "g", "attestation": {"type": "x509", "x509": body}}
    with contextlib.suppress(ValidationError):
        EnrollmentGroup.from_json(group, now=STAMP, generate_key=_no_key)
