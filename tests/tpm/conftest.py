"""TPM fixtures: a software TPM (swtpm) per test, stopped afterwards, and a device on it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.swtpm import require_swtpm
from tpm.swtpm import SwtpmProcess


@pytest.fixture
def swtpm_state(tmp_path: Path) -> Path:
    """The state directory of this test's software TPM (survives a restart of the process)."""
    return tmp_path / "swtpm-state"


@pytest.fixture
def swtpm(swtpm_state: Path) -> Iterator[SwtpmProcess]:
    """A fresh swtpm on free loopback ports, stopped after the test."""
    require_swtpm()
    process = SwtpmProcess(swtpm_state)
    try:
        yield process
    finally:
        process.stop()
