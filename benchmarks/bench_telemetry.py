"""Telemetry throughput: hub_proto publishing to mosquitto (TLS) vs raw paho-mqtt, same broker.

Figure: one hub_proto client (``AsyncHubClient``, and the blocking ``HubClient``) sending
telemetry as fast as it is accepted to a local mosquitto over TLS, at QoS 0 and QoS 1 with 64 B,
1 KiB and 16 KiB payloads. Baseline, same run, same broker, same payloads and topics: a raw
paho-mqtt client publishing them, driven the same way (paho on the same asyncio adapter for the
asyncio pair; paho's own network thread, ``loop_start``, for the blocking pair).

A subscriber in its own process (:mod:`benchmarks.telemetry_counter`) counts what the broker
delivers, so nothing is counted that was not delivered: rate = messages that arrived / (last
arrival - first publish). Every run is bounded by a count and by a time budget.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from benchmarks.common import (
    Benchmark,
    ChildProcess,
    Context,
    Goal,
    Result,
    Row,
    client_ssl_context,
    process_cpu_seconds,
    ratio,
)
from benchmarks.telemetry_counter import CounterClient

#: Messages accepted but not yet done, at most, on every side: the producer waits for the oldest
#: one when it has this many outstanding (hub_proto's ``QueueLimits.max_messages`` default).
WINDOW = 1000
#: QoS 1 messages in flight (published, PUBACK awaited): paho's ``max_inflight_messages``
#: default and hub_proto's ``QueueLimits.max_in_flight`` default, set explicitly on both sides.
IN_FLIGHT = 20
#: Bound on waiting for the last acknowledgement, and separately for the last arrival (seconds).
DRAIN_TIMEOUT = 15.0
#: A symmetric key of the right form; mosquitto accepts any user name and password.
DEVICE_KEY = base64.b64encode(b"benchmark-device-key-0123456789a").decode()
GOAL_RATIO = 0.95


@dataclass(frozen=True)
class Plan:
    """Sizes of one run of this benchmark."""

    qos: tuple[int, ...]
    sizes: tuple[int, ...]
    count: int  # messages per side per round, at most
    budget: float  # seconds of sending per side per round, at most
    rounds: int


FULL_PLAN = Plan(qos=(0, 1), sizes=(64, 1024, 16384), count=25000, budget=3.0, rounds=2)
SMOKE_PLAN = Plan(qos=(0, 1), sizes=(64,), count=200, budget=3.0, rounds=1)


@dataclass
class Sent:
    """What a producer did: when it started, how many it handed over and saw completed."""

    started: float = 0.0  # time.monotonic() just before the first publish
    finished: float = 0.0  # when the last one was completed (acknowledged or written)
    sent: int = 0
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, exc: BaseException) -> None:
        """Count an error by its type."""
        name = type(exc).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


Producer = Callable[[str, bytes, int, int, float], Sent]


# -- arrivals ------------------------------------------------------------------------------------


def start_counter(ctx: Context, plain_port: int) -> tuple[ChildProcess, CounterClient]:
    """The counting subscriber on the broker's plain listener, and a client of its control port."""
    counter = ctx.child("telemetry_counter", ["--port", str(plain_port)])
    return counter, CounterClient(int(counter.info["control_port"]))


def wait_arrivals(
    counter: CounterClient, prefix: str, expected: int, *, base: int = 0, timeout: float
) -> dict[str, Any]:
    """Wait (bounded) until ``base + expected`` messages of devices ``prefix*`` arrived.

    Stops early when nothing more arrives for a few seconds. Returns the counter's totals.
    """
    deadline = time.monotonic() + timeout
    last_count, last_change = -1, time.monotonic()
    summary = counter.count(prefix)
    while time.monotonic() < deadline and summary["count"] < base + expected:
        if summary["count"] != last_count:
            last_count, last_change = summary["count"], time.monotonic()
        elif time.monotonic() - last_change > 3.0:
            break
        time.sleep(0.02)
        summary = counter.count(prefix)
    return summary


# -- the four producers ------------------------------------------------------------------------


def _raw_client(tag: str, ca_file: Path) -> Any:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=tag,
        clean_session=True,
        protocol=mqtt.MQTTv311,
        reconnect_on_failure=False,
    )
    # The same TLS settings as hub_proto's (TLS 1.2+, host name check) plus TCP_NODELAY, which
    # hub_proto sets on its sockets itself.
    client.tls_set_context(client_ssl_context(ca_file, nodelay=True))
    client.username_pw_set(f"localhost/{tag}/?api-version=2021-04-12", "not-checked")
    client.max_inflight_messages_set(IN_FLIGHT)
    client.max_queued_messages_set(0)  # unbounded inside paho: WINDOW bounds it
    client.connect_timeout = 10.0
    return client


def _close_raw(client: Any) -> None:
    reset = getattr(client, "_reset_sockets", None)
    if callable(reset):
        with contextlib.suppress(OSError):
            reset()


def topic_of(tag: str) -> str:
    """The telemetry topic hub_proto uses for device ``tag`` and a message without properties."""
    return f"devices/{tag}/messages/events/"


def raw_async_producer(port: int, ca_file: Path) -> Producer:
    """Raw paho on :class:`~dps_proto.paho_asyncio.AsyncioPahoAdapter` (hub_proto's driver)."""

    def produce(tag: str, payload: bytes, qos: int, count: int, budget: float) -> Sent:
        return asyncio.run(raw_async_send(tag, payload, qos, count, budget, port, ca_file))

    return produce


async def raw_async_send(
    tag: str, payload: bytes, qos: int, count: int, budget: float, port: int, ca_file: Path
) -> Sent:
    """Connect raw paho on the asyncio adapter, publish ``count`` messages (at most ``budget``
    seconds of sending), wait for the last to complete (bounded), disconnect."""
    from dps_proto.paho_asyncio import AsyncioPahoAdapter

    loop = asyncio.get_running_loop()
    client = _raw_client(tag, ca_file)
    connected: asyncio.Future[None] = loop.create_future()
    progressed = asyncio.Event()

    def on_connect(_c: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        if not connected.done():
            if reason.is_failure:
                connected.set_exception(ConnectionError(f"CONNACK {reason}"))
            else:
                connected.set_result(None)

    client.on_connect = on_connect
    client.on_publish = lambda *_args: progressed.set()
    adapter = AsyncioPahoAdapter(client, loop)
    result = Sent()
    try:
        client.connect("localhost", port, keepalive=60)
        await asyncio.wait_for(connected, 10.0)
        topic = topic_of(tag)
        outstanding: collections.deque[Any] = collections.deque()
        result.started = time.monotonic()
        stop_at = result.started + budget
        drain_until = stop_at + DRAIN_TIMEOUT
        while result.sent < count and time.monotonic() < stop_at:
            while outstanding and outstanding[0].is_published():
                outstanding.popleft()
                result.completed += 1
            if len(outstanding) >= WINDOW:
                progressed.clear()
                await asyncio.wait_for(progressed.wait(), DRAIN_TIMEOUT)
                continue
            outstanding.append(client.publish(topic, payload, qos=qos))
            result.sent += 1
        while outstanding and time.monotonic() < drain_until:
            while outstanding and outstanding[0].is_published():
                outstanding.popleft()
                result.completed += 1
            if outstanding:
                progressed.clear()
                await asyncio.wait_for(progressed.wait(), DRAIN_TIMEOUT)
        result.finished = time.monotonic()
        await adapter.disconnect(1.0)
    except Exception as exc:
        result.error(exc)
    finally:
        adapter.close()
        _close_raw(client)
    return result


def raw_thread_producer(port: int, ca_file: Path) -> Producer:
    """Raw paho as most applications use it: its own network thread (``loop_start``)."""

    def produce(tag: str, payload: bytes, qos: int, count: int, budget: float) -> Sent:
        client = _raw_client(tag, ca_file)
        connected = threading.Event()
        client.on_connect = lambda *_args: connected.set()
        result = Sent()
        try:
            client.connect("localhost", port, keepalive=60)
            client.loop_start()
            if not connected.wait(10.0):
                raise TimeoutError("no CONNACK in 10 s")
            topic = topic_of(tag)
            outstanding: collections.deque[Any] = collections.deque()
            result.started = time.monotonic()
            stop_at = result.started + budget
            while result.sent < count and time.monotonic() < stop_at:
                while outstanding and outstanding[0].is_published():
                    outstanding.popleft()
                    result.completed += 1
                if len(outstanding) >= WINDOW:
                    outstanding[0].wait_for_publish(DRAIN_TIMEOUT)
                    continue
                outstanding.append(client.publish(topic, payload, qos=qos))
                result.sent += 1
            drain_until = time.monotonic() + DRAIN_TIMEOUT
            while outstanding and time.monotonic() < drain_until:
                outstanding[0].wait_for_publish(max(0.0, drain_until - time.monotonic()))
                if outstanding[0].is_published():
                    outstanding.popleft()
                    result.completed += 1
            result.finished = time.monotonic()
            client.disconnect()
        except Exception as exc:
            result.error(exc)
        finally:
            client.loop_stop()
            _close_raw(client)
        return result

    return produce


def _hub_kwargs(port: int, ca_file: Path) -> dict[str, Any]:
    from hub_proto import QueueLimits

    return {
        "symmetric_key": DEVICE_KEY,
        "port": port,
        "ca_file": str(ca_file),
        "queue": QueueLimits(max_messages=WINDOW, max_bytes=64 << 20, max_in_flight=IN_FLIGHT),
    }


def hub_async_producer(port: int, ca_file: Path) -> Producer:
    """hub_proto's ``AsyncHubClient``."""

    def produce(tag: str, payload: bytes, qos: int, count: int, budget: float) -> Sent:
        return asyncio.run(hub_async_send(tag, payload, qos, count, budget, port, ca_file))

    return produce


async def hub_async_send(
    tag: str, payload: bytes, qos: int, count: int, budget: float, port: int, ca_file: Path
) -> Sent:
    """As :func:`raw_async_send` with an ``AsyncHubClient`` (waits on the oldest ticket)."""
    from hub_proto import AsyncHubClient

    client = AsyncHubClient("localhost", tag, **_hub_kwargs(port, ca_file))
    result = Sent()
    try:
        await client.connect(timeout=10.0)
        outstanding: collections.deque[Any] = collections.deque()
        result.started = time.monotonic()
        stop_at = result.started + budget
        while result.sent < count and time.monotonic() < stop_at:
            while outstanding and outstanding[0].done:
                outstanding.popleft()
                result.completed += 1
            if len(outstanding) >= WINDOW:
                await client.wait_for(outstanding[0], DRAIN_TIMEOUT)
                continue
            outstanding.append(await client.send_message(payload, qos=qos))
            result.sent += 1
        drain_until = time.monotonic() + DRAIN_TIMEOUT
        while outstanding and time.monotonic() < drain_until:
            await client.wait_for(outstanding[0], max(0.1, drain_until - time.monotonic()))
            while outstanding and outstanding[0].done:
                outstanding.popleft()
                result.completed += 1
        result.finished = time.monotonic()
    except Exception as exc:
        result.error(exc)
    finally:
        await client.aclose(timeout=2.0)
    return result


def hub_thread_producer(port: int, ca_file: Path) -> Producer:
    """hub_proto's blocking ``HubClient`` (its network thread runs the same driver)."""

    def produce(tag: str, payload: bytes, qos: int, count: int, budget: float) -> Sent:
        from hub_proto import HubClient

        client = HubClient("localhost", tag, **_hub_kwargs(port, ca_file))
        result = Sent()
        try:
            client.connect(timeout=10.0)
            outstanding: collections.deque[Any] = collections.deque()
            result.started = time.monotonic()
            stop_at = result.started + budget
            while result.sent < count and time.monotonic() < stop_at:
                while outstanding and outstanding[0].done:
                    outstanding.popleft()
                    result.completed += 1
                if len(outstanding) >= WINDOW:
                    client.wait_for(outstanding[0], DRAIN_TIMEOUT)
                    continue
                outstanding.append(client.send_message(payload, qos=qos))
                result.sent += 1
            drain_until = time.monotonic() + DRAIN_TIMEOUT
            while outstanding and time.monotonic() < drain_until:
                client.wait_for(outstanding[0], max(0.1, drain_until - time.monotonic()))
                while outstanding and outstanding[0].done:
                    outstanding.popleft()
                    result.completed += 1
            result.finished = time.monotonic()
        except Exception as exc:
            result.error(exc)
        finally:
            client.close(timeout=2.0)
        return result

    return produce


# -- the benchmark -----------------------------------------------------------------------------

#: (key, label, producer factory). Pairs: (hub_async, raw_async) and (hub_thread, raw_thread).
SIDES: tuple[tuple[str, str, Callable[[int, Path], Producer]], ...] = (
    ("raw_async", "raw paho on the asyncio adapter", raw_async_producer),
    ("hub_async", "AsyncHubClient", hub_async_producer),
    ("raw_thread", "raw paho, loop_start thread", raw_thread_producer),
    ("hub_thread", "HubClient (blocking)", hub_thread_producer),
)
#: (figure, baseline) pairs.
PAIRS = (("hub_async", "raw_async"), ("hub_thread", "raw_thread"))


@dataclass
class Tally:
    """One side at one (QoS, size), its rounds summed."""

    sent: int = 0
    completed: int = 0
    delivered: int = 0
    elapsed: float = 0.0  # first publish to last arrival, summed over rounds
    send_elapsed: float = 0.0  # first publish to last completion, summed
    client_cpu: float = 0.0
    broker_cpu: float = 0.0
    counter_cpu: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)
    rounds: int = 0

    def to_json(self, qos: int, size: int) -> dict[str, Any]:
        """The side's figures for the result file."""
        per = max(1, self.delivered)
        return {
            "qos": qos,
            "payload_bytes": size,
            "rounds": self.rounds,
            "sent": self.sent,
            "completed": self.completed,
            "delivered": self.delivered,
            "lost": max(0, self.sent - self.delivered),
            "elapsed_s": self.elapsed,
            "rate_per_s": self.delivered / self.elapsed if self.elapsed > 0 else 0.0,
            "send_rate_per_s": self.completed / self.send_elapsed if self.send_elapsed else 0.0,
            "client_cpu_us_per_message": self.client_cpu * 1e6 / per,
            "broker_cpu_us_per_message": self.broker_cpu * 1e6 / per,
            "counter_cpu_us_per_message": self.counter_cpu * 1e6 / per,
            "counter_cpu_cores": self.counter_cpu / self.elapsed if self.elapsed > 0 else 0.0,
            "errors": self.errors,
        }


def measure_once(
    produce: Producer,
    counter: CounterClient,
    tag: str,
    payload: bytes,
    qos: int,
    count: int,
    budget: float,
    pids: tuple[int | None, int | None],
) -> tuple[Sent, dict[str, Any], dict[str, float]]:
    """One run of one side: produce, then wait for the arrivals; with the CPU each process used."""
    broker_pid, counter_pid = pids
    cpu0 = time.process_time()
    broker0 = process_cpu_seconds(broker_pid) if broker_pid else None
    counter0 = process_cpu_seconds(counter_pid) if counter_pid else None
    sent = produce(tag, payload, qos, count, budget)
    arrived = wait_arrivals(counter, tag, sent.sent, timeout=DRAIN_TIMEOUT)
    broker1 = process_cpu_seconds(broker_pid) if broker_pid else None
    counter1 = process_cpu_seconds(counter_pid) if counter_pid else None
    cpu = {
        "client": time.process_time() - cpu0,
        "broker": (broker1 or 0.0) - (broker0 or 0.0),
        "counter": (counter1 or 0.0) - (counter0 or 0.0),
    }
    return sent, arrived, cpu


def run(ctx: Context) -> Result:
    """Per QoS and payload size: rounds in which the four sides take turns (order alternating)."""
    plan: Plan = ctx.pick(FULL_PLAN, SMOKE_PLAN)
    broker = ctx.mosquitto()
    ca_file, _, _ = ctx.tls_files()
    counter_process, counter = start_counter(ctx, broker.plain_port)
    ctx.progress(f"telemetry counter pid {counter_process.pid} on mosquitto's plain listener")
    producers = {key: factory(broker.tls_port, ca_file) for key, _, factory in SIDES}
    stamp = time.strftime("%H%M%S")
    tallies: dict[tuple[str, int, int], Tally] = {}
    try:
        # Warm-up (not measured): every side once, so that imports and caches are in place.
        for key, _, _ in SIDES:
            tag = f"warm-{key}-{stamp}"
            sent, _, _ = measure_once(
                producers[key],
                counter,
                tag,
                b"w" * 64,
                1,
                min(200, plan.count),
                5.0,
                (None, None),
            )
            if sent.errors:
                ctx.progress(f"warm-up {key}: errors {sent.errors}")
        for qos in plan.qos:
            for size in plan.sizes:
                payload = bytes(size)
                for round_index in range(plan.rounds):
                    order = list(SIDES) if round_index % 2 == 0 else list(reversed(SIDES))
                    for key, _, _ in order:
                        tag = f"tel-{key}-q{qos}-{size}-r{round_index}-{stamp}"
                        sent, arrived, cpu = measure_once(
                            producers[key],
                            counter,
                            tag,
                            payload,
                            qos,
                            plan.count,
                            plan.budget,
                            (broker.pid, counter_process.pid),
                        )
                        tally = tallies.setdefault((key, qos, size), Tally())
                        _add(tally, sent, arrived, cpu)
                        rate = (
                            arrived["count"] / (arrived["last"] - sent.started)
                            if arrived["count"] and arrived["last"]
                            else 0.0
                        )
                        ctx.progress(
                            f"QoS {qos}, {size} B, round {round_index + 1}/{plan.rounds}, {key}: "
                            f"{arrived['count']}/{sent.sent} arrived, {rate:.0f}/s"
                            + (f", errors {sent.errors}" if sent.errors else "")
                        )
    finally:
        counter.close()
        counter_process.stop()
    return _result(plan, tallies)


def _add(tally: Tally, sent: Sent, arrived: dict[str, Any], cpu: dict[str, float]) -> None:
    tally.rounds += 1
    tally.sent += sent.sent
    tally.completed += sent.completed
    tally.delivered += int(arrived["count"])
    if arrived["count"] and arrived["last"] is not None and sent.started:
        tally.elapsed += max(1e-9, float(arrived["last"]) - sent.started)
    if sent.finished and sent.started:
        tally.send_elapsed += sent.finished - sent.started
    tally.client_cpu += cpu["client"]
    tally.broker_cpu += cpu["broker"]
    tally.counter_cpu += cpu["counter"]
    for name, n in sent.errors.items():
        tally.errors[name] = tally.errors.get(name, 0) + n


def _result(plan: Plan, tallies: dict[tuple[str, int, int], Tally]) -> Result:
    sides: dict[str, list[dict[str, Any]]] = {key: [] for key, _, _ in SIDES}
    for qos in plan.qos:
        for size in plan.sizes:
            for key, _, _ in SIDES:
                sides[key].append(tallies.get((key, qos, size), Tally()).to_json(qos, size))
    ratios: dict[str, float | None] = {}
    goals: list[Goal] = []
    rows: list[Row] = []
    labels = {key: label for key, label, _ in SIDES}
    for figure_key, base_key in PAIRS:
        for ours, base in zip(sides[figure_key], sides[base_key]):
            name = f"{figure_key}_q{ours['qos']}_{ours['payload_bytes']}"
            value = ratio(ours["rate_per_s"], base["rate_per_s"])
            ratios[name] = value
            goal = Goal(name, ">=", GOAL_RATIO, value)
            goals.append(goal)
            rows.append(
                Row(
                    f"messages/s delivered, {labels[figure_key]} vs {labels[base_key]}, "
                    f"QoS {ours['qos']}, {_size(ours['payload_bytes'])}",
                    f"{ours['rate_per_s']:.0f}/s",
                    f"{base['rate_per_s']:.0f}/s",
                    value,
                    f">= {GOAL_RATIO}",
                    goal.met,
                )
            )
    notes = []
    for key, runs in sides.items():
        lost = {f"q{m['qos']}/{m['payload_bytes']}": m["lost"] for m in runs if m["lost"]}
        if lost:
            notes.append(f"{key}: messages sent but not delivered: {lost}")
        failed = {f"q{m['qos']}/{m['payload_bytes']}": m["errors"] for m in runs if m["errors"]}
        if failed:
            notes.append(f"{key}: errors: {failed}")
    busiest = max((m["counter_cpu_cores"] for runs in sides.values() for m in runs), default=0.0)
    if busiest > 0.8:
        notes.append(
            f"the counting subscriber used up to {busiest:.2f} of a core: it may have limited "
            "the fastest runs"
        )
    baseline_keys = {base for _, base in PAIRS}
    return Result(
        params={
            "qos": list(plan.qos),
            "payload_bytes": list(plan.sizes),
            "messages_per_side_per_round": plan.count,
            "send_budget_s_per_side_per_round": plan.budget,
            "rounds": plan.rounds,
            "outstanding_window": WINDOW,
            "qos1_in_flight": {
                "hub_proto": f"QueueLimits(max_in_flight={IN_FLIGHT}) (paho's own window off)",
                "raw paho": f"max_inflight_messages_set({IN_FLIGHT}) (paho's default)",
            },
            "qos0_in_flight": {
                "hub_proto": "unbounded (QueueLimits.max_in_flight bounds QoS 1 only; the "
                f"outstanding window of {WINDOW} bounds it)",
                "raw paho": "unbounded (paho does not window QoS 0; the outstanding window of "
                f"{WINDOW} bounds it)",
            },
            "tls": "TLS 1.2+ with host name check, TCP_NODELAY on both sides",
            "broker": "mosquitto (set_tcp_nodelay, max_queued_messages 0, persistence off)",
            "subscriber": "benchmarks.telemetry_counter (raw sockets, plain listener, QoS 1)",
            "sides": {key: label for key, label, _ in SIDES},
            "pairs": [list(pair) for pair in PAIRS],
        },
        results={key: runs for key, runs in sides.items() if key not in baseline_keys},
        baseline={key: runs for key, runs in sides.items() if key in baseline_keys},
        ratios=ratios,
        goals=goals,
        rows=rows,
        notes=notes,
    )


def _size(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def plot(document: dict[str, Any], path: Path) -> None:
    """Delivered messages/s per payload size, one panel per QoS; and the ratios."""
    from benchmarks.plotting import grouped_bars, machine_footer, pyplot, save

    plt = pyplot()
    params = document["params"]
    sides = {**document["results"], **document["baseline"]}
    labels = params["sides"]
    qos_levels = params["qos"]
    fig, axes = plt.subplots(1, len(qos_levels) + 1, figsize=(6 * (len(qos_levels) + 1), 5.5))
    colours = ("#1f77b4", "#7f7f7f", "#ff7f0e", "#c7c7c7")
    order = ("hub_async", "raw_async", "hub_thread", "raw_thread")
    for ax, qos in zip(axes, qos_levels):
        runs = {key: [m for m in sides[key] if m["qos"] == qos] for key in order}
        categories = [_size(m["payload_bytes"]) for m in runs[order[0]]]
        grouped_bars(
            ax,
            categories,
            {labels[key]: [m["rate_per_s"] for m in runs[key]] for key in order},
            colours=colours,
            ylabel="messages delivered per second",
            title=f"QoS {qos}: delivered messages/s (higher is better)",
            value_format="{:.0f}",
        )
        ax.set_xlabel("payload")
    ratio_ax = axes[-1]
    series: dict[str, list[float | None]] = {}
    categories = []
    for qos in qos_levels:
        for size in params["payload_bytes"]:
            categories.append(f"Q{qos} {_size(size)}")
    for figure_key, base_key in params["pairs"]:
        series[f"{labels[figure_key]} / {labels[base_key]}"] = [
            document["ratios"].get(f"{figure_key}_q{qos}_{size}")
            for qos in qos_levels
            for size in params["payload_bytes"]
        ]
    grouped_bars(
        ratio_ax,
        categories,
        series,
        colours=("#1f77b4", "#ff7f0e"),
        ylabel="ratio (hub_proto / raw paho)",
        title="Ratio to raw paho (goal >= 0.95)",
        value_format="{:.2f}",
    )
    ratio_ax.axhline(GOAL_RATIO, color="#d62728", linestyle="--", linewidth=0.8)
    ratio_ax.tick_params(axis="x", labelsize=7)
    save(
        fig,
        path,
        "Telemetry to mosquitto over TLS: hub_proto vs raw paho-mqtt (same run, same broker)",
        machine_footer(document),
    )


BENCHMARK = Benchmark(
    name="telemetry",
    title="telemetry messages/s: hub_proto vs raw paho-mqtt on mosquitto (TLS)",
    run=run,
    plot=plot,
    order=50,
)
