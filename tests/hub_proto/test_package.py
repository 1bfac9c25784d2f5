"""Tests of the hub_proto package surface: imports, SAS passwords, message helpers."""

from __future__ import annotations

import subprocess
import sys

import pytest

import hub_proto
from hub_proto import (
    HubAuthError,
    KeySigner,
    Message,
    hub_resource_uri,
    parse_sas_token,
    sas_password,
    verify_sas_token,
)
from hub_proto.message import message_from_properties, message_properties


def test_import_loads_only_the_standard_library() -> None:
    code = (
        "import sys, hub_proto; "
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('paho', 'cryptography', 'tpm2_pytss', 'emulator')]; "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "[]"


def test_public_api_is_complete() -> None:
    for name in hub_proto.__all__:
        assert getattr(hub_proto, name) is not None
    with pytest.raises(AttributeError):
        hub_proto.no_such_thing  # noqa: B018


def test_sas_password_verifies() -> None:
    signer = KeySigner.from_base64("c2VjcmV0LWtleS1mb3ItdGVzdHM=")
    password = sas_password("h.azure-devices.net", "dev:1", signer, 1_700_003_600)
    assert password.startswith("SharedAccessSignature sr=h.azure-devices.net%2Fdevices%2Fdev%3A1&")
    token = parse_sas_token(password)
    verify_sas_token(token, signer, hub_resource_uri("h.azure-devices.net", "dev:1"), 1_700_000_000)
    module = parse_sas_token(sas_password("h", "d", signer, 10, module_id="m"))
    assert module.resource == "h/devices/d/modules/m"
    with pytest.raises(HubAuthError):
        sas_password("h", "d", signer, -1)


def test_message_helpers() -> None:
    message = Message(b"p", {"a": "1"}, message_id="m", component="thermostat1")
    props = message_properties(message)
    assert props == {"$.mid": "m", "$.sub": "thermostat1", "a": "1"}
    assert message_from_properties(props, b"p") == message
    assert message.system_properties() == {"$.mid": "m", "$.sub": "thermostat1"}
    assert message.with_payload(b"q").payload == b"q"
    assert message_from_properties({"$.mid": None, "k": None}) == Message(
        properties={"k": ""}, message_id=""
    )
