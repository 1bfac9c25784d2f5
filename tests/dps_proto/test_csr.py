"""The device side of X.509 and certificate issuance: CSR framing, the issued chain as PEM, the
key + CSR helper, client certificates in the TLS context, and the credential rules."""

from __future__ import annotations

import base64
import contextlib
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from dps_proto import (
    CSR_API_VERSION,
    DpsError,
    SasError,
    build_register_payload,
    chain_pem,
    csr_base64,
    generate_key_and_csr,
    provision,
    provision_https,
)
from dps_proto.csr import api_version_supports_csr
from dps_proto.errors import DpsConnectionError
from dps_proto.payloads import RegisterRequest, parse_register_payload
from dps_proto.transport_support import client_ssl_context, is_certificate_refusal
from hub_proto import HubAuthError, HubClient, HubError
from tests.support.pki import make_cert


def test_generated_key_and_csr_fit_dps_preview() -> None:
    key_pem, csr_der = generate_key_and_csr("dev-1")
    key = serialization.load_pem_private_key(key_pem, password=None)
    request = x509.load_der_x509_csr(csr_der)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
    assert request.is_signature_valid
    assert request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-1"
    assert request.public_key() == key.public_key()
    with pytest.raises(DpsError):
        generate_key_and_csr("")


def test_csr_in_every_framing_becomes_base64_der() -> None:
    _, der = generate_key_and_csr("dev-1")
    expected = base64.b64encode(der).decode()
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    for value in (der, pem, pem.decode(), expected, "\n".join([expected[:40], expected[40:]])):
        assert csr_base64(value) == expected
    payload = build_register_payload(RegisterRequest("dev-1", csr=expected))
    assert parse_register_payload(payload).csr == expected
    for bad in (b"", b"\x02abc", "not base64!", "-----BEGIN CERTIFICATE-----\nAA==\n", 12):
        with pytest.raises(DpsError):
            csr_base64(bad)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.one_of(st.binary(max_size=100), st.text(max_size=100)))
def test_arbitrary_csr_input_raises_only_dps_error(value: bytes | str) -> None:
    with contextlib.suppress(DpsError):
        assert csr_base64(value)


def test_issued_chain_as_pem() -> None:
    leaf, ca = make_cert("dev-1"), make_cert("ca", ca=True)
    chain = [base64.b64encode(c.der).decode() for c in (leaf, ca)]
    loaded = x509.load_pem_x509_certificates(chain_pem(chain))
    assert loaded == [leaf.cert, ca.cert]
    for bad in ([], "abc", ["!!"], [""]):
        with pytest.raises(DpsError):
            chain_pem(bad)  # type: ignore[arg-type]


def test_api_versions_that_know_csr() -> None:
    assert api_version_supports_csr(CSR_API_VERSION)
    assert api_version_supports_csr("2026-11-02-preview")
    assert not api_version_supports_csr("2021-10-01")


def test_client_certificate_in_the_tls_context(tmp_path: Path) -> None:
    device = make_cert("dev-1")
    cert, key = device.write(tmp_path, "dev")
    context = client_ssl_context(None, None, error=DpsError, client_cert=cert, client_key=key)
    assert context.verify_mode is ssl.CERT_REQUIRED
    given_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    assert client_ssl_context(None, given_context, error=DpsError, client_cert=cert, client_key=key)
    with pytest.raises(DpsError, match="cannot load the client certificate"):
        client_ssl_context(None, None, error=DpsError, client_cert=key, client_key=cert)
    with pytest.raises(DpsError, match="cannot load the client certificate"):
        client_ssl_context(None, None, error=DpsError, client_cert=str(tmp_path / "none.pem"))
    with pytest.raises(DpsError, match="client_key needs client_cert"):
        client_ssl_context(None, None, error=DpsError, client_key=key)


def test_certificate_refusals_are_recognised() -> None:
    alert = ssl.SSLError(1, "[SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca")
    alert.reason = "TLSV1_ALERT_UNKNOWN_CA"  # type: ignore[misc]
    assert is_certificate_refusal(alert)
    assert not is_certificate_refusal(ssl.SSLError(1, "WRONG_VERSION_NUMBER"))
    assert not is_certificate_refusal(ConnectionResetError())


def test_x509_credential_rules(tmp_path: Path) -> None:
    cert, key = make_cert("dev-1").write(tmp_path, "dev")
    common = {"provisioning_host": "localhost", "id_scope": "0ne1", "timeout": 1.0}
    symmetric = base64.b64encode(b"k" * 32).decode()
    with pytest.raises(SasError, match="exactly one of"):
        provision(registration_id="dev-1", symmetric_key=symmetric, client_cert=cert, **common)
    with pytest.raises(DpsError, match="registration_id is required"):
        provision_https(client_cert=cert, client_key=key, **common)
    with pytest.raises(DpsConnectionError, match="client_key needs client_cert"):
        provision(registration_id="dev-1", symmetric_key=symmetric, client_key=key, **common)
    with pytest.raises(DpsError, match="csr needs api_version"):
        provision_https(
            registration_id="dev-1",
            client_cert=cert,
            client_key=key,
            csr=generate_key_and_csr("dev-1")[1],
            api_version="2021-06-01",
            **common,
        )
    with pytest.raises(HubAuthError, match="exactly one of"):
        HubClient("hub", "dev-1", symmetric_key=symmetric, client_cert=cert)
    with pytest.raises(HubError, match="cannot load the client certificate"):
        HubClient("hub", "dev-1", client_cert=key, client_key=cert)
