"""TPM fixtures: a software TPM (swtpm) per test, stopped afterwards, and a device on it."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tpm.swtpm import SwtpmProcess, available


def _require_swtpm() -> None:
    """Skip without swtpm or tpm2-pytss on a developer's machine; in CI their absence fails."""
    missing = not available() or importlib.util.find_spec("tpm2_pytss") is None
    if missing and os.environ.get("CI"):
        pytest.fail("CI must have swtpm and tpm2-pytss (make test installs them)")
    if missing:
        pytest.skip("swtpm or tpm2-pytss is not installed (make test installs them)")


@pytest.fixture
def swtpm_state(tmp_path: Path) -> Path:
    """The state directory of this test's software TPM (survives a restart of the process)."""
    return tmp_path / "swtpm-state"


@pytest.fixture
def swtpm(swtpm_state: Path) -> Iterator[SwtpmProcess]:
    """A fresh swtpm on free loopback ports, stopped after the test."""
    _require_swtpm()
    process = SwtpmProcess(swtpm_state)
    try:
        yield process
    finally:
        process.stop()
