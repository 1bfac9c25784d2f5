"""The X.509 and CSR verbs of ``dps-mqtt``, in-process against a running emulator."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from dps_mqtt.cli import main
from emulator.server import Emulator
from emulator.service_client import ServiceClient
from tests.conftest import ID_SCOPE
from tests.support.pki import make_cert


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, json.loads(out) if out.strip() else None, err


def _provision_args(emulator: Emulator, *extra: str) -> list[str]:
    return [
        "provision",
        "--host",
        "localhost",
        "--port",
        str(emulator.mqtt_port),
        "--id-scope",
        ID_SCOPE,
        "--ca-file",
        str(emulator.ca_file),
        "--timeout",
        "20",
        *extra,
    ]


def test_x509_enrollment_and_group_then_provision_with_the_certificate(
    capsys: pytest.CaptureFixture[str], emulator: Emulator, tmp_path: Path
) -> None:
    device = make_cert("cli-x509")
    cert, key = device.write(tmp_path, "dev")
    code, created, _ = run(
        capsys, "enrollment", "create-x509", "cli-x509", "--cert", cert, "--api", emulator.api_url
    )
    assert code == 0
    assert created["attestation"]["x509"]["clientCertificates"]["primary"]["certificate"]

    root = make_cert("CLI Root", ca=True)
    (tmp_path / "root.pem").write_text(root.pem)
    code, group, _ = run(
        capsys,
        "group",
        "create-x509",
        "cli-group",
        "--ca",
        str(tmp_path / "root.pem"),
        "--disabled",
        "--api",
        emulator.api_url,
    )
    assert code == 0 and group["provisioningStatus"] == "disabled"
    code, _, err = run(
        capsys, "group", "create-x509", "bad", "--ca", cert, "--api", emulator.api_url
    )
    assert code == 1 and "must be a CA certificate" in err

    # The registration id defaults to the certificate's CN.
    code, assignment, _ = run(capsys, *_provision_args(emulator, "--cert", cert, "--key-file", key))
    assert code == 0 and assignment["deviceId"] == "cli-x509"

    code, _, err = run(capsys, *_provision_args(emulator, "--key-file", key, "--key", "AAAA"))
    assert code == 1 and "--key-file goes with --cert" in err


def test_provision_with_csr_writes_the_key_and_the_issued_chain(
    capsys: pytest.CaptureFixture[str], emulator: Emulator, tmp_path: Path
) -> None:
    service = ServiceClient(emulator.api_url)
    key = service.create_enrollment("cli-csr")["attestation"]["symmetricKey"]["primaryKey"]
    out_dir = tmp_path / "out"

    code, assignment, _ = run(
        capsys,
        *_provision_args(
            emulator, "--registration-id", "cli-csr", "--key", key, "--csr", "--out", str(out_dir)
        ),
    )

    assert code == 0
    chain = x509.load_pem_x509_certificates(Path(assignment["certificateFile"]).read_bytes())
    assert len(chain) == 2 and chain[0].subject.rfc4514_string() == "CN=cli-csr"
    key_file = Path(assignment["keyFile"])
    assert key_file.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert os.stat(key_file).st_mode & 0o077 == 0
    assert len(assignment["issuedCertificateChain"]) == 2

    code, _, err = run(
        capsys, *_provision_args(emulator, "--registration-id", "cli-csr", "--key", key, "--csr")
    )
    assert code == 1 and "--csr needs --out" in err
