"""Child process: the echo side of the raw-MQTT baseline, a paho client on mosquitto.

Subscribes to ``bench/req/#`` and answers every ``bench/req/<client>/<n>`` with a fixed-size
payload on ``bench/res/<client>/<n>`` (QoS 1 both ways, as DPS answers). Prints one JSON line
when subscribed; runs until its standard input closes, SIGTERM, or ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from benchmarks.common import CHILD_MAX_LIFETIME, HOST

REQUEST_FILTER = "bench/req/#"
REQUEST_PREFIX = "bench/req/"
RESPONSE_PREFIX = "bench/res/"


def main() -> None:
    """Connect, subscribe, answer until told to stop."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reply-bytes", type=int, default=300)
    parser.add_argument("--max-seconds", type=float, default=CHILD_MAX_LIFETIME)
    args = parser.parse_args()

    reply = json.dumps({"status": "assigned", "pad": "x" * max(0, args.reply_bytes - 32)})
    client = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=f"bench-responder-{os.getpid()}",
        protocol=mqtt.MQTTv311,
    )
    client.max_inflight_messages_set(0)  # unlimited: a thousand clients wait on this one
    client.max_queued_messages_set(0)
    subscribed = threading.Event()
    stop = threading.Event()

    def on_message(_client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic = message.topic
        if topic.startswith(REQUEST_PREFIX):
            client.publish(RESPONSE_PREFIX + topic[len(REQUEST_PREFIX) :], reply, qos=1)

    client.on_message = on_message
    client.on_subscribe = lambda *_args: subscribed.set()
    client.connect(HOST, args.port, keepalive=60)
    sock = client.socket()
    if isinstance(sock, socket.socket):  # a server-side helper: no Nagle delay on its answers
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    client.subscribe(REQUEST_FILTER, qos=1)
    client.loop_start()
    try:
        if not subscribed.wait(10.0):
            raise SystemExit("the responder could not subscribe within 10 s")
        print(json.dumps({"pid": os.getpid()}), flush=True)
        signal.signal(signal.SIGTERM, lambda *_args: stop.set())

        def watch_stdin() -> None:
            while os.read(sys.stdin.fileno(), 4096):
                pass
            stop.set()

        threading.Thread(target=watch_stdin, daemon=True).start()
        stop.wait(args.max_seconds)
    finally:
        client.disconnect()
        client.loop_stop()


if __name__ == "__main__":
    main()
