"""End-to-end telemetry through the emulator's hub, routed into mosquitto, vs raw paho.

Figure: N devices (provisioned with DPS against the emulator, one ``AsyncHubClient`` each, all in
this process) send QoS 1 telemetry to the emulator's hub over TLS; the hub stores every message and
routes it (``EmulatorConfig(route_to="mqtt://...")``) into a local mosquitto, where a subscriber in
its own process counts what arrives. Rate = messages that arrived / (last arrival - first send).

Baseline, measured in this run: raw paho-mqtt on the asyncio adapter publishing the same payloads
at the same QoS straight to the same mosquitto over TLS (the raw figure of the ``telemetry``
benchmark, measured again here). Diagnostic: the same N ``AsyncHubClient`` devices publishing
straight to mosquitto, which separates what the clients cost from what the emulator costs.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks.bench_telemetry import (
    DEVICE_KEY,
    DRAIN_TIMEOUT,
    IN_FLIGHT,
    WINDOW,
    raw_async_send,
    start_counter,
    wait_arrivals,
)
from benchmarks.common import (
    HOST,
    Benchmark,
    Context,
    Goal,
    Result,
    Row,
    client_ssl_context,
    process_cpu_seconds,
    ratio,
)
from benchmarks.telemetry_counter import CounterClient

QOS = 1
PAYLOAD_BYTES = 1024
GROUP_ID = "bench-telemetry-group"
GROUP_KEY = base64.b64encode(b"benchmark-telemetry-group-key-01").decode()


@dataclass(frozen=True)
class Plan:
    """Sizes of one run of this benchmark."""

    levels: tuple[int, ...]  # devices
    messages: int  # per side per round, spread over the devices
    budget: float  # seconds of sending per side per round, at most
    rounds: int


FULL_PLAN = Plan(levels=(10, 100), messages=10000, budget=10.0, rounds=2)
SMOKE_PLAN = Plan(levels=(3,), messages=60, budget=5.0, rounds=1)
#: Devices provisioned (and hub connections opened) at a time.
CONNECT_CONCURRENCY = 50


@dataclass
class Outcome:
    """One side's round: sent, delivered, first send to last arrival, CPU, errors."""

    sent: int = 0
    delivered: int = 0
    elapsed: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class Tally:
    """One side at one level, rounds summed."""

    sent: int = 0
    delivered: int = 0
    elapsed: float = 0.0
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    rounds: int = 0

    def add(self, outcome: Outcome) -> None:
        """Add one round."""
        self.rounds += 1
        self.sent += outcome.sent
        self.delivered += outcome.delivered
        self.elapsed += outcome.elapsed
        self.client_cpu += outcome.client_cpu
        self.server_cpu += outcome.server_cpu
        for name, n in outcome.errors.items():
            self.errors[name] = self.errors.get(name, 0) + n

    def to_json(self, devices: int) -> dict[str, Any]:
        """The side's figures for the result file."""
        per = max(1, self.delivered)
        return {
            "devices": devices,
            "rounds": self.rounds,
            "sent": self.sent,
            "delivered": self.delivered,
            "lost": max(0, self.sent - self.delivered),
            "elapsed_s": self.elapsed,
            "rate_per_s": self.delivered / self.elapsed if self.elapsed > 0 else 0.0,
            "client_cpu_us_per_message": self.client_cpu * 1e6 / per,
            "server_cpu_us_per_message": self.server_cpu * 1e6 / per,
            "errors": self.errors,
        }


async def device_send(client: Any, payload: bytes, count: int, stop_at: float) -> tuple[int, str]:
    """One device sends ``count`` messages (no new ones after ``stop_at``), waits for the last
    PUBACK (bounded); returns (sent, error type or "")."""
    outstanding: collections.deque[Any] = collections.deque()
    sent = 0
    try:
        while sent < count and time.monotonic() < stop_at:
            while outstanding and outstanding[0].done:
                outstanding.popleft()
            if len(outstanding) >= WINDOW:
                await client.wait_for(outstanding[0], DRAIN_TIMEOUT)
                continue
            outstanding.append(await client.send_message(payload, qos=QOS))
            sent += 1
            if sent % 50 == 0:
                await asyncio.sleep(0)  # let the other devices and the drivers run
        drain_until = time.monotonic() + DRAIN_TIMEOUT
        while outstanding and time.monotonic() < drain_until:
            await client.wait_for(outstanding[0], max(0.1, drain_until - time.monotonic()))
            while outstanding and outstanding[0].done:
                outstanding.popleft()
    except Exception as exc:
        return sent, type(exc).__name__
    return sent, ""


#: A side's sending: returns (messages sent, when the first was sent, errors by type).
Sender = Callable[[], Awaitable[tuple[int, float, dict[str, int]]]]


async def measured_round(
    counter: CounterClient, prefix: str, server_pids: list[int], send: Sender
) -> Outcome:
    """Run ``send``, then wait (bounded) for its messages to arrive at the counter."""
    base = int((await asyncio.to_thread(counter.count, prefix))["count"])
    cpu0 = time.process_time()
    server0 = sum(process_cpu_seconds(pid) or 0.0 for pid in server_pids)
    sent, started, errors = await send()
    arrived = await asyncio.to_thread(
        wait_arrivals, counter, prefix, sent, base=base, timeout=DRAIN_TIMEOUT
    )
    outcome = Outcome(sent=sent, delivered=int(arrived["count"]) - base, errors=errors)
    if outcome.delivered > 0 and arrived["last"] is not None and started:
        outcome.elapsed = max(0.0, float(arrived["last"]) - started)
    outcome.client_cpu = time.process_time() - cpu0
    outcome.server_cpu = sum(process_cpu_seconds(pid) or 0.0 for pid in server_pids) - server0
    return outcome


def fleet_sender(clients: list[Any], payload: bytes, messages: int, budget: float) -> Sender:
    """Every device sends its share of ``messages`` (no new ones after ``budget`` seconds)."""

    async def send() -> tuple[int, float, dict[str, int]]:
        share = [
            messages // len(clients) + (1 if i < messages % len(clients) else 0)
            for i in range(len(clients))
        ]
        started = time.monotonic()
        outcomes = await asyncio.gather(
            *(device_send(c, payload, n, started + budget) for c, n in zip(clients, share))
        )
        errors: dict[str, int] = {}
        for _, error in outcomes:
            if error:
                errors[error] = errors.get(error, 0) + 1
        return sum(n for n, _ in outcomes), started, errors

    return send


def raw_sender(
    tag: str, payload: bytes, messages: int, budget: float, port: int, ca_file: Path
) -> Sender:
    """One raw paho client on the asyncio adapter (connects first; not timed)."""

    async def send() -> tuple[int, float, dict[str, int]]:
        sent = await raw_async_send(tag, payload, QOS, messages, budget, port, ca_file)
        return sent.sent, sent.started, sent.errors

    return send


async def connect_all(clients: list[Any]) -> None:
    """Connect every client, a bounded number at a time."""
    for start in range(0, len(clients), CONNECT_CONCURRENCY):
        await asyncio.gather(
            *(c.connect(timeout=30.0) for c in clients[start : start + CONNECT_CONCURRENCY])
        )


async def close_all(clients: list[Any]) -> None:
    """Close every client (bounded)."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(
            asyncio.gather(*(c.aclose(timeout=2.0) for c in clients), return_exceptions=True),
            60.0,
        )


async def provision_all(emulator: Any, ids: list[str]) -> list[Any]:
    """Provision ``ids`` with the emulator's DPS (group enrollment), a bounded number at a time."""
    from dps_proto import provision_async

    context = client_ssl_context(emulator.ca_file)
    limit = asyncio.Semaphore(CONNECT_CONCURRENCY)

    async def one(registration_id: str) -> Any:
        async with limit:
            return await provision_async(
                provisioning_host=HOST,
                port=emulator.mqtt_port,
                id_scope=emulator.id_scope,
                registration_id=registration_id,
                group_key=GROUP_KEY,
                ssl_context=context,
                timeout=60.0,
            )

    return list(await asyncio.gather(*(one(r) for r in ids)))


def run(ctx: Context) -> Result:
    """Fresh emulator routing into the run's mosquitto; per level: provision, connect, rounds."""
    from dps_proto import derive_device_key
    from emulator.service_client import ServiceClient
    from hub_proto import AsyncHubClient, QueueLimits

    plan: Plan = ctx.pick(FULL_PLAN, SMOKE_PLAN)
    broker = ctx.mosquitto()
    ca_file, _, _ = ctx.tls_files()
    counter_process, counter = start_counter(ctx, broker.plain_port)
    route = f"mqtt://{HOST}:{broker.plain_port}"
    process = ctx.start_emulator(retry_after=0, route_to=route)
    emulator = process.emulator
    api = ServiceClient(emulator.api_url)
    ctx.progress(f"emulator pid {emulator.pid} routing telemetry to {route}")
    api.create_group(GROUP_ID, primary_key=GROUP_KEY)
    deadline = time.monotonic() + 10.0
    while not (api.info().get("telemetryRoute") or {}).get("connected"):
        if time.monotonic() > deadline:
            raise RuntimeError("the emulator's telemetry route did not connect within 10 s")
        time.sleep(0.05)
    queue = QueueLimits(max_messages=WINDOW, max_bytes=64 << 20, max_in_flight=IN_FLIGHT)
    payload = bytes(PAYLOAD_BYTES)
    stamp = time.strftime("%H%M%S")
    measured: dict[str, list[dict[str, Any]]] = {"emulator": [], "direct": [], "raw": []}
    routes: list[dict[str, Any]] = []

    async def level_run(devices: int) -> None:
        tallies = {key: Tally() for key in measured}
        prefix = f"e{devices}x{stamp}"
        t0 = time.monotonic()
        assignments = await provision_all(emulator, [f"{prefix}-{i:05d}" for i in range(devices)])
        ctx.progress(f"{devices} devices provisioned in {time.monotonic() - t0:.1f} s")
        via_emulator = [
            AsyncHubClient.from_assignment(
                a,
                symmetric_key=derive_device_key(GROUP_KEY, a.registration_id),
                port=emulator.mqtt_port,
                ca_file=emulator.ca_file,
                queue=queue,
            )
            for a in assignments
        ]
        direct_prefix = f"d{devices}x{stamp}"
        direct = [
            AsyncHubClient(
                "localhost",
                f"{direct_prefix}-{i:05d}",
                symmetric_key=DEVICE_KEY,
                port=broker.tls_port,
                ca_file=str(ca_file),
                queue=queue,
            )
            for i in range(devices)
        ]
        try:
            await connect_all(via_emulator)
            await connect_all(direct)
            route0 = dict(api.info().get("telemetryRoute") or {})
            broker_pids = [pid for pid in (broker.pid,) if pid is not None]
            for round_index in range(plan.rounds):
                raw_tag = f"r{devices}x{stamp}-{round_index}"
                sides: list[tuple[str, str, list[int], Sender]] = [
                    (
                        "raw",
                        raw_tag,
                        broker_pids,
                        raw_sender(
                            raw_tag, payload, plan.messages, plan.budget, broker.tls_port, ca_file
                        ),
                    ),
                    (
                        "direct",
                        direct_prefix,
                        broker_pids,
                        fleet_sender(direct, payload, plan.messages, plan.budget),
                    ),
                    (
                        "emulator",
                        prefix,
                        [emulator.pid, *broker_pids],
                        fleet_sender(via_emulator, payload, plan.messages, plan.budget),
                    ),
                ]
                order = sides if round_index % 2 == 0 else list(reversed(sides))
                for key, count_prefix, pids, sender in order:
                    outcome = await measured_round(counter, count_prefix, pids, sender)
                    tallies[key].add(outcome)
                    rate = outcome.delivered / outcome.elapsed if outcome.elapsed > 0 else 0.0
                    ctx.progress(
                        f"{devices} devices, round {round_index + 1}/{plan.rounds}, {key}: "
                        f"{outcome.delivered}/{outcome.sent} arrived, {rate:.0f}/s"
                        + (f", errors {outcome.errors}" if outcome.errors else "")
                    )
            route1 = dict(api.info().get("telemetryRoute") or {})
            routes.append(
                {
                    "devices": devices,
                    **{
                        name: int(route1.get(name, 0)) - int(route0.get(name, 0))
                        for name in ("forwarded", "failed", "dropped", "connectFailures")
                    },
                }
            )
        finally:
            await close_all(via_emulator + direct)
        for key, tally in tallies.items():
            measured[key].append(tally.to_json(devices))

    try:
        for devices in plan.levels:
            ctx.progress(
                f"{devices} devices: {plan.messages} messages per side per round, "
                f"{plan.rounds} round(s), QoS {QOS}, {PAYLOAD_BYTES} B"
            )
            asyncio.run(level_run(devices))
    finally:
        counter.close()
        counter_process.stop()
        process.stop()
    return _result(plan, measured, routes)


def _result(
    plan: Plan, measured: dict[str, list[dict[str, Any]]], routes: list[dict[str, Any]]
) -> Result:
    ratios: dict[str, float | None] = {}
    rows: list[Row] = []
    for ours, direct, base in zip(measured["emulator"], measured["direct"], measured["raw"]):
        n = ours["devices"]
        ratios[f"emulator_x{n}"] = ratio(ours["rate_per_s"], base["rate_per_s"])
        ratios[f"direct_x{n}"] = ratio(direct["rate_per_s"], base["rate_per_s"])
        rows.append(
            Row(
                f"messages/s delivered, {n} devices -> emulator hub -> route -> mosquitto vs "
                f"1 raw paho client -> mosquitto (QoS {QOS}, 1 KiB)",
                f"{ours['rate_per_s']:.0f}/s",
                f"{base['rate_per_s']:.0f}/s",
                ratios[f"emulator_x{n}"],
            )
        )
        rows.append(
            Row(
                f"diagnostic: the same {n} devices straight to mosquitto (no emulator)",
                f"{direct['rate_per_s']:.0f}/s",
                "as above",
                ratios[f"direct_x{n}"],
            )
        )
    notes = []
    for key, runs in measured.items():
        lost = {m["devices"]: m["lost"] for m in runs if m["lost"]}
        if lost:
            notes.append(f"{key}: messages sent but not delivered (by devices): {lost}")
        failed = {m["devices"]: m["errors"] for m in runs if m["errors"]}
        if failed:
            notes.append(f"{key}: errors (by devices): {failed}")
    for route in routes:
        if route["failed"] or route["dropped"]:
            notes.append(
                f"the emulator's telemetry route at {route['devices']} devices: "
                f"{route['failed']} publishes refused, {route['dropped']} dropped (queue full)"
            )
    goals: list[Goal] = []
    return Result(
        params={
            "levels": list(plan.levels),
            "messages_per_side_per_round": plan.messages,
            "send_budget_s_per_side_per_round": plan.budget,
            "rounds": plan.rounds,
            "qos": QOS,
            "payload_bytes": PAYLOAD_BYTES,
            "outstanding_window_per_device": WINDOW,
            "in_flight_per_device": IN_FLIGHT,
            "figure": "AsyncHubClient devices (one process) -> emulator hub (TLS) -> "
            "telemetry route (paho, plain MQTT) -> mosquitto -> counting subscriber",
            "baseline": "one raw paho client on the asyncio adapter -> mosquitto (TLS) -> "
            "counting subscriber",
            "diagnostic": "the same AsyncHubClient devices -> mosquitto (TLS) directly",
        },
        results={"levels": measured["emulator"], "direct": measured["direct"], "route": routes},
        baseline={"levels": measured["raw"]},
        ratios=ratios,
        goals=goals,
        rows=rows,
        notes=notes,
    )


def plot(document: dict[str, Any], path: Path) -> None:
    """Delivered messages/s by devices, and CPU per message, for the three sides."""
    from benchmarks.plotting import grouped_bars, machine_footer, pyplot, save

    plt = pyplot()
    ours = document["results"]["levels"]
    direct = document["results"]["direct"]
    base = document["baseline"]["levels"]
    levels = [f"{m['devices']} devices" for m in ours]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    grouped_bars(
        left,
        levels,
        {
            "devices -> emulator -> route -> mosquitto": [m["rate_per_s"] for m in ours],
            "1 raw paho client -> mosquitto (baseline)": [m["rate_per_s"] for m in base],
            "devices -> mosquitto (diagnostic)": [m["rate_per_s"] for m in direct],
        },
        colours=("#1f77b4", "#7f7f7f", "#9ecae1"),
        ylabel="messages delivered per second",
        title="Delivered messages/s, QoS 1, 1 KiB (higher is better)",
        value_format="{:.0f}",
    )
    grouped_bars(
        right,
        levels,
        {
            "devices' process, via the emulator": [m["client_cpu_us_per_message"] for m in ours],
            "emulator + mosquitto": [m["server_cpu_us_per_message"] for m in ours],
            "devices' process, straight to mosquitto": [
                m["client_cpu_us_per_message"] for m in direct
            ],
            "raw client": [m["client_cpu_us_per_message"] for m in base],
            "mosquitto (raw)": [m["server_cpu_us_per_message"] for m in base],
        },
        colours=("#1f77b4", "#0b3d66", "#9ecae1", "#a8a8a8", "#4d4d4d"),
        ylabel="CPU microseconds per delivered message",
        title="CPU per message (lower is better)",
        value_format="{:.0f}",
    )
    save(
        fig,
        path,
        "Telemetry end to end through the emulator's hub and route vs raw paho (same run)",
        machine_footer(document),
    )


BENCHMARK = Benchmark(
    name="emulator_telemetry",
    title="telemetry messages/s through the emulator's hub into mosquitto vs raw paho-mqtt",
    run=run,
    plot=plot,
    order=60,
)
