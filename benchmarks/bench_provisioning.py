"""Provisioning throughput and latency against the emulator (TLS), N registrations in flight.

Figure: ``provision_async`` (paho driven by asyncio, one process) registering devices of a
symmetric-key enrollment group with the emulator (its own process, ``retry_after=0`` so that
polling does not dominate): connect, subscribe, register, poll, disconnect.

Baseline, same run, same concurrency, same client stack (paho + the asyncio adapter, the same TLS
context): raw short-lived MQTT sessions against mosquitto over TLS on this machine (connect,
subscribe, then as many publish/reply exchanges as a registration makes -- register and poll --
then disconnect), answered by a responder client in its own process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import (
    HOST,
    ID_SCOPE,
    Benchmark,
    Context,
    EmulatorInfo,
    EmulatorProcess,
    Goal,
    Result,
    Row,
    client_ssl_context,
    latency_summary_ms,
    process_cpu_seconds,
    raise_open_files_limit,
    ratio,
)

#: Per level: (devices in flight, sessions per side, time budget per side in seconds, rounds).
#: The sessions and the budget are split over the rounds; the sides take turns round by round,
#: so that a noisy neighbour hits them alike.
FULL_PLAN = ((1, 150, 15.0, 3), (10, 600, 20.0, 3), (100, 1500, 30.0, 2), (1000, 3000, 60.0, 1))
SMOKE_PLAN = ((1, 4, 5.0, 1), (4, 8, 5.0, 1))
#: Request/reply exchanges per session: a registration is a register and one poll.
EXCHANGES = 2
GROUP_ID = "bench-group"
GROUP_KEY = base64.b64encode(b"benchmark-group-key-0123456789ab").decode()
PROGRESS_EVERY = 3.0
GOAL_LEVEL = 100
GOAL_RATE_RATIO = 0.5
GOAL_P99_MS = 100.0


SessionFactory = Callable[[int], Awaitable[None]]


@dataclass
class Target:
    """What one side runs: a session per index, and the server processes it loads."""

    session: SessionFactory
    server_pids: list[int]


@dataclass
class Chunk:
    """One round of one side at one level."""

    latencies: list[float] = field(default_factory=list)
    errors: dict[str, int] = field(default_factory=dict)
    started: int = 0
    elapsed: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float | None = 0.0


def _server_cpu(pids: list[int]) -> float | None:
    values = [process_cpu_seconds(pid) for pid in pids]
    return None if any(v is None for v in values) else sum(v for v in values if v is not None)


async def drive(
    target: Target,
    *,
    concurrency: int,
    count: int,
    budget: float,
    timeout: float,
    label: str,
    progress: Callable[[str], None],
    first_index: int = 0,
) -> Chunk:
    """Run ``count`` sessions, ``concurrency`` at a time, starting none after ``budget`` seconds.

    Each session is bounded by ``timeout``. Records each completed session's latency, failures
    by type, the elapsed time, and the CPU time this process and the server processes used.
    """
    chunk = Chunk()
    start = time.perf_counter()
    stop_at = start + budget
    cpu0, server0 = time.process_time(), _server_cpu(target.server_pids)

    async def worker() -> None:
        while chunk.started < count and time.perf_counter() < stop_at:
            index = first_index + chunk.started
            chunk.started += 1
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(target.session(index), timeout)
            except Exception as exc:
                name = type(exc).__name__
                chunk.errors[name] = chunk.errors.get(name, 0) + 1
                continue
            chunk.latencies.append(time.perf_counter() - t0)

    async def report() -> None:
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            elapsed = time.perf_counter() - start
            progress(
                f"{label}: {len(chunk.latencies)}/{count} done, "
                f"{sum(chunk.errors.values())} errors, {len(chunk.latencies) / elapsed:.1f}/s"
            )

    reporter = asyncio.get_running_loop().create_task(report())
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        reporter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporter
    chunk.elapsed = time.perf_counter() - start
    chunk.client_cpu = time.process_time() - cpu0
    server1 = _server_cpu(target.server_pids)
    chunk.server_cpu = None if server0 is None or server1 is None else server1 - server0
    return chunk


def summarise(level: int, planned: int, chunks: list[Chunk]) -> dict[str, Any]:
    """One side at one level: its rounds merged (rate over their summed time, latencies pooled)."""
    latencies = [value for chunk in chunks for value in chunk.latencies]
    errors: dict[str, int] = {}
    for chunk in chunks:
        for name, n in chunk.errors.items():
            errors[name] = errors.get(name, 0) + n
    elapsed = sum(chunk.elapsed for chunk in chunks)
    completed = len(latencies)
    client_cpu = sum(chunk.client_cpu for chunk in chunks)
    server_cpus = [chunk.server_cpu for chunk in chunks]
    server_cpu = None if any(c is None for c in server_cpus) else sum(c or 0.0 for c in server_cpus)
    per = max(1, completed)
    return {
        "in_flight": level,
        "planned": planned,
        "rounds": len(chunks),
        "started": sum(chunk.started for chunk in chunks),
        "completed": completed,
        "errors": errors,
        "elapsed_s": elapsed,
        "rate_per_s": completed / elapsed if elapsed > 0 else 0.0,
        "latency": latency_summary_ms(latencies),
        "client_cpu_ms_per_session": client_cpu * 1000 / per,
        "server_cpu_ms_per_session": None if server_cpu is None else server_cpu * 1000 / per,
        "client_cpu_cores": client_cpu / elapsed if elapsed > 0 else 0.0,
        "server_cpu_cores": None if server_cpu is None or elapsed <= 0 else server_cpu / elapsed,
    }


# -- the two kinds of session -------------------------------------------------------------------


def dps_target(ctx: Context, tag: str, *, emulator: EmulatorInfo, nodelay: bool = False) -> Target:
    """Sessions that provision one new device each through ``emulator`` (``provision_async``).

    ``nodelay`` (a diagnostic, not the figure) gives the transport's sockets TCP_NODELAY through
    the TLS context it is handed, which the transport does not set itself.
    """
    from dps_proto import provision_async
    from emulator.service_client import ServiceClient

    ServiceClient(emulator.api_url).create_group(GROUP_ID, primary_key=GROUP_KEY)
    context = client_ssl_context(emulator.ca_file, nodelay=nodelay)

    async def session(index: int) -> None:
        assignment = await provision_async(
            provisioning_host=HOST,
            port=emulator.mqtt_port,
            id_scope=emulator.id_scope,
            registration_id=f"{tag}-{index}",
            group_key=GROUP_KEY,
            ssl_context=context,
            timeout=60.0,
        )
        if not assignment.assigned_hub:
            raise RuntimeError("no hub assigned")

    return Target(session, [emulator.pid])


class _SessionFailed(Exception):
    """The broker refused or dropped a baseline session."""


def raw_target(
    ctx: Context, tag: str, *, nodelay: bool = True, responder_pid: int | None = None
) -> Target:
    """Sessions of raw MQTT against mosquitto: connect, subscribe, exchanges, disconnect.

    With TCP_NODELAY by default: the baseline is what a raw client tuned for request/reply does
    (without it, the PUBACK of a reply and the next request meet Nagle's ~40 ms delayed ACK).
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    from dps_proto import KeySigner, dps_resource_uri, generate_sas_token, username
    from dps_proto.paho_asyncio import AsyncioPahoAdapter

    broker = ctx.mosquitto()
    ca_file, _, _ = ctx.tls_files()
    context = client_ssl_context(ca_file, nodelay=nodelay)
    request = b'{"registrationId":"%s"}' % tag.encode()
    # CONNECT packets the size of a device's: its user name and a SAS token as password.
    user = username(ID_SCOPE, f"{tag}-000000", client_version="dps-mqtt/0.1.0")
    password = generate_sas_token(
        dps_resource_uri(ID_SCOPE, f"{tag}-000000"),
        KeySigner.from_base64(GROUP_KEY),
        expiry=int(time.time()) + 3600,
        key_name="registration",
    )

    async def session(index: int) -> None:
        loop = asyncio.get_running_loop()
        client_id = f"{tag}-{index}"
        events: asyncio.Queue[str] = asyncio.Queue()
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        client.tls_set_context(context)
        client.username_pw_set(user, password)
        client.connect_timeout = 10.0

        def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            events.put_nowait("refused" if reason.is_failure else "connack")

        client.on_connect = on_connect
        client.on_subscribe = lambda *_args: events.put_nowait("suback")
        client.on_message = lambda *_args: events.put_nowait("message")
        client.on_disconnect = lambda *_args: events.put_nowait("disconnect")

        async def expect(wanted: str) -> None:
            event = await events.get()
            if event != wanted:
                raise _SessionFailed(f"expected {wanted}, got {event}")

        adapter = AsyncioPahoAdapter(client, loop)
        try:
            client.connect(HOST, broker.tls_port, keepalive=60)
            await expect("connack")
            client.subscribe(f"bench/res/{client_id}/#", qos=1)
            await expect("suback")
            for exchange in range(EXCHANGES):
                client.publish(f"bench/req/{client_id}/{exchange}", request, qos=1)
                await expect("message")
            await adapter.disconnect(1.0)
        finally:
            adapter.close()
            reset = getattr(client, "_reset_sockets", None)  # close the sockets now, not at GC
            if callable(reset):
                with contextlib.suppress(OSError):
                    reset()

    pids = [pid for pid in (broker.pid, responder_pid) if pid is not None]
    return Target(session, pids)


# -- the benchmark -----------------------------------------------------------------------------


#: (key, what it is, target factory, its options): the baseline, the figure, a diagnostic.
SIDES: tuple[tuple[str, str, Callable[..., Target], dict[str, Any]], ...] = (
    ("raw", "raw MQTT -> mosquitto", raw_target, {}),
    ("dps", "provision_async -> emulator", dps_target, {}),
    ("dps_nodelay", "provision_async + TCP_NODELAY", dps_target, {"nodelay": True}),
)
#: Sessions each side runs, on its fresh server, before a level is measured.
WARM_UP = 20


def run(ctx: Context) -> Result:
    """Level by level: fresh servers, a warm-up, then rounds in which the sides take turns.

    Each DPS side gets a new emulator at each level: the emulator keeps every operation for
    10 minutes and scans them on each register, so a shared one would make a level's numbers
    depend on how many registrations came before it (and on the order of the sides).
    """
    plan = ctx.pick(FULL_PLAN, SMOKE_PLAN)
    timeout = ctx.pick(60.0, 20.0)
    warm_up = ctx.pick(WARM_UP, 2)
    open_files = raise_open_files_limit(max(4096, 8 * max(level for level, *_ in plan)))
    broker = ctx.mosquitto()
    responder = ctx.child("responder", ["--port", str(broker.plain_port)])
    ctx.progress(f"responder pid {responder.pid} on mosquitto's plain listener")
    stamp = time.strftime("%H%M%S")

    async def measure_level(
        level: int, count: int, budget: float, rounds: int
    ) -> dict[str, dict[str, Any]]:
        emulators: list[EmulatorProcess] = []
        try:
            targets: dict[str, Target] = {}
            for key, _, factory, options in SIDES:
                tag = f"{key}-{level}-{stamp}"
                if factory is dps_target:
                    emulators.append(ctx.start_emulator(retry_after=0))
                    options = {**options, "emulator": emulators[-1].emulator}
                else:
                    options = {**options, "responder_pid": responder.pid}
                targets[key] = factory(ctx, tag, **options)
                await drive(
                    targets[key],
                    concurrency=min(level, 10),
                    count=warm_up,
                    budget=20.0,
                    timeout=timeout,
                    label=f"warm-up {key}",
                    progress=ctx.progress,
                    first_index=10**8,
                )
            chunks: dict[str, list[Chunk]] = {key: [] for key in targets}
            for index in range(rounds):
                size = count // rounds + (1 if index < count % rounds else 0)
                for key, target in targets.items():
                    chunks[key].append(
                        await drive(
                            target,
                            concurrency=level,
                            count=size,
                            budget=budget / rounds,
                            timeout=timeout,
                            label=f"{key} x{level} round {index + 1}/{rounds}",
                            progress=ctx.progress,
                            first_index=sum(c.started for c in chunks[key]),
                        )
                    )
            return {key: summarise(level, count, parts) for key, parts in chunks.items()}
        finally:
            for process in emulators:
                process.stop()

    async def main() -> dict[str, list[dict[str, Any]]]:
        measured: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _, _ in SIDES}
        for level, count, budget, rounds in plan:
            ctx.progress(
                f"{level} in flight: {count} sessions per side in {rounds} round(s), "
                f"at most {budget:g} s per side; fresh emulators, {warm_up} warm-up sessions"
            )
            for key, one in (await measure_level(level, count, budget, rounds)).items():
                measured[key].append(one)
                lat = one["latency"]
                ctx.progress(
                    f"{key} x{level}: {one['completed']} in {one['elapsed_s']:.1f} s = "
                    f"{one['rate_per_s']:.1f}/s, p50 {lat.get('p50_ms', 0):.1f} ms, "
                    f"p99 {lat.get('p99_ms', 0):.1f} ms, CPU/session client "
                    f"{one['client_cpu_ms_per_session']:.2f} ms server "
                    f"{_fmt_ms(one['server_cpu_ms_per_session'])}, errors {one['errors'] or 0}"
                )
        return measured

    measured = asyncio.run(main())
    return _result(plan, measured, open_files, timeout)


def _fmt_ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} ms"


def _result(
    plan: tuple[tuple[int, int, float, int], ...],
    measured: dict[str, list[dict[str, Any]]],
    open_files: int,
    timeout: float,
) -> Result:
    figure, baseline, nodelay = measured["dps"], measured["raw"], measured["dps_nodelay"]
    ratios: dict[str, float | None] = {}
    rows: list[Row] = []
    for ours, base, diag in zip(figure, baseline, nodelay):
        level = ours["in_flight"]
        ratios[f"rate_x{level}"] = ratio(ours["rate_per_s"], base["rate_per_s"])
        ratios[f"rate_nodelay_x{level}"] = ratio(diag["rate_per_s"], base["rate_per_s"])
        for p in ("p50", "p99"):
            ratios[f"{p}_latency_x{level}"] = ratio(
                ours["latency"].get(f"{p}_ms"), base["latency"].get(f"{p}_ms")
            )
        rows.append(
            Row(
                f"registrations/s, {level} in flight",
                f"{ours['rate_per_s']:.1f}/s",
                f"{base['rate_per_s']:.1f}/s",
                ratios[f"rate_x{level}"],
                f">= {GOAL_RATE_RATIO}" if level == GOAL_LEVEL else "",
            )
        )
        rows.append(
            Row(
                f"p50 / p99 latency, {level} in flight (ratio of p99s)",
                _ms_pair(ours),
                _ms_pair(base),
                ratios[f"p99_latency_x{level}"],
                f"p99 <= {GOAL_P99_MS:g} ms" if level == GOAL_LEVEL else "",
            )
        )
    for diag in nodelay:
        level = diag["in_flight"]
        rows.append(
            Row(
                f"diagnostic: registrations/s with TCP_NODELAY, {level} in flight",
                f"{diag['rate_per_s']:.1f}/s ({_ms_pair(diag)})",
                "as above",
                ratios[f"rate_nodelay_x{level}"],
            )
        )
    at_goal = next((m for m in figure if m["in_flight"] == GOAL_LEVEL), None)
    p99 = at_goal["latency"].get("p99_ms") if at_goal else None
    ratios[f"p99_ms_x{GOAL_LEVEL}"] = p99  # an absolute goal, kept with the ratios for the table
    goals = [
        Goal(f"rate_x{GOAL_LEVEL}", ">=", GOAL_RATE_RATIO, ratios.get(f"rate_x{GOAL_LEVEL}")),
        Goal(f"p99_ms_x{GOAL_LEVEL}", "<=", GOAL_P99_MS, p99),
    ]
    for row in rows:
        if row.goal.startswith(">="):
            row.met = goals[0].met
        elif row.goal.startswith("p99"):
            row.met = goals[1].met
    notes = []
    for key, runs in measured.items():
        failed = {m["in_flight"]: m["errors"] for m in runs if m["errors"]}
        if failed:
            notes.append(f"{key}: sessions failed (by in-flight level): {failed}")
    return Result(
        params={
            "levels": [
                {"in_flight": lv, "sessions": c, "budget_s": b, "rounds": r} for lv, c, b, r in plan
            ],
            "sides": {key: what for key, what, _, _ in SIDES},
            "exchanges_per_session": EXCHANGES,
            "session_timeout_s": timeout,
            "emulator_retry_after": 0,
            "tls": True,
            "open_files_limit": open_files,
            "client": "provision_async (paho-mqtt + dps_proto.paho_asyncio), one process, "
            "one shared TLS context",
            "baseline_client": "paho-mqtt + dps_proto.paho_asyncio, raw MQTT, TCP_NODELAY",
            "baseline_server": "mosquitto (TLS, set_tcp_nodelay) + a paho responder process",
        },
        results={"levels": figure, "diagnostic_nodelay": {"levels": nodelay}},
        baseline={"levels": baseline},
        ratios=ratios,
        goals=goals,
        rows=rows,
        notes=notes,
    )


def _ms_pair(measured: dict[str, Any]) -> str:
    lat = measured["latency"]
    if not lat.get("count"):
        return "n/a"
    return f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} ms"


def plot(document: dict[str, Any], path: Path) -> None:
    """Rate, latency percentiles and CPU per session, by level: ours beside raw MQTT."""
    from benchmarks.plotting import (
        BASELINE_COLOUR,
        FIGURE_COLOUR,
        grouped_bars,
        machine_footer,
        pyplot,
        save,
    )

    plt = pyplot()
    ours = document["results"]["levels"]
    base = document["baseline"]["levels"]
    levels = [str(m["in_flight"]) for m in ours]
    fig, (left, right, cpu) = plt.subplots(1, 3, figsize=(18, 5.5))
    grouped_bars(
        left,
        levels,
        {
            "provision_async -> emulator": [m["rate_per_s"] for m in ours],
            "raw MQTT -> mosquitto (baseline)": [m["rate_per_s"] for m in base],
            "provision_async + TCP_NODELAY (diagnostic)": [
                m["rate_per_s"] for m in document["results"]["diagnostic_nodelay"]["levels"]
            ],
        },
        colours=(FIGURE_COLOUR, BASELINE_COLOUR, "#9ecae1"),
        ylabel="completed sessions per second",
        title="Throughput by devices in flight (higher is better)",
        value_format="{:.0f}",
    )
    left.set_xlabel("devices in flight")
    series: dict[str, list[float | None]] = {}
    for side, data in (("emulator", ours), ("mosquitto", base)):
        for p in ("p50", "p99"):
            series[f"{p} {side}"] = [m["latency"].get(f"{p}_ms") for m in data]
    grouped_bars(
        right,
        levels,
        series,
        colours=("#1f77b4", "#0b3d66", "#a8a8a8", "#4d4d4d"),
        ylabel="latency per session, ms (log)",
        title="Latency by devices in flight (lower is better)",
        log=True,
        value_format="{:.0f}",
    )
    right.axhline(GOAL_P99_MS, color="#d62728", linestyle="--", linewidth=0.8)
    right.text(0, GOAL_P99_MS, "p99 goal", color="#d62728", fontsize=7, va="bottom")
    right.set_xlabel("devices in flight")
    grouped_bars(
        cpu,
        levels,
        {
            "client, provision_async": [m["client_cpu_ms_per_session"] for m in ours],
            "server, emulator": [m["server_cpu_ms_per_session"] for m in ours],
            "client, raw MQTT": [m["client_cpu_ms_per_session"] for m in base],
            "server, mosquitto + responder": [m["server_cpu_ms_per_session"] for m in base],
        },
        colours=("#1f77b4", "#0b3d66", "#a8a8a8", "#4d4d4d"),
        ylabel="CPU ms per completed session",
        title="CPU time per session (lower is better)",
        value_format="{:.1f}",
    )
    cpu.set_xlabel("devices in flight")
    save(
        fig,
        path,
        "DPS provisioning over MQTT/TLS vs raw MQTT sessions on mosquitto (same run)",
        machine_footer(document),
    )


BENCHMARK = Benchmark(
    name="provisioning",
    title="registrations/s and latency vs raw MQTT sessions on mosquitto",
    run=run,
    plot=plot,
    order=20,
)
