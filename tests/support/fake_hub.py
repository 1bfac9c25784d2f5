"""A test-side stand-in for IoT Hub on a plain MQTT broker, and one facade over both clients.

A broker routes publishes by topic, so a paho client subscribed to what devices publish can play
the hub: it records telemetry, answers twin GETs and reported patches, pushes desired patches,
calls direct methods and sends cloud-to-device messages, all with the hub topics of
:mod:`hub_proto.topics`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from hub_proto import (
    AsyncHubClient,
    HubClient,
    Message,
    MessageTicket,
    QueueStats,
    TicketState,
    apply_patch,
    c2d_topic,
    desired_patch_topic,
    method_request_topic,
    parse_method_response_topic,
    parse_telemetry_topic,
    parse_twin_request_topic,
    twin_response_topic,
)

_T = TypeVar("_T")

HUB_SUBSCRIPTIONS = [
    ("devices/+/messages/events/#", 1),
    ("devices/+/modules/+/messages/events/#", 1),
    ("$iothub/twin/GET/#", 1),
    ("$iothub/twin/PATCH/properties/reported/#", 1),
    ("$iothub/methods/res/#", 1),
]


class FakeHub:
    """A paho client on the broker's plain listener that answers like IoT Hub.

    ``persistent`` keeps its session (and the messages queued for it) across a broker restart
    of a broker with persistence; it reconnects by itself.
    """

    def __init__(self, port: int, *, persistent: bool = False, answer_twin: bool = True) -> None:
        self.port = port
        self.answer_twin = answer_twin
        self.twin: dict[str, Any] = {
            "desired": {"$version": 1},
            "reported": {"$version": 1},
        }
        self.telemetry: list[tuple[str, bytes, int]] = []
        self.twin_requests: list[tuple[str, str, bytes]] = []  # kind, rid, body
        self.method_responses: dict[str, tuple[int, bytes]] = {}
        self.cond = threading.Condition()
        self._rid = 0
        self._subscribed = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"fake-hub-{uuid.uuid4().hex[:8]}",
            clean_session=not persistent,
        )
        self.client.reconnect_delay_set(1, 1)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *args: self._subscribed.set()
        self.client.on_message = self._on_message

    def __enter__(self) -> FakeHub:
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        assert self._subscribed.wait(10), "the fake hub could not subscribe"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: mqtt.Client, *args: Any) -> None:
        client.subscribe(HUB_SUBSCRIPTIONS)

    # -- what devices send ------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic, body = message.topic, bytes(message.payload)
        if topic.startswith("devices/"):
            with self.cond:
                self.telemetry.append((topic, body, message.qos))
                self.cond.notify_all()
        elif topic.startswith("$iothub/twin/"):
            self._on_twin(topic, body)
        elif topic.startswith("$iothub/methods/res/"):
            parsed = parse_method_response_topic(topic)
            with self.cond:
                self.method_responses[parsed.rid] = (parsed.status, body)
                self.cond.notify_all()

    def _on_twin(self, topic: str, body: bytes) -> None:
        request = parse_twin_request_topic(topic)
        with self.cond:
            self.twin_requests.append((request.kind, request.rid, body))
            self.cond.notify_all()
            if not self.answer_twin:
                return
            if request.kind == "get":
                answer = twin_response_topic(200, request.rid), json.dumps(self.twin).encode()
            else:
                reported = self.twin["reported"]
                apply_patch(reported, json.loads(body))
                reported["$version"] += 1
                answer = twin_response_topic(204, request.rid, reported["$version"]), b""
        self.client.publish(answer[0], answer[1], qos=1)

    # -- views ------------------------------------------------------------------------------

    def wait(self, predicate: Callable[[], bool], timeout: float = 15.0) -> bool:
        """Wait (bounded) until ``predicate()`` holds; it runs under the hub's lock."""
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def messages(self) -> list[Message]:
        """Telemetry received so far, parsed (payload included)."""
        with self.cond:
            received = list(self.telemetry)
        return [
            parse_telemetry_topic(topic).message.with_payload(body) for topic, body, _ in received
        ]

    def twin_gets(self) -> int:
        """Twin GETs received so far."""
        with self.cond:
            return sum(1 for kind, _, _ in self.twin_requests if kind == "get")

    # -- what the hub sends -----------------------------------------------------------------

    def push_desired(self, patch: dict[str, Any], version: int) -> None:
        """Publish a desired-properties notification."""
        body = json.dumps({**patch, "$version": version}).encode()
        self.client.publish(desired_patch_topic(version), body, qos=1).wait_for_publish(5)

    def send_c2d(self, device_id: str, message: Message) -> None:
        """Publish a cloud-to-device message."""
        topic = c2d_topic(device_id, message)
        self.client.publish(topic, message.payload, qos=1).wait_for_publish(5)

    def invoke(self, name: str, payload: bytes = b"", timeout: float = 15.0) -> tuple[int, bytes]:
        """Call direct method ``name`` and wait for the device's answer."""
        with self.cond:
            self._rid += 1
            rid = f"m{self._rid}"
        self.client.publish(method_request_topic(name, rid), payload, qos=0)
        assert self.wait(lambda: rid in self.method_responses, timeout), f"no answer to {name}"
        with self.cond:
            return self.method_responses[rid]


# -- one facade over both clients -------------------------------------------------------------


class AsyncFacade:
    """The blocking API over an :class:`AsyncHubClient` running on a test-side event loop."""

    def __init__(self, client: AsyncHubClient) -> None:
        self.client = client
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self._closed = False

    def _run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 60.0) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def connect(self, timeout: float = 15.0) -> None:
        self._run(self.client.connect(timeout))

    def send_message(self, message: Any, **kwargs: Any) -> MessageTicket:
        return self._run(self.client.send_message(message, **kwargs))

    def wait_for(self, ticket: MessageTicket, timeout: float = 15.0) -> TicketState:
        return self._run(self.client.wait_for(ticket, timeout))

    def get_twin(self, timeout: float = 15.0) -> dict[str, Any]:
        return self._run(self.client.get_twin(timeout))

    def patch_reported(self, patch: dict[str, Any], timeout: float = 15.0) -> int:
        return self._run(self.client.patch_reported(patch, timeout))

    @property
    def stats(self) -> QueueStats:
        return self.client.stats

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def close(self, timeout: float = 10.0) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self.client.aclose(timeout))
            self._run(_cancel_other_tasks())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()


async def _cancel_other_tasks() -> None:
    current = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not current]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


Client = Any  # HubClient or AsyncFacade: the same blocking API


def make_client(kind: str, host: str, device_id: str, **kwargs: Any) -> Client:
    """A :class:`HubClient` (``kind`` "blocking") or an :class:`AsyncFacade` ("async")."""
    if kind == "blocking":
        return HubClient(host, device_id, **kwargs)
    return AsyncFacade(AsyncHubClient(host, device_id, **kwargs))
