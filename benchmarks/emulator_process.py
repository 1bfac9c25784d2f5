"""Child process: the emulator with an in-memory store on free loopback ports.

Prints one JSON line (ports, service API URL, CA file) when it listens, then runs until its
standard input closes, SIGTERM/SIGINT, or ``--max-seconds``. Started by
:class:`benchmarks.common.EmulatorProcess`.
"""

from __future__ import annotations

import argparse
import asyncio
import asyncio.sslproto
import json
import logging
import os
import signal
import socketserver
import sys

from benchmarks.common import CHILD_MAX_LIFETIME, HOST, raise_open_files_limit
from emulator.config import EmulatorConfig
from emulator.dps_service import DpsConfig
from emulator.server import Emulator


async def _serve(args: argparse.Namespace) -> None:
    config = EmulatorConfig(
        state_dir=None,
        host=HOST,
        mqtt_port=0,
        api_port=0,
        https_port=0,
        id_scope=args.id_scope,
        hubs=("localhost",),
        hostnames=("localhost",),
        retry_after=args.retry_after,
        log_level="WARNING",
        route_to=args.route_to,
    )
    dps = DpsConfig(id_scope=args.id_scope, retry_after=args.retry_after)
    if not args.poll_throttle:
        dps.polls_per_window = 1_000_000
    if args.https_nodelay:
        socketserver.StreamRequestHandler.disable_nagle_algorithm = True
    if args.ssl_read_buffer:
        # asyncio (3.11+) gives every TLS connection a zero-filled read buffer of this size
        # (256 KiB), allocated when the connection is accepted.
        setattr(asyncio.sslproto.SSLProtocol, "max_size", args.ssl_read_buffer)  # noqa: B010
    emulator = Emulator(config, dps_config=dps)
    await emulator.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    stdin = sys.stdin.fileno()

    def on_stdin() -> None:
        if not os.read(stdin, 4096):
            loop.remove_reader(stdin)
            stop.set()

    loop.add_reader(stdin, on_stdin)
    assert emulator.https is not None
    info = {
        "mqtt_port": emulator.mqtt_port,
        "https_port": emulator.https.port,
        "api_url": emulator.api_url,
        "ca_file": str(emulator.ca_file),
        "id_scope": args.id_scope,
        "pid": os.getpid(),
    }
    print(json.dumps(info), flush=True)
    try:
        await asyncio.wait_for(stop.wait(), args.max_seconds)
    except asyncio.TimeoutError:
        logging.getLogger(__name__).warning("stopping after %g s", args.max_seconds)
    await emulator.stop()


def main() -> None:
    """Parse the arguments and serve until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--id-scope", required=True)
    parser.add_argument("--retry-after", type=int, default=0)
    parser.add_argument(
        "--poll-throttle",
        action="store_true",
        help="keep Azure's limit of 5 polls per registration in 10 s (off by default: benchmarks "
        "provision the same device over and over)",
    )
    parser.add_argument(
        "--https-nodelay",
        action="store_true",
        help="diagnostic: TCP_NODELAY on the HTTPS (and service API) server's connections",
    )
    parser.add_argument(
        "--ssl-read-buffer",
        type=int,
        metavar="BYTES",
        help="diagnostic: the size of asyncio's per-connection TLS read buffer (256 KiB)",
    )
    parser.add_argument(
        "--route-to",
        metavar="mqtt://HOST:PORT",
        help="republish every telemetry message to this broker (the emulator's message routing)",
    )
    parser.add_argument("--max-seconds", type=float, default=CHILD_MAX_LIFETIME)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    raise_open_files_limit()
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
