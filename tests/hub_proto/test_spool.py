"""The durable telemetry spool: its file format, and clients that survive a process restart."""

from __future__ import annotations

import base64
import logging
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub_proto import HubClient, Message, OverflowPolicy, QueueFullError, QueueLimits
from hub_proto.spool import Spool, SpoolError, decode_row, encode_row
from tests.support.fake_hub import Client, FakeHub, make_client
from tests.support.mosquitto import Mosquitto, Pki, free_port, make_pki

from .strategies import messages

DEVICE_KEY = base64.b64encode(b"spool-device-key-0123456789abcd!").decode()
ROOT = Path(__file__).resolve().parents[2]
SETTINGS = settings(max_examples=60, deadline=None)


# -- the file ---------------------------------------------------------------------------------


@SETTINGS
@given(st.lists(st.tuples(messages, st.sampled_from([0, 1])), max_size=5))
def test_messages_round_trip_through_the_file(items: list[tuple[Message, int]]) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "spool.db"
        with Spool(path) as spool:
            rows = [
                spool.add(message, qos, 1_700_000_000.5 + i)
                for i, (message, qos) in enumerate(items)
            ]
        with Spool(path) as spool:  # reopened: what a new process sees
            stored = spool.pending()
    assert [(s.message, s.qos) for s in stored] == items
    assert [s.row_id for s in stored] == rows
    assert [s.accepted_at for s in stored] == [1_700_000_000.5 + i for i in range(len(items))]


_stored_values = st.one_of(
    st.none(), st.binary(max_size=20), st.text(max_size=20), st.integers(), st.booleans()
)


@SETTINGS
@given(_stored_values, _stored_values, _stored_values, _stored_values)
def test_arbitrary_rows_raise_only_spool_errors(
    payload: object, properties: object, system: object, qos: object
) -> None:
    try:
        message, qos_value = decode_row(payload, properties, system, qos)
    except SpoolError:
        return
    assert isinstance(message, Message)
    assert qos_value in (0, 1)


def test_order_removal_and_wal(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        ids = [spool.add(Message(f"m{i}".encode()), 1, 0.0) for i in range(5)]
        spool.remove(ids[1])
        spool.remove([ids[3], 12345])  # unknown ids are ignored
        assert len(spool) == 3
        assert [s.message.payload for s in spool.pending()] == [b"m0", b"m2", b"m4"]
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert db.execute("PRAGMA user_version").fetchone()[0] == 1
    finally:
        db.close()


def test_unreadable_rows_are_dropped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "spool.db"
    with Spool(path) as spool:
        spool.add(Message(b"good"), 1, 0.0)
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO messages (qos, accepted_at, payload, properties, system_properties)"
        " VALUES (1, 0, x'00', 'not json', '{}')"
    )
    db.commit()
    db.close()
    with Spool(path) as spool:
        assert [s.message.payload for s in spool.pending()] == [b"good"]
        assert len(spool) == 1
    assert "dropping unreadable row" in caplog.text


def test_bad_use_raises_spool_errors(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    with pytest.raises(SpoolError):
        spool.add(Message(b"x"), 2, 0.0)
    with pytest.raises(SpoolError):
        encode_row(b"not a message", 1)  # type: ignore[arg-type]
    spool.close()
    spool.close()
    with pytest.raises(SpoolError):
        spool.add(Message(b"x"), 1, 0.0)
    with pytest.raises(SpoolError):
        Spool(tmp_path)  # a directory
    with pytest.raises(SpoolError):
        Spool(tmp_path / "other.db", synchronous="sometimes")
    db = sqlite3.connect(tmp_path / "future.db")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(SpoolError, match="schema version"):
        Spool(tmp_path / "future.db")


# -- the clients' use of it (offline) ---------------------------------------------------------


def _offline_client(path: Path, queue: QueueLimits) -> HubClient:
    return HubClient(
        "localhost",
        "dev-offline",
        symmetric_key=DEVICE_KEY,
        port=free_port(),
        spool_path=path,
        queue=queue,
    )


def test_spool_follows_the_queue(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    client = _offline_client(path, QueueLimits(max_messages=2, overflow=OverflowPolicy.DROP_OLDEST))
    for i in range(3):
        client.send_message(f"m{i}".encode())
    client.close()
    with Spool(path) as spool:  # the dropped oldest message left the spool too
        assert [s.message.payload for s in spool.pending()] == [b"m1", b"m2"]

    client = _offline_client(path, QueueLimits(max_messages=2))  # restores 2: full
    with pytest.raises(QueueFullError):
        client.send_message(b"refused")
    assert client.stats.restored == 2
    client.close()
    with Spool(path) as spool:  # a refused message is not spooled
        assert len(spool) == 2


# -- a process restart ------------------------------------------------------------------------

_FIRST_PROCESS = """
import os, sys
import hub_proto
client = hub_proto.HubClient(
    "localhost", "dev-spool", symmetric_key=sys.argv[1], port=int(sys.argv[2]),
    ca_file=sys.argv[3], spool_path=sys.argv[4],
)
try:
    client.connect(timeout=0.5)
except hub_proto.HubError as exc:
    print("offline:", type(exc).__name__)
for i in range(int(sys.argv[5])):
    message = hub_proto.Message(f"payload {i}".encode(), message_id=f"s{i}")
    ticket = client.send_message(message, qos=0 if i % 4 == 3 else 1)
    assert ticket.state is hub_proto.TicketState.QUEUED
if sys.argv[6] == "close":
    client.close(timeout=1)
    print("closed")
else:
    print("crashing")
    sys.stdout.flush()
    os._exit(0)  # no close, no clean-up: only what was committed survives
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[Mosquitto]:
    with Mosquitto(pki, tmp_path) as running:
        yield running


@pytest.fixture
def clients() -> Iterator[Callable[..., Client]]:
    made: list[Client] = []

    def make(kind: str, **kwargs: Any) -> Client:
        client = make_client(kind, "localhost", "dev-spool", **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.mark.parametrize(("exit_mode", "kind"), [("close", "blocking"), ("crash", "async")])
def test_accepted_messages_survive_a_process_restart(
    exit_mode: str,
    kind: str,
    pki: Pki,
    broker: Mosquitto,
    tmp_path: Path,
    clients: Callable[..., Client],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="hub_proto")
    count = 12
    path = tmp_path / "device-spool.db"
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _FIRST_PROCESS,
            DEVICE_KEY,
            str(free_port()),
            pki.ca_file,
            str(path),
            str(count),
            exit_mode,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert "offline: HubError" in out.stdout
    with Spool(path) as spool:
        assert len(spool) == count

    expected = [f"s{i}" for i in range(count)]
    with FakeHub(broker.plain_port) as hub:
        client = clients(
            kind,
            symmetric_key=DEVICE_KEY,
            port=broker.tls_port,
            ca_file=pki.ca_file,
            spool_path=path,
        )
        assert client.stats.restored == count
        client.connect()
        assert hub.wait(lambda: len(hub.telemetry) >= count)
        client.close()
    ids = [m.message_id for m in hub.messages()]
    assert ids == expected  # all of them, in the order they were accepted
    qos = [q for _, _, q in hub.telemetry]
    assert qos == [0 if i % 4 == 3 else 1 for i in range(count)]
    with Spool(path) as spool:
        assert len(spool) == 0
    assert f"restored {count} messages from the spool" in caplog.text
