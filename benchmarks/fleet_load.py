"""Child process: connect a fleet of devices from one asyncio process and report its memory.

``--kind hub``: :class:`hub_proto.AsyncHubClient` per device (devices of a symmetric-key enrollment
group, already provisioned: the device id is the registration id, the key is derived from the
group key). ``--kind raw``: the floor, a bare paho-mqtt client per device on the same asyncio
adapter (:class:`dps_proto.paho_asyncio.AsyncioPahoAdapter`), subscribed to the same four topic
filters, against any broker. Every client shares one TLS context.

The process imports everything and connects one device first (so that lazily loaded modules
and caches are in place), then reads its resident set size (``VmRSS`` in ``/proc/self/status``)
and the server's, connects the rest in batches of bounded concurrency until all are connected
or the time budget runs out, waits for the connections to settle, and reads both again.
It prints JSON lines: ``{"progress": ...}`` while it works, then one ``{"result": ...}``; then it
closes every client (bounded) and exits. It stops early when its standard input closes.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import client_ssl_context, process_cpu_seconds, raise_open_files_limit

#: The filters a hub device subscribes to (twin responses, desired patches, methods, C2D).
RAW_FILTERS = (
    "$iothub/twin/res/#",
    "$iothub/twin/PATCH/properties/desired/#",
    "$iothub/methods/POST/#",
)
#: Bound on closing the whole fleet at the end (what is left is closed by the exit).
CLOSE_TIMEOUT = 20.0


def rss_kb(pid: int | str = "self") -> int | None:
    """``VmRSS`` of a process in KiB (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def emit(kind: str, value: Any) -> None:
    """One JSON line on standard output."""
    print(json.dumps({kind: value}), flush=True)


class RawDevice:
    """A bare paho client on the asyncio adapter: connect, subscribe, stay connected."""

    def __init__(self, device_id: str, host: str, port: int, context: Any, password: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.device_id = device_id
        self.host, self.port = host, port
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=device_id,
            clean_session=True,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(context)
        self.client.username_pw_set(f"{host}/{device_id}/?api-version=2021-04-12", password)
        self.client.connect_timeout = 10.0
        self.adapter: Any = None

    async def connect(self, timeout: float) -> None:
        """Connect, subscribe to the hub's four filters, wait for SUBACK."""
        from dps_proto.paho_asyncio import AsyncioPahoAdapter

        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        filters = [(f, 1) for f in RAW_FILTERS]
        filters.append((f"devices/{self.device_id}/messages/devicebound/#", 1))

        def on_connect(client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
            if reason.is_failure:
                if not done.done():
                    done.set_exception(ConnectionError(f"CONNACK {reason}"))
                return
            client.subscribe(filters)

        def on_subscribe(*_args: Any) -> None:
            if not done.done():
                done.set_result(None)

        def on_disconnect(*_args: Any) -> None:
            if not done.done():
                done.set_exception(ConnectionError("disconnected"))

        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_disconnect = on_disconnect
        self.adapter = AsyncioPahoAdapter(self.client, loop)
        self.client.connect(self.host, self.port, keepalive=60)
        await asyncio.wait_for(done, timeout)

    async def aclose(self) -> None:
        """DISCONNECT (bounded) and drop the socket."""
        if self.adapter is not None:
            with contextlib.suppress(Exception):
                await self.adapter.disconnect(1.0)
            self.adapter.close()
        reset = getattr(self.client, "_reset_sockets", None)
        if callable(reset):
            with contextlib.suppress(OSError):
                reset()


def make_device(args: argparse.Namespace, index: int, context: Any) -> Any:
    """The client for device ``index`` (not connected)."""
    from dps_proto import derive_device_key

    device_id = f"{args.prefix}-{index:06d}"
    key = derive_device_key(args.group_key, device_id)
    if args.kind == "raw":
        from dps_proto import KeySigner, generate_sas_token

        password = generate_sas_token(
            f"{args.host}/devices/{device_id}",
            KeySigner.from_base64(key),
            expiry=int(time.time()) + 3600,
        )
        return RawDevice(device_id, args.host, args.port, context, password)
    from hub_proto import AsyncHubClient

    return AsyncHubClient(
        args.host, device_id, symmetric_key=key, port=args.port, ssl_context=context
    )


async def connect_one(device: Any, kind: str, timeout: float) -> None:
    """Connect one device of either kind (bounded)."""
    if kind == "raw":
        await device.connect(timeout)
    else:
        await device.connect(timeout=timeout)


async def close_all(devices: list[Any], kind: str) -> None:
    """Close every device, a batch at a time, bounded overall."""

    async def close(device: Any) -> None:
        with contextlib.suppress(Exception):
            if kind == "raw":
                await device.aclose()
            else:
                await device.aclose(timeout=1.0)

    deadline = time.monotonic() + CLOSE_TIMEOUT
    for start in range(0, len(devices), 500):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(
                asyncio.gather(*(close(d) for d in devices[start : start + 500])), remaining
            )


async def run(args: argparse.Namespace) -> None:
    """Warm up, measure, connect the fleet, measure again, report, close."""
    open_files = raise_open_files_limit(65536)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    stdin = sys.stdin.fileno()

    def on_stdin() -> None:
        if not os.read(stdin, 4096):
            loop.remove_reader(stdin)
            stop.set()

    loop.add_reader(stdin, on_stdin)
    context = client_ssl_context(args.ca_file)
    started = time.monotonic()
    deadline = started + args.budget
    devices: list[Any] = []
    failures: dict[str, int] = {}
    # Warm-up: one device through the whole path, outside the measured delta.
    warm = make_device(args, 0, context)
    await connect_one(warm, args.kind, args.timeout)
    devices.append(warm)
    await asyncio.sleep(min(0.5, args.settle))
    gc.collect()
    before_self, before_server = rss_kb(), rss_kb(args.server_pid)
    emit("progress", f"warm-up device connected; RSS {before_self} KiB, server {before_server} KiB")
    measured: list[Any] = []
    connect_started = time.monotonic()
    next_report = connect_started + 5.0
    index = 1
    stopped_by = "all connected"
    while index <= args.count:
        if stop.is_set():
            stopped_by = "stopped by the parent"
            break
        if time.monotonic() >= deadline:
            stopped_by = f"time budget of {args.budget:g} s reached"
            break
        batch = [
            make_device(args, i, context)
            for i in range(index, min(index + args.concurrency, args.count + 1))
        ]
        index += len(batch)
        results = await asyncio.gather(
            *(connect_one(device, args.kind, args.timeout) for device in batch),
            return_exceptions=True,
        )
        for device, outcome in zip(batch, results):
            if isinstance(outcome, BaseException):
                name = type(outcome).__name__
                failures[name] = failures.get(name, 0) + 1
                with contextlib.suppress(Exception):
                    await close_all([device], args.kind)
            else:
                measured.append(device)
        if time.monotonic() >= next_report:
            next_report = time.monotonic() + 5.0
            rate = len(measured) / (time.monotonic() - connect_started)
            emit(
                "progress",
                f"{len(measured)}/{args.count} connected ({rate:.0f}/s), "
                f"{sum(failures.values())} failed, RSS {rss_kb()} KiB",
            )
    connect_seconds = time.monotonic() - connect_started
    devices.extend(measured)
    # Let the fleet settle (twin GETs answered, sockets idle); what it costs to keep it
    # connected, idle, is the CPU both processes use meanwhile.
    idle_started, cpu0 = time.monotonic(), time.process_time()
    server_cpu0 = process_cpu_seconds(args.server_pid)
    await asyncio.sleep(args.settle)
    idle_seconds = time.monotonic() - idle_started
    idle_cpu = (time.process_time() - cpu0) / idle_seconds
    server_cpu1 = process_cpu_seconds(args.server_pid)
    server_idle_cpu = (
        (server_cpu1 - server_cpu0) / idle_seconds
        if server_cpu0 is not None and server_cpu1 is not None
        else None
    )
    gc.collect()
    after_self, after_server = rss_kb(), rss_kb(args.server_pid)
    still = sum(1 for d in measured if _is_connected(d, args.kind))
    n = len(measured)
    emit(
        "result",
        {
            "kind": args.kind,
            "planned": args.count,
            "connected": n,
            "still_connected_at_measurement": still,
            "failures": failures,
            "stopped_by": stopped_by,
            "connect_seconds": connect_seconds,
            "connect_rate_per_s": n / connect_seconds if connect_seconds > 0 else 0.0,
            "concurrency": args.concurrency,
            "rss_before_kib": before_self,
            "rss_after_kib": after_self,
            "server_rss_before_kib": before_server,
            "server_rss_after_kib": after_server,
            "per_device_kib": (after_self - before_self) / n
            if n and after_self is not None and before_self is not None
            else None,
            "server_per_connection_kib": (after_server - before_server) / n
            if n and after_server is not None and before_server is not None
            else None,
            "idle_cpu_cores": idle_cpu,
            "server_idle_cpu_cores": server_idle_cpu,
            "idle_window_s": idle_seconds,
            "open_files_limit": open_files,
            "cpu_seconds": time.process_time(),
        },
    )
    await close_all(devices, args.kind)


def _is_connected(device: Any, kind: str) -> bool:
    if kind == "raw":
        return bool(device.client.is_connected())
    return bool(device.connected)


def main() -> None:
    """Parse the arguments and run."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=("hub", "raw"), required=True)
    parser.add_argument("--host", default="localhost", help="the host name the TLS check uses")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ca-file", required=True)
    parser.add_argument("--group-key", required=True, help="base64 enrollment group key")
    parser.add_argument("--prefix", required=True, help="device ids are PREFIX-000000 ...")
    parser.add_argument("--count", type=int, required=True, help="devices besides the warm-up one")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--timeout", type=float, default=30.0, help="per connect (seconds)")
    parser.add_argument("--budget", type=float, required=True, help="for connecting (seconds)")
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds to let the fleet settle before measuring"
    )
    args = parser.parse_args()
    base64.b64decode(args.group_key, validate=True)  # fail early on a bad key
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
