"""The benchmarks' smoke mode: each benchmark runs (tiny sizes) and writes a valid result file.

Benchmarks are not tests: nothing here looks at a number beyond it being finite and not negative.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = ("provisioning", "tpm", "footprint", "telemetry", "emulator_telemetry", "fleet")
#: The smoke run normally takes well under a minute; this only bounds a hang.
RUN_TIMEOUT = 180


def _numbers(value: Any, where: str) -> list[tuple[str, float]]:
    """Every number inside ``value`` (bools aside), with where it was found."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return []
    if isinstance(value, (int, float)):
        return [(where, float(value))]
    if isinstance(value, dict):
        return [n for key, item in value.items() for n in _numbers(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [n for index, item in enumerate(value) for n in _numbers(item, f"{where}[{index}]")]
    raise AssertionError(f"{where}: unexpected {type(value).__name__} in a result file")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench-smoke")
    readme = ROOT / "benchmarks" / "README.md"
    before = readme.read_text() if readme.exists() else None
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--no-plots", "--out", str(out)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    after = readme.read_text() if readme.exists() else None
    assert after == before, "a smoke run must not touch benchmarks/README.md"
    return out, output


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_smoke_run_prints_progress_and_writes_only_json(smoke_run: tuple[Path, str]) -> None:
    out, output = smoke_run
    assert "smoke run of" in output
    for name in EXPECTED:
        assert f"] {name}: starting" in output
    assert not list(out.glob("*.png")), "--no-plots writes no PNG"
    assert not list(out.glob("*.tmp"))


@pytest.mark.timeout(RUN_TIMEOUT + 60)
@pytest.mark.parametrize("name", EXPECTED)
def test_each_benchmark_writes_a_valid_result(smoke_run: tuple[Path, str], name: str) -> None:
    out, _ = smoke_run
    document = json.loads((out / f"{name}.json").read_text())

    assert document["benchmark"] == name
    assert document["error"] is None, document["error"]
    if document["skipped"]:
        if os.environ.get("CI"):
            pytest.fail(f"{name} was skipped in CI: {document['skipped']}")
        pytest.skip(f"{name}: {document['skipped']}")
    for key in ("machine", "params", "results", "baseline", "ratios", "goals"):
        assert isinstance(document[key], dict) and document[key], key
    machine = document["machine"]
    assert machine["cores"] >= 1
    assert machine["python"] and isinstance(machine["packages"], dict)
    assert document["params"]["smoke"] is True
    assert isinstance(document["goals"]["met"], bool)
    for measure, goal in document["goals"].items():
        if measure != "met":
            assert goal["op"] in ("<=", ">=") and goal["met"] in (True, False, None)
    assert isinstance(document["started"], str) and document["started"]
    assert document["duration_s"] > 0
    assert isinstance(document["table"], list) and document["table"]
    for row in document["table"]:
        assert set(row) >= {"measure", "figure", "baseline", "ratio", "goal", "met"}
    assert any(value is not None for value in document["ratios"].values())
    for where, value in _numbers({k: document[k] for k in ("results", "baseline", "ratios")}, name):
        assert math.isfinite(value) and value >= 0, f"{where} = {value}"
    for measure, value in document["ratios"].items():
        assert value is None or value > 0, f"ratio {measure} = {value}"


def test_the_runner_knows_every_expected_benchmark() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    assert listed >= set(EXPECTED)
