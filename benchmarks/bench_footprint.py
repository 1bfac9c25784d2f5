"""Import time and peak RSS of the device stack vs the standard-library floor and the Azure SDK.

Each variant runs in a fresh interpreter (``python -S -c``, the repository and site-packages on
``PYTHONPATH``, so that neither interpreter loads ``.pth`` files or the editable-install finder
of a development install, which cost 2 MB and 10 ms before the first import): the import is
timed with ``perf_counter`` inside it, then the process's peak RSS is read (``VmHWM``, see
``_MEASURE``). Variants run interleaved, round after round, after one warm-up round (so ``.pyc``
files exist); the median of the rounds is reported.

- ``core``: ``import dps_proto`` (the sans-IO core); its floor imports exactly the standard-library
  modules that import loads, and nothing else.
- ``transport``: ``from dps_proto import provision`` (loads paho-mqtt); its floor likewise.
- ``azure``: ``import azure.iot.device`` in ``.venv-azure-sdk`` (built by ``make sdk-venv``),
  when that exists. ``bare`` / ``azure_bare`` are empty interpreters, for reference.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    REPO_ROOT,
    Benchmark,
    Context,
    Goal,
    Result,
    Row,
    median,
    ratio,
)

SDK_PYTHON = REPO_ROOT / ".venv-azure-sdk" / "bin" / "python"
CORE = "import dps_proto"
TRANSPORT = "from dps_proto import provision"
AZURE = "import azure.iot.device"
#: Used for the floors where ``sys.stdlib_module_names`` does not exist (Python < 3.10).
FALLBACK_FLOORS = {
    CORE: ["json", "hmac", "hashlib", "base64", "urllib.parse", "dataclasses", "enum", "logging"],
    TRANSPORT: [
        "json", "hmac", "hashlib", "base64", "urllib.parse", "dataclasses", "enum", "logging",
        "ssl", "socket", "select", "threading", "asyncio", "queue", "uuid", "struct",
    ],
}  # fmt: skip
#: (rounds, warm-up rounds).
FULL_SIZE = (20, 1)
SMOKE_SIZE = (1, 1)
#: No round starts after this many seconds.
BUDGET_S = 180.0
CHILD_TIMEOUT_S = 60.0
GOAL_IMPORT_VS_AZURE = 0.4
GOAL_RSS_VS_AZURE = 0.6

#: Peak RSS is VmHWM, the high-water mark of this process's own memory since its exec. Not
#: ``ru_maxrss``: on Linux that keeps the pre-exec high-water mark, i.e. the size of the forking
#: parent (here the benchmark runner), which would hide every difference.
_MEASURE = """\
import time as _t
_s = _t.perf_counter()
{statement}
_e = _t.perf_counter()
_k = 0
try:
    with open("/proc/self/status") as _f:
        for _l in _f:
            if _l.startswith("VmHWM:"):
                _k = int(_l.split()[1])
except OSError:
    pass
if not _k:
    import resource as _r
    _k = _r.getrusage(_r.RUSAGE_SELF).ru_maxrss
print("FOOTPRINT", _e - _s, _k)
"""

_LIST_MODULES = """\
import sys as _sys
_before = set(_sys.modules)
{statement}
print(repr([_m for _m in list(_sys.modules) if _m not in _before]))
"""


_SITE_DIRS: dict[str, str] = {}


def _site_dirs(interpreter: Path | str) -> str:
    """The interpreter's site-packages directories, as a PYTHONPATH value (cached)."""
    key = str(interpreter)
    if key not in _SITE_DIRS:
        done = subprocess.run(
            [key, "-c", "import sysconfig as s; p = s.get_paths(); "
             "print(p['purelib']); print(p['platlib'])"],
            env=_env(None),
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            check=True,
        )  # fmt: skip
        dirs = list(dict.fromkeys(done.stdout.split()))
        _SITE_DIRS[key] = os.pathsep.join([str(REPO_ROOT), *dirs])
    return _SITE_DIRS[key]


def _env(pythonpath: str | None) -> dict[str, str]:
    """This environment without PYTHON* variables, plus ``pythonpath`` if given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return env


def _python(interpreter: Path | str, script: str) -> str:
    """Run ``script`` with ``-S`` (no site: no .pth files, no editable-install finder, the same
    for every interpreter), the repository and the interpreter's site-packages on the path."""
    done = subprocess.run(
        [str(interpreter), "-S", "-c", script],
        cwd=REPO_ROOT,
        env=_env(_site_dirs(interpreter)),
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{interpreter} -c {script!r} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def stdlib_floor(statement: str) -> list[str]:
    """The standard-library modules ``statement`` loads in a fresh interpreter, in load order."""
    names = getattr(sys, "stdlib_module_names", None)
    if names is None:
        return list(FALLBACK_FLOORS[statement])
    loaded = ast.literal_eval(_python(sys.executable, _LIST_MODULES.format(statement=statement)))
    # Public modules only (their private helpers come with them), in the order their imports
    # finished, except ``os``: it is first in every normal start-up, and importing ``genericpath``
    # or ``posixpath`` before it is a circular import.
    public = [
        m
        for m in loaded
        if m.split(".")[0] in names and not any(part.startswith("_") for part in m.split("."))
    ]
    return sorted(public, key=lambda m: m != "os")


def floor_statement(modules: list[str]) -> str:
    """Import each of ``modules`` (one missing here is skipped, not fatal)."""
    return (
        f"for _m in {modules!r}:\n"
        "    try:\n"
        "        __import__(_m)\n"
        "    except ImportError:\n"
        "        pass"
    )


def measure(interpreter: Path | str, statement: str) -> tuple[float, int]:
    """(import seconds, peak RSS in KiB) of ``statement`` in a fresh ``interpreter``."""
    for line in _python(interpreter, _MEASURE.format(statement=statement)).splitlines():
        if line.startswith("FOOTPRINT "):
            _, seconds, rss = line.split()
            return float(seconds), int(rss)
    raise RuntimeError(f"no measurement from {interpreter} for {statement!r}")


def run(ctx: Context) -> Result:
    """Work out the floors, then run every variant ``rounds`` times, interleaved."""
    rounds, warm_up = ctx.pick(FULL_SIZE, SMOKE_SIZE)
    core_floor = stdlib_floor(CORE)
    transport_floor = stdlib_floor(TRANSPORT)
    ctx.progress(
        f"floors: {len(core_floor)} stdlib modules for the core, "
        f"{len(transport_floor)} with the transport"
    )
    variants: dict[str, tuple[Path | str, str]] = {
        "bare": (sys.executable, "pass"),
        "floor_core": (sys.executable, floor_statement(core_floor)),
        "core": (sys.executable, CORE),
        "floor_transport": (sys.executable, floor_statement(transport_floor)),
        "transport": (sys.executable, TRANSPORT),
    }
    notes: list[str] = []
    sdk_version: str | None = None
    if SDK_PYTHON.exists():
        try:
            sdk_version = _python(
                SDK_PYTHON,
                "from importlib.metadata import version; print(version('azure-iot-device'))",
            ).strip()
            variants["azure_bare"] = (SDK_PYTHON, "pass")
            variants["azure"] = (SDK_PYTHON, AZURE)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
            notes.append(f"azure-iot-device not usable in {SDK_PYTHON}: {exc}")
    else:
        notes.append(f"{SDK_PYTHON} does not exist (make sdk-venv): no Azure SDK comparison")
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    deadline = time.monotonic() + BUDGET_S
    for index in range(warm_up + rounds):
        if time.monotonic() > deadline:
            ctx.progress(f"time budget of {BUDGET_S:g} s used up after {index} rounds")
            break
        for name, (interpreter, statement) in variants.items():
            value = measure(interpreter, statement)
            if index >= warm_up:
                samples[name].append(value)
        if index >= warm_up and ((index - warm_up + 1) % 5 == 0 or index + 1 == warm_up + rounds):
            ctx.progress(
                f"round {index - warm_up + 1}/{rounds}: "
                + ", ".join(f"{n} {v[-1][0] * 1000:.1f} ms" for n, v in samples.items() if v)
            )
    stats = {name: _stats(values) for name, values in samples.items() if values}
    return _result(
        rounds, warm_up, stats, core_floor, transport_floor, sdk_version, variants, notes
    )


def _stats(values: list[tuple[float, int]]) -> dict[str, Any]:
    seconds = [v[0] for v in values]
    rss = [float(v[1]) for v in values]
    return {
        "runs": len(values),
        "import_ms": median(seconds) * 1000,
        "import_ms_min": min(seconds) * 1000,
        "import_ms_max": max(seconds) * 1000,
        "peak_rss_mb": median(rss) / 1024,
        "peak_rss_mb_min": min(rss) / 1024,
        "peak_rss_mb_max": max(rss) / 1024,
    }


def _result(
    rounds: int,
    warm_up: int,
    stats: dict[str, dict[str, Any]],
    core_floor: list[str],
    transport_floor: list[str],
    sdk_version: str | None,
    variants: dict[str, tuple[Path | str, str]],
    notes: list[str],
) -> Result:
    def get(name: str, key: str) -> float | None:
        value = stats.get(name, {}).get(key)
        return None if value is None else float(value)

    def delta(name: str, bare: str) -> float | None:
        value, base = get(name, "peak_rss_mb"), get(bare, "peak_rss_mb")
        return None if value is None or base is None else value - base

    ratios: dict[str, float | None] = {
        "core_import_vs_floor": ratio(get("core", "import_ms"), get("floor_core", "import_ms")),
        "core_rss_vs_floor": ratio(get("core", "peak_rss_mb"), get("floor_core", "peak_rss_mb")),
        "transport_import_vs_floor": ratio(
            get("transport", "import_ms"), get("floor_transport", "import_ms")
        ),
        "transport_rss_vs_floor": ratio(
            get("transport", "peak_rss_mb"), get("floor_transport", "peak_rss_mb")
        ),
        "transport_import_vs_azure": ratio(
            get("transport", "import_ms"), get("azure", "import_ms")
        ),
        "transport_rss_vs_azure": ratio(
            get("transport", "peak_rss_mb"), get("azure", "peak_rss_mb")
        ),
        "transport_rss_growth_vs_azure": ratio(
            delta("transport", "bare"), delta("azure", "azure_bare")
        ),
    }
    goals = [
        Goal("transport_import_vs_azure", "<=", GOAL_IMPORT_VS_AZURE,
             ratios["transport_import_vs_azure"]),
        Goal("transport_rss_vs_azure", "<=", GOAL_RSS_VS_AZURE, ratios["transport_rss_vs_azure"]),
    ]  # fmt: skip

    def ms(name: str) -> str:
        value = get(name, "import_ms")
        return "n/a" if value is None else f"{value:.1f} ms"

    def mb(name: str) -> str:
        value = get(name, "peak_rss_mb")
        return "n/a" if value is None else f"{value:.1f} MB"

    rows = [
        Row("import time, `import dps_proto` vs stdlib floor", ms("core"), ms("floor_core"),
            ratios["core_import_vs_floor"]),
        Row("peak RSS, `import dps_proto` vs stdlib floor", mb("core"), mb("floor_core"),
            ratios["core_rss_vs_floor"]),
        Row("import time, `from dps_proto import provision` vs stdlib floor", ms("transport"),
            ms("floor_transport"), ratios["transport_import_vs_floor"]),
        Row("peak RSS, `from dps_proto import provision` vs stdlib floor", mb("transport"),
            mb("floor_transport"), ratios["transport_rss_vs_floor"]),
        Row("import time, `from dps_proto import provision` vs `import azure.iot.device`",
            ms("transport"), ms("azure"), ratios["transport_import_vs_azure"],
            f"<= {GOAL_IMPORT_VS_AZURE}", goals[0].met),
        Row("peak RSS, `from dps_proto import provision` vs `import azure.iot.device`",
            mb("transport"), mb("azure"), ratios["transport_rss_vs_azure"],
            f"<= {GOAL_RSS_VS_AZURE}", goals[1].met),
        Row("peak RSS above the empty interpreter, same comparison",
            _mb(delta("transport", "bare")), _mb(delta("azure", "azure_bare")),
            ratios["transport_rss_growth_vs_azure"]),
    ]  # fmt: skip
    ours = {k: v for k, v in stats.items() if not k.startswith(("floor_", "azure"))}
    return Result(
        params={
            "rounds": rounds,
            "warm_up_rounds": warm_up,
            "statistic": "median over rounds",
            "python": sys.executable,
            "sdk_python": str(SDK_PYTHON) if "azure" in variants else None,
            "azure_iot_device": sdk_version,
            "statements": {
                "core": CORE,
                "transport": TRANSPORT,
                "azure": AZURE,
                "bare": "pass",
            },
            "floor_core_modules": core_floor,
            "floor_transport_modules": transport_floor,
            "rss": "VmHWM of /proc/self/status after the import: the whole process's peak RSS "
            "since its exec (ru_maxrss would include the forking parent's)",
        },
        results=ours,
        baseline={k: v for k, v in stats.items() if k.startswith(("floor_", "azure"))},
        ratios=ratios,
        goals=goals,
        rows=rows,
        notes=notes,
    )


def _mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} MB"


def plot(document: dict[str, Any], path: Path) -> None:
    """Import time and peak RSS of every variant, ours in blue, baselines in grey."""
    from benchmarks.plotting import BASELINE_COLOUR, FIGURE_COLOUR, machine_footer, pyplot, save

    plt = pyplot()
    both = {**document["results"], **document["baseline"]}
    order = [
        ("bare", "empty\ninterpreter"),
        ("floor_core", "stdlib floor\n(core)"),
        ("core", "import\ndps_proto"),
        ("floor_transport", "stdlib floor\n(transport)"),
        ("transport", "from dps_proto\nimport\nprovision"),
        ("azure_bare", "empty\ninterpreter\n(SDK venv)"),
        ("azure", "import\nazure.iot\n.device"),
    ]
    shown = [(key, label) for key, label in order if key in both]
    colours = [
        FIGURE_COLOUR if key in ("core", "transport") else
        ("#d9d9d9" if "bare" in key else BASELINE_COLOUR)
        for key, _ in shown
    ]  # fmt: skip
    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    for ax, key, unit, title in (
        (axes[0], "import_ms", "ms", "Import time, median (lower is better)"),
        (axes[1], "peak_rss_mb", "MB", "Peak RSS of the process, median (lower is better)"),
    ):
        values = [float(both[k][key]) for k, _ in shown]
        bars = ax.bar(range(len(shown)), values, color=colours)
        ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=8)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([label for _, label in shown], fontsize=7)
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    save(
        fig,
        path,
        "Device stack footprint vs the standard-library floor and azure-iot-device (same run)",
        machine_footer(document),
    )


BENCHMARK = Benchmark(
    name="footprint",
    title="import time and peak RSS vs the stdlib floor and azure-iot-device",
    run=run,
    plot=plot,
    order=40,
)
