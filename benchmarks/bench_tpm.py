"""TPM provisioning on swtpm vs the sum of its own TPM calls, timed in the same run.

Setup (not timed): a software TPM (swtpm) with its EK and SRK created once, and a TPM
enrollment for it in the emulator (its own process, ``retry_after=0``).

Each iteration is one device boot: open the TPM (ESAPI), ``ensure_keys`` (EK and SRK already
present), ``provision_https`` with TPM attestation (register, 401 challenge, import of the
activation blob, register again signed by the TPM, poll, import of the hub key), close.

Figure: the wall time of the iteration. Baseline: the sum of the TPM calls inside it, each timed
where it is made through :class:`TimedTpm` (a ``TpmProvider`` wrapper around ``TpmDevice``).
Their ratio says how much the protocol, TLS, HTTP and the service add on top of the TPM.
"""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    HOST,
    Benchmark,
    Context,
    Goal,
    Result,
    Row,
    Skipped,
    Timings,
    median,
    ratio,
)

GOAL_RATIO = 1.2
#: (iterations, warm-up iterations) in the full and the smoke run.
FULL_SIZE = (50, 3)
SMOKE_SIZE = (1, 0)
#: No iteration starts after this many seconds (the full run normally needs far less).
BUDGET_S = 120.0


class TimedSigner:
    """Times each ``sign`` (one TPM2_HMAC) of the wrapped signer."""

    def __init__(self, inner: Any, timings: Timings) -> None:
        self._inner = inner
        self._timings = timings

    def sign(self, data: bytes) -> bytes:
        """HMAC in the TPM, timed."""
        with self._timings.measure("HMAC (sign)"):
            signature: bytes = self._inner.sign(data)
        return signature


class TimedTpm:
    """A ``TpmProvider`` that times every call it forwards to a ``TpmDevice``."""

    def __init__(self, device: Any, timings: Timings) -> None:
        self._device = device
        self._timings = timings

    def endorsement_key(self) -> bytes:
        """ReadPublic of the EK, timed."""
        with self._timings.measure("ReadPublic (EK)"):
            value: bytes = self._device.endorsement_key()
        return value

    def storage_root_key(self) -> bytes:
        """ReadPublic of the SRK, timed."""
        with self._timings.measure("ReadPublic (SRK)"):
            value: bytes = self._device.storage_root_key()
        return value

    def registration_id(self) -> str:
        """ReadPublic of the EK and its hash, timed."""
        with self._timings.measure("registration id (ReadPublic EK)"):
            value: str = self._device.registration_id()
        return value

    def import_activation_blob(self, blob: bytes) -> None:
        """ActivateCredential, Import, Load, EvictControl, timed."""
        with self._timings.measure("activate + import + persist"):
            self._device.import_activation_blob(blob)

    def signer(self) -> TimedSigner:
        """The identity-key signer (a GetCapability check), timed; its signs are timed too."""
        with self._timings.measure("signer (GetCapability)"):
            inner = self._device.signer()
        return TimedSigner(inner, self._timings)


def _boot_and_provision(tcti: str, https: dict[str, Any]) -> tuple[float, Timings]:
    """One device boot: open, ensure_keys, provision over HTTPS, close. (wall time, TPM calls)."""
    from dps_proto import provision_https
    from tpm import TpmDevice

    timings = Timings()
    start = time.perf_counter()
    with timings.measure("open (ESAPI context)"):
        device = TpmDevice(tcti)
    try:
        with timings.measure("ensure_keys (EK, SRK present)"):
            device.ensure_keys()
        assignment = provision_https(tpm=TimedTpm(device, timings), **https)
    finally:
        with timings.measure("close"):
            device.close()
    wall = time.perf_counter() - start
    if not assignment.tpm_authentication_key:
        raise RuntimeError("the assignment carries no hub key for the TPM")
    return wall, timings


def _enroll(api_url: str, device: Any) -> str:
    from emulator.service_client import ServiceClient

    registration_id: str = device.registration_id()
    ServiceClient(api_url).put_enrollment(
        {
            "registrationId": registration_id,
            "deviceId": "bench-tpm-device",
            "attestation": {
                "type": "tpm",
                "tpm": {
                    "endorsementKey": base64.b64encode(device.endorsement_key()).decode(),
                    "storageRootKey": base64.b64encode(device.storage_root_key()).decode(),
                },
            },
        }
    )
    return registration_id


class _Series:
    """The iterations of one side: wall times, TPM sums, and each call's time."""

    def __init__(self) -> None:
        self.walls: list[float] = []
        self.sums: list[float] = []
        self.per_call: dict[str, list[float]] = {}
        self.calls_per_iteration: dict[str, int] = {}

    def add(self, wall: float, timings: Timings) -> None:
        self.walls.append(wall)
        self.sums.append(timings.total())
        for name, values in timings.calls.items():
            self.per_call.setdefault(name, []).append(sum(values))
            self.calls_per_iteration[name] = len(values)

    def summary(self) -> tuple[dict[str, Any], dict[str, Any], float | None]:
        """(figure, baseline, median of the per-iteration ratios)."""
        overhead = [(w - t) * 1000 for w, t in zip(self.walls, self.sums)]
        figure = {
            "iterations": len(self.walls),
            "wall_ms": _stats(self.walls),
            "non_tpm_ms": {"median": median(overhead), "mean": sum(overhead) / len(overhead)},
            "per_iteration_wall_ms": [w * 1000 for w in self.walls],
        }
        baseline = {
            "tpm_calls_ms": _stats(self.sums),
            "per_call_ms": {
                name: {
                    "calls_per_iteration": self.calls_per_iteration[name],
                    "median": median(values) * 1000,
                    "mean": sum(values) / len(values) * 1000,
                }
                for name, values in self.per_call.items()
            },
            "per_iteration_tpm_ms": [t * 1000 for t in self.sums],
        }
        each = [w / t for w, t in zip(self.walls, self.sums) if t > 0]
        return figure, baseline, median(each) if each else None


def _stats(seconds: list[float]) -> dict[str, float]:
    return {
        "median": median(seconds) * 1000,
        "mean": sum(seconds) / len(seconds) * 1000,
        "min": min(seconds) * 1000,
        "max": max(seconds) * 1000,
    }


#: (key, emulator options): the figure, and a diagnostic with TCP_NODELAY on the emulator's
#: HTTPS server (http.server writes headers and body separately; Nagle holds the body back).
SIDES: tuple[tuple[str, dict[str, bool]], ...] = (
    ("emulator", {}),
    ("emulator_https_nodelay", {"https_nodelay": True}),
)


def run(ctx: Context) -> Result:
    """Set up swtpm and the enrollments, then time device boots, the two sides interleaved."""
    import importlib.util

    from tpm.swtpm import SwtpmProcess, available

    if not available() or importlib.util.find_spec("tpm2_pytss") is None:
        raise Skipped("swtpm or tpm2-pytss is not installed (make bench installs them)")
    from tpm import TpmDevice

    iterations, warm_up = ctx.pick(FULL_SIZE, SMOKE_SIZE)
    emulators = {key: ctx.emulator(retry_after=0, **options) for key, options in SIDES}
    ctx.progress("starting swtpm")
    with SwtpmProcess(ctx.work_dir / "swtpm") as swtpm:
        ctx.progress(f"swtpm pid {swtpm.pid} at {swtpm.tcti}; creating the EK and SRK")
        t0 = time.perf_counter()
        with TpmDevice(swtpm.tcti) as device:
            device.ensure_keys()
            key_creation = time.perf_counter() - t0
            for info in emulators.values():
                registration_id = _enroll(info.api_url, device)
        ctx.progress(f"EK and SRK created in {key_creation:.2f} s; enrolled {registration_id}")
        https = {
            key: {
                "provisioning_host": HOST,
                "port": info.https_port,
                "ca_file": info.ca_file,
                "id_scope": info.id_scope,
                "timeout": 60.0,
            }
            for key, info in emulators.items()
        }
        for index in range(warm_up):
            for key, _ in SIDES:
                _boot_and_provision(swtpm.tcti, https[key])
            ctx.progress(f"warm-up {index + 1}/{warm_up}")
        series = {key: _Series() for key, _ in SIDES}
        deadline = time.monotonic() + BUDGET_S
        for index in range(iterations):
            if time.monotonic() > deadline:
                ctx.progress(f"time budget of {BUDGET_S:g} s used up after {index} iterations")
                break
            for key, _ in SIDES:
                wall, timings = _boot_and_provision(swtpm.tcti, https[key])
                series[key].add(wall, timings)
            if (index + 1) % 10 == 0 or index + 1 == iterations:
                ctx.progress(
                    f"{index + 1}/{iterations}: "
                    + ", ".join(
                        f"{key}: wall {s.walls[-1] * 1000:.1f} ms, TPM {s.sums[-1] * 1000:.1f} ms"
                        for key, s in series.items()
                    )
                )
    return _result(iterations, warm_up, key_creation, series)


def _result(
    iterations: int, warm_up: int, key_creation: float, series: dict[str, _Series]
) -> Result:
    figure, baseline, value = series["emulator"].summary()
    diag_figure, diag_baseline, diag_value = series["emulator_https_nodelay"].summary()
    figure["ek_srk_creation_s"] = key_creation
    goal = Goal("provisioning_vs_tpm_calls", "<=", GOAL_RATIO, value)
    diag_goal = Goal("diagnostic_https_nodelay", "<=", GOAL_RATIO, diag_value)
    figure_ms = figure["wall_ms"]["median"]
    baseline_ms = baseline["tpm_calls_ms"]["median"]
    diag_ms = diag_figure["wall_ms"]["median"]
    return Result(
        params={
            "iterations": iterations,
            "warm_up": warm_up,
            "transport": "provision_https (http.client, TLS) to the emulator's DPS HTTPS API",
            "tpm": "swtpm (socket TCTI) through tpm2-pytss",
            "emulator_retry_after": 0,
            "emulator_poll_throttle": False,
            "sides": {
                "emulator": "the figure: the emulator as it is",
                "emulator_https_nodelay": "diagnostic: TCP_NODELAY on the emulator's HTTPS "
                "server (set by the benchmark's emulator process)",
            },
        },
        results={**figure, "diagnostic_https_nodelay": {**diag_figure, "baseline": diag_baseline}},
        baseline=baseline,
        ratios={
            "provisioning_vs_tpm_calls": value,
            "ratio_of_medians": ratio(figure_ms, baseline_ms),
            "diagnostic_https_nodelay": diag_value,
        },
        goals=[goal],
        rows=[
            Row(
                "TPM provisioning (one boot) vs its TPM calls",
                f"{figure_ms:.1f} ms",
                f"{baseline_ms:.1f} ms",
                value,
                f"<= {GOAL_RATIO}",
                goal.met,
            ),
            Row(
                "diagnostic: same, emulator HTTPS with TCP_NODELAY",
                f"{diag_ms:.1f} ms",
                f"{diag_baseline['tpm_calls_ms']['median']:.1f} ms",
                diag_value,
                f"<= {GOAL_RATIO}",
                diag_goal.met,
            ),
        ],
    )


def plot(document: dict[str, Any], path: Path) -> None:
    """Wall time beside the stacked TPM calls (means), and the ratio per iteration."""
    from benchmarks.plotting import (
        EXTRA_COLOURS,
        FIGURE_COLOUR,
        machine_footer,
        pyplot,
        save,
    )

    plt = pyplot()
    per_call = document["baseline"]["per_call_ms"]
    results = document["results"]
    diagnostic = results["diagnostic_https_nodelay"]
    walls = {
        "provisioning\n(figure)": results["wall_ms"]["mean"],
        "provisioning,\nemulator HTTPS\nTCP_NODELAY\n(diagnostic)": diagnostic["wall_ms"]["mean"],
    }
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [2, 3]})
    for x, value in enumerate(walls.values()):
        colour = FIGURE_COLOUR if x == 0 else "#9ecae1"
        bars = left.bar([x], [value], 0.6, color=colour)
        left.bar_label(bars, labels=[f"{value:.1f}"], fontsize=8)
    bottom = 0.0
    palette = (*EXTRA_COLOURS, "#bcbd22", "#7f7f7f")
    stacked = sorted(per_call.items(), key=lambda item: -float(item[1]["mean"]))
    for index, (name, stats) in enumerate(stacked):
        left.bar(
            [2],
            [stats["mean"]],
            0.6,
            bottom=bottom,
            color=palette[index % len(palette)],
            label=name,
        )
        bottom += stats["mean"]
    left.text(2, bottom, f"{bottom:.1f}", ha="center", va="bottom", fontsize=8)
    left.set_xticks([0, 1, 2])
    left.set_xticklabels([*walls, "sum of TPM calls\n(baseline)"], fontsize=8)
    left.set_ylabel("ms per device boot (mean)")
    left.legend(fontsize=6, loc="upper right")
    left.set_title("Where one TPM provisioning's time goes", fontsize=10)
    left.grid(axis="y", alpha=0.3)
    for label, data, tpm, colour in (
        ("figure", results, document["baseline"], FIGURE_COLOUR),
        ("diagnostic (HTTPS TCP_NODELAY)", diagnostic, diagnostic["baseline"], "#9ecae1"),
    ):
        each = [
            w / t
            for w, t in zip(data["per_iteration_wall_ms"], tpm["per_iteration_tpm_ms"])
            if t > 0
        ]
        right.plot(
            range(1, len(each) + 1), each, marker="o", markersize=3, color=colour, label=label
        )
    right.axhline(GOAL_RATIO, color="#d62728", linestyle="--", linewidth=0.8, label="goal")
    right.axhline(1.0, color="#7f7f7f", linewidth=0.8, label="TPM calls only")
    right.set_ylim(bottom=0)
    right.set_xlabel("iteration")
    right.set_ylabel("wall time / TPM calls")
    ratios = document["ratios"]
    right.set_title(
        "Ratio per iteration (lower is better): median "
        f"{_fmt(ratios.get('provisioning_vs_tpm_calls'))}, "
        f"diagnostic {_fmt(ratios.get('diagnostic_https_nodelay'))}",
        fontsize=10,
    )
    right.legend(fontsize=8)
    right.grid(alpha=0.3)
    save(
        fig,
        path,
        "TPM provisioning on swtpm vs the sum of its TPM calls (same run)",
        machine_footer(document),
    )


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.2f}"


BENCHMARK = Benchmark(
    name="tpm",
    title="TPM provisioning on swtpm vs the sum of its TPM calls",
    run=run,
    plot=plot,
    order=30,
)
