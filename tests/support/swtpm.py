"""Whether a software TPM can run here: skip on a developer's machine, fail in CI."""

from __future__ import annotations

import importlib.util
import os

import pytest

from tpm.swtpm import available


def require_swtpm() -> None:
    """Skip without swtpm or tpm2-pytss on a developer's machine; in CI their absence fails."""
    missing = not available() or importlib.util.find_spec("tpm2_pytss") is None
    if missing and os.environ.get("CI"):
        pytest.fail("CI must have swtpm and tpm2-pytss (make test installs them)")
    if missing:
        pytest.skip("swtpm or tpm2-pytss is not installed (make test installs them)")
