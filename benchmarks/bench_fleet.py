"""Memory per connected device: a fleet of ``AsyncHubClient`` devices in ONE asyncio process.

Figure: a load process (:mod:`benchmarks.fleet_load`) connects N devices (provisioned first with
DPS against a fresh emulator in its own process) to the emulator's hub over TLS, one
``AsyncHubClient`` each, all sharing one TLS context. Its resident set size (``VmRSS``) is read
after one warm-up device is connected and again once the fleet is connected and settled:
per device = delta / devices connected. The emulator's RSS is read at the same moments: per
connection on the server side.

Baseline, same run: the same load process with a bare paho-mqtt client per device on the same
asyncio adapter (subscribed to the same four filters) against a fresh mosquitto over TLS, and
mosquitto's RSS per connection. Diagnostic: the emulator's RSS per connection when asyncio's
per-connection TLS read buffer is 16 KiB instead of 256 KiB.

The whole benchmark is bounded (4 minutes in full mode): devices are provisioned and connected in
batches of bounded concurrency, and a level that cannot finish in the time left reports how many
devices it connected and why.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import select
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import (
    HOST,
    REPO_ROOT,
    Benchmark,
    Context,
    Goal,
    MosquittoProcess,
    Result,
    Row,
    client_ssl_context,
    raise_open_files_limit,
    ratio,
    stop_process,
)

GROUP_ID = "bench-fleet-group"
GROUP_KEY = base64.b64encode(b"benchmark-fleet-group-key-012345").decode()
#: Goal: at most this many bytes of the load process's memory per connected device.
GOAL_BYTES_PER_DEVICE = 50_000
#: asyncio's TLS read buffer in the diagnostic emulator (it is 256 KiB per connection).
DIAGNOSTIC_SSL_BUFFER = 16 * 1024


@dataclass(frozen=True)
class Plan:
    """Sizes of one run of this benchmark."""

    levels: tuple[int, ...]
    budget: float  # seconds for the whole benchmark
    provision_concurrency: int
    connect_concurrency: int
    settle: float  # seconds the load process lets the fleet settle before measuring


FULL_PLAN = Plan(
    levels=(1000, 10000),
    budget=240.0,
    provision_concurrency=100,
    connect_concurrency=100,
    settle=2.0,
)
SMOKE_PLAN = Plan(
    levels=(20,), budget=60.0, provision_concurrency=10, connect_concurrency=10, settle=0.3
)
#: Time kept back at each step for what must follow it (seconds).
RESERVE = 5.0


def provision(
    emulator: Any,
    prefix: str,
    count: int,
    concurrency: int,
    deadline: float,
    progress: Callable[[str], None],
) -> tuple[int, dict[str, int]]:
    """Provision ``prefix-000000`` ... in order until ``count`` or ``deadline``; returns how many
    consecutive ids from 0 were provisioned, and the failures by type."""
    from dps_proto import provision_async

    context = client_ssl_context(emulator.ca_file, nodelay=True)
    failures: dict[str, int] = {}

    async def main() -> int:
        done = [False] * count
        next_index = 0
        last_report = time.monotonic()

        async def worker() -> None:
            nonlocal next_index, last_report
            while next_index < count and time.monotonic() < deadline:
                index = next_index
                next_index += 1
                try:
                    await provision_async(
                        provisioning_host=HOST,
                        port=emulator.mqtt_port,
                        id_scope=emulator.id_scope,
                        registration_id=f"{prefix}-{index:06d}",
                        group_key=GROUP_KEY,
                        ssl_context=context,
                        timeout=max(1.0, min(60.0, deadline - time.monotonic())),
                    )
                except Exception as exc:
                    name = type(exc).__name__
                    failures[name] = failures.get(name, 0) + 1
                    continue
                done[index] = True
                if time.monotonic() - last_report > 5.0:
                    last_report = time.monotonic()
                    progress(f"provisioned {sum(done)}/{count}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        consecutive = 0
        while consecutive < count and done[consecutive]:
            consecutive += 1
        return consecutive

    return asyncio.run(main()), failures


def run_load(
    ctx: Context,
    kind: str,
    port: int,
    ca_file: str | Path,
    prefix: str,
    count: int,
    concurrency: int,
    budget: float,
    server_pid: int,
    settle: float,
) -> dict[str, Any]:
    """Run :mod:`benchmarks.fleet_load` (bounded by ``budget`` plus a margin); its result."""
    log_file = ctx.work_dir / f"fleet_load-{kind}-{prefix}.log"
    command = [
        sys.executable,
        "-m",
        "benchmarks.fleet_load",
        "--kind",
        kind,
        "--port",
        str(port),
        "--ca-file",
        str(ca_file),
        "--group-key",
        GROUP_KEY,
        "--prefix",
        prefix,
        "--count",
        str(count),
        "--concurrency",
        str(concurrency),
        "--budget",
        f"{budget:.1f}",
        "--server-pid",
        str(server_pid),
        "--settle",
        str(settle),
    ]
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log
        )
        assert process.stdout is not None and process.stdin is not None
        result: dict[str, Any] | None = None
        buffer = b""
        # Connecting stops at the budget; the warm-up, settling and measuring need a little more.
        deadline = time.monotonic() + budget + 30.0
        try:
            while result is None and time.monotonic() < deadline:
                ready, _, _ = select.select([process.stdout], [], [], 0.5)
                if not ready:
                    if process.poll() is not None:
                        break
                    continue
                chunk = os.read(process.stdout.fileno(), 65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    with contextlib.suppress(ValueError):
                        message = json.loads(line)
                        if "progress" in message:
                            ctx.progress(f"{kind} x{count}: {message['progress']}")
                        elif "result" in message:
                            result = message["result"]
        finally:
            with contextlib.suppress(OSError):
                process.stdin.close()  # the child closes its clients (bounded) and exits
            try:
                process.wait(timeout=30.0)
            except subprocess.TimeoutExpired:
                stop_process(process)
            process.stdout.close()
    if result is None:
        tail = log_file.read_text(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"fleet_load ({kind}, {count}) gave no result: {' / '.join(tail)}")
    return result


def run(ctx: Context) -> Result:
    """Level by level: fresh emulator, provision, hub fleet; fresh mosquitto, raw fleet."""
    from emulator.service_client import ServiceClient

    plan: Plan = ctx.pick(FULL_PLAN, SMOKE_PLAN)
    started = time.monotonic()
    deadline = started + plan.budget
    open_files = raise_open_files_limit(65536)
    largest = max(plan.levels)
    if open_files < largest + 200:
        ctx.progress(
            f"open-files limit {open_files} is below {largest + 200}: the largest level will "
            "fail to open every connection"
        )
    ca_file, cert, key = ctx.tls_files()
    stamp = time.strftime("%H%M%S")
    levels: list[dict[str, Any]] = []
    baselines: list[dict[str, Any]] = []
    diagnostics: list[dict[str, Any]] = []

    def fleet_on_emulator(
        n: int, *, ssl_read_buffer: int | None = None, share: float = 1.0
    ) -> dict[str, Any]:
        """Fresh emulator; provision n + 1 devices; connect them from the load process."""
        tag = "d" if ssl_read_buffer else "h"
        prefix = f"{tag}{n}x{stamp}"
        process = ctx.start_emulator(retry_after=0, ssl_read_buffer=ssl_read_buffer)
        try:
            emulator = process.emulator
            ServiceClient(emulator.api_url).create_group(GROUP_ID, primary_key=GROUP_KEY)
            t0 = time.monotonic()
            # Provisioning may use up to half of this step's share of the time left.
            step_deadline = t0 + max(10.0, (deadline - t0 - RESERVE) * share)
            provisioned, failures = provision(
                emulator,
                prefix,
                n + 1,
                plan.provision_concurrency,
                t0 + (step_deadline - t0) / 2,
                ctx.progress,
            )
            provision_s = time.monotonic() - t0
            ctx.progress(f"{provisioned}/{n + 1} devices provisioned in {provision_s:.1f} s")
            if provisioned < 2:
                raise RuntimeError(f"could not provision devices: {failures}")
            budget = max(5.0, step_deadline - time.monotonic())
            result = run_load(
                ctx,
                "hub",
                emulator.mqtt_port,
                emulator.ca_file,
                prefix,
                provisioned - 1,
                plan.connect_concurrency,
                budget,
                emulator.pid,
                plan.settle,
            )
        finally:
            process.stop()
        result.update(
            planned=n,
            provisioned=provisioned - 1,
            provision_seconds=provision_s,
            provision_failures=failures,
            ssl_read_buffer=ssl_read_buffer,
        )
        return result

    def fleet_on_mosquitto(n: int) -> dict[str, Any]:
        """Fresh mosquitto; connect n bare paho clients from the load process."""
        broker = MosquittoProcess(ctx.work_dir / f"mosquitto-fleet-{n}", cert, key)
        try:
            budget = max(5.0, deadline - time.monotonic() - RESERVE)
            assert broker.pid is not None
            result = run_load(
                ctx,
                "raw",
                broker.tls_port,
                ca_file,
                f"r{n}x{stamp}",
                n,
                plan.connect_concurrency,
                budget,
                broker.pid,
                plan.settle,
            )
        finally:
            broker.stop()
        result["planned"] = n
        return result

    for position, n in enumerate(plan.levels):
        left = len(plan.levels) - position
        ctx.progress(f"{n} devices: {deadline - time.monotonic():.0f} s left of the budget")
        # The hub fleet gets most of its level's share of the time; the raw fleet is quicker.
        ours = fleet_on_emulator(n, share=0.75 / left)
        levels.append(ours)
        _report(ctx, "hub", ours)
        base = fleet_on_mosquitto(n)
        baselines.append(base)
        _report(ctx, "raw", base)
        if position == 0:
            diagnostic = fleet_on_emulator(
                n, ssl_read_buffer=DIAGNOSTIC_SSL_BUFFER, share=0.3 / left
            )
            diagnostics.append(diagnostic)
            _report(ctx, "hub, emulator with a 16 KiB TLS read buffer", diagnostic)
    return _result(plan, levels, baselines, diagnostics, open_files, time.monotonic() - started)


def _report(ctx: Context, what: str, result: dict[str, Any]) -> None:
    ctx.progress(
        f"{what}: {result['connected']}/{result['planned']} connected in "
        f"{result['connect_seconds']:.1f} s ({result['stopped_by']}), "
        f"{_kib(result['per_device_kib'])} per device, server "
        f"{_kib(result['server_per_connection_kib'])} per connection; idle, the load process "
        f"uses {result['idle_cpu_cores']:.2f} of a core"
    )


def _kib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} KiB"


def _result(
    plan: Plan,
    levels: list[dict[str, Any]],
    baselines: list[dict[str, Any]],
    diagnostics: list[dict[str, Any]],
    open_files: int,
    elapsed: float,
) -> Result:
    ratios: dict[str, float | None] = {}
    goals: list[Goal] = []
    rows: list[Row] = []
    notes: list[str] = []
    for ours, base in zip(levels, baselines):
        n = ours["planned"]
        per_device = ours["per_device_kib"]
        per_bytes = None if per_device is None else per_device * 1024
        ratios[f"per_device_x{n}"] = ratio(per_device, base["per_device_kib"])
        ratios[f"server_per_connection_x{n}"] = ratio(
            ours["server_per_connection_kib"], base["server_per_connection_kib"]
        )
        goal = Goal(f"bytes_per_device_x{n}", "<=", GOAL_BYTES_PER_DEVICE, per_bytes)
        goals.append(goal)
        connected = (
            f"{ours['connected']} connected"
            if ours["connected"] == n
            else f"{ours['connected']} of {n} connected"
        )
        rows.append(
            Row(
                f"load process RSS per device, {n} AsyncHubClient devices -> emulator "
                f"({connected}) vs bare paho clients -> mosquitto",
                _kib(per_device),
                f"{_kib(base['per_device_kib'])} ({base['connected']} connected)",
                ratios[f"per_device_x{n}"],
                f"<= {GOAL_BYTES_PER_DEVICE / 1000:g} KB",
                goal.met,
            )
        )
        rows.append(
            Row(
                f"server RSS per connection, emulator vs mosquitto, {n} devices",
                _kib(ours["server_per_connection_kib"]),
                _kib(base["server_per_connection_kib"]),
                ratios[f"server_per_connection_x{n}"],
            )
        )
        ratios[f"idle_cpu_x{n}"] = ratio(ours["idle_cpu_cores"], base["idle_cpu_cores"])
        rows.append(
            Row(
                f"diagnostic: load process CPU with the fleet connected and idle, {n} devices "
                "(share of one core)",
                f"{ours['idle_cpu_cores']:.2f} ({ours['connected']} devices)",
                f"{base['idle_cpu_cores']:.2f} ({base['connected']} devices)",
                ratios[f"idle_cpu_x{n}"],
            )
        )
        for what, result in (("hub", ours), ("raw", base)):
            if result["connected"] < result["planned"]:
                notes.append(
                    f"{what} x{n}: {result['connected']} of {result['planned']} devices connected "
                    f"({result['stopped_by']}; provisioned {result.get('provisioned', 'n/a')}, "
                    f"failures {result['failures'] or 'none'})"
                )
            elif result["failures"]:
                notes.append(f"{what} x{n}: connect failures {result['failures']}")
    for diagnostic, ours in zip(diagnostics, levels):
        n = diagnostic["planned"]
        ratios[f"server_per_connection_small_ssl_buffer_x{n}"] = ratio(
            diagnostic["server_per_connection_kib"], ours["server_per_connection_kib"]
        )
        rows.append(
            Row(
                f"diagnostic: emulator RSS per connection with a 16 KiB asyncio TLS read buffer, "
                f"{n} devices (ratio to the emulator as it is)",
                _kib(diagnostic["server_per_connection_kib"]),
                _kib(ours["server_per_connection_kib"]),
                ratios[f"server_per_connection_small_ssl_buffer_x{n}"],
            )
        )
    return Result(
        params={
            "levels": list(plan.levels),
            "budget_s": plan.budget,
            "elapsed_s": elapsed,
            "provision_concurrency": plan.provision_concurrency,
            "connect_concurrency": plan.connect_concurrency,
            "open_files_limit": open_files,
            "figure": "benchmarks.fleet_load --kind hub: AsyncHubClient per device, one asyncio "
            "process, one shared TLS context, against the emulator (TLS)",
            "baseline": "benchmarks.fleet_load --kind raw: paho-mqtt Client + AsyncioPahoAdapter "
            "per device, same process kind, same TLS context, the same four subscriptions, "
            "against mosquitto (TLS)",
            "memory": "VmRSS of the load process after one warm-up device, and after the fleet "
            "connected and settled (2 s, gc.collect()); per device = delta / connected",
            "diagnostic_ssl_read_buffer": DIAGNOSTIC_SSL_BUFFER,
        },
        results={"levels": levels, "diagnostic_small_ssl_buffer": diagnostics},
        baseline={"levels": baselines},
        ratios=ratios,
        goals=goals,
        rows=rows,
        notes=notes,
    )


def plot(document: dict[str, Any], path: Path) -> None:
    """Load-process KiB per device and server KiB per connection, by fleet size."""
    from benchmarks.plotting import grouped_bars, machine_footer, pyplot, save

    plt = pyplot()
    ours = document["results"]["levels"]
    base = document["baseline"]["levels"]
    labels = [
        f"{m['planned']} devices\n({m['connected']} / {b['connected']} connected)"
        for m, b in zip(ours, base)
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    grouped_bars(
        left,
        labels,
        {
            "AsyncHubClient -> emulator": [m["per_device_kib"] for m in ours],
            "bare paho + asyncio adapter -> mosquitto (baseline)": [
                m["per_device_kib"] for m in base
            ],
        },
        ylabel="KiB of the load process's RSS per device",
        title="Load process memory per connected device (lower is better)",
        value_format="{:.1f}",
    )
    left.axhline(GOAL_BYTES_PER_DEVICE / 1024, color="#d62728", linestyle="--", linewidth=0.8)
    left.text(
        0, GOAL_BYTES_PER_DEVICE / 1024, "goal 50 KB", color="#d62728", fontsize=7, va="bottom"
    )
    diagnostics = {d["planned"]: d for d in document["results"]["diagnostic_small_ssl_buffer"]}
    grouped_bars(
        right,
        labels,
        {
            "emulator": [m["server_per_connection_kib"] for m in ours],
            "emulator, 16 KiB TLS read buffer (diagnostic)": [
                diagnostics.get(m["planned"], {}).get("server_per_connection_kib") for m in ours
            ],
            "mosquitto (baseline)": [m["server_per_connection_kib"] for m in base],
        },
        colours=("#1f77b4", "#9ecae1", "#7f7f7f"),
        ylabel="KiB of the server's RSS per connection",
        title="Server memory per connection (lower is better)",
        value_format="{:.1f}",
    )
    save(
        fig,
        path,
        "Fleet memory: AsyncHubClient devices in one process vs bare paho clients (same run)",
        machine_footer(document),
    )


BENCHMARK = Benchmark(
    name="fleet",
    title="memory per connected device (one asyncio process) vs bare paho-mqtt clients",
    run=run,
    plot=plot,
    order=70,
)
