"""The local infrastructure from `devstack.infra`: usable, persistent when asked, and gone
(every process, every file) when stopped — also after its owner was killed.

Does not test the services: that is what tests/e2e does with the `stack` fixture.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from pamqp.commands import Basic
from pymongo import AsyncMongoClient

from devstack.infra import (
    Infra,
    InfraBusy,
    clear_stale_test_folders,
    owned_processes,
    start_infra,
)
from devstack.stack import PROJECT_ROOT

# Slow (about a minute: each test starts and stops a broker and a store): `make stack-check`.
pytestmark = [pytest.mark.integration, pytest.mark.stack]

QUORUM_SAC = {"x-queue-type": "quorum", "x-single-active-consumer": True}


def _ps(pids: list[int]) -> list[str]:
    """What `ps` still lists of `pids` (zombies included, as `<pid> Z ...`)."""
    if not pids:
        return []
    result = subprocess.run(
        ["ps", "-o", "pid=,stat=,comm=", "-p", ",".join(map(str, pids))],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.split("\n")[:-1]


def _wait_not_listed(pids: list[int], timeout: float = 5.0) -> list[str]:
    """Dead processes re-parented to init stay zombies until init reaps them (about 1 s with
    this machine's init); give it a bounded moment, then return what ps still lists."""
    deadline = time.monotonic() + timeout
    while (listed := _ps(pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return listed


def _port_open(url: str) -> bool:
    port = int(url.rsplit(":", 1)[1].strip("/"))
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _comms(pids: list[int]) -> set[str]:
    names = set()
    for pid in pids:
        with contextlib.suppress(OSError):  # gone meanwhile
            names.add(Path(f"/proc/{pid}/comm").read_text().strip())
    return names


async def _roundtrip_quorum_queue(amqp_url: str, queue_name: str, body: bytes) -> bytes:
    connection = await aio_pika.connect_robust(amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        queue = await channel.declare_queue(queue_name, durable=True, arguments=QUORUM_SAC)
        confirmation = await channel.default_exchange.publish(
            aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
            routing_key=queue_name,
            mandatory=True,
        )
        assert isinstance(confirmation, Basic.Ack)  # the broker confirmed it
        async with queue.iterator() as messages:
            async for message in messages:
                async with message.process():
                    return message.body
    raise AssertionError("unreachable")


async def test_rabbitmq_quorum_single_active_consumer_roundtrip(infra: Infra) -> None:
    name = f"devstack-test-{secrets.token_hex(4)}"
    assert await _roundtrip_quorum_queue(infra.amqp_url, name, b"hello") == b"hello"
    connection = await aio_pika.connect_robust(infra.amqp_url)
    async with connection:
        channel = await connection.channel()
        queue = await channel.declare_queue(name, passive=True, robust=False)
        assert queue.declaration_result.message_count == 0  # acked, nothing left
        await channel.queue_delete(name)


async def test_rabbitmq_unroutable_mandatory_publish_raises(infra: Infra) -> None:
    connection = await aio_pika.connect_robust(infra.amqp_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        with pytest.raises(aio_pika.exceptions.DeliveryError):
            await channel.default_exchange.publish(
                aio_pika.Message(b"x"), routing_key="no-such-queue", mandatory=True
            )


async def test_mongo_insert_find(infra: Infra) -> None:
    async with AsyncMongoClient[dict[str, Any]](infra.mongo_url) as client:
        db = client[f"devstack_test_{secrets.token_hex(4)}"]
        await db.events.create_index("seq", unique=True)
        await db.events.insert_many([{"seq": i, "value": i * i} for i in range(5)])
        found = await db.events.find({"seq": {"$gte": 2}}).sort("seq", -1).to_list()
        assert [doc["value"] for doc in found] == [16, 9, 4]
        await client.drop_database(db.name)


def test_throwaway_infra_stop_leaves_nothing_behind(run_dir: Path) -> None:
    handle = start_infra(run_dir, persistent=False)
    folder, infra = handle.run_dir, handle.infra
    pids = owned_processes(folder)
    assert {"beam.smp", "epmd", "erl_child_setup"} <= _comms(pids)
    assert _port_open(infra.amqp_url)
    assert _port_open(infra.mongo_url)
    assert infra.management_url is None  # tests kill the node; the UI would only cost

    t0 = time.monotonic()
    handle.stop()
    elapsed = time.monotonic() - t0

    assert owned_processes(folder) == []  # nothing alive right after stop() returns
    assert _wait_not_listed(pids) == []
    assert not folder.exists()
    assert not _port_open(infra.amqp_url)
    assert not _port_open(infra.mongo_url)
    assert elapsed < 3, f"a throwaway node is killed, not shut down: took {elapsed:.1f} s"
    handle.stop()  # idempotent


@pytest.mark.timeout(120)
async def test_persistent_infra_keeps_data_and_refuses_a_second_owner(run_dir: Path) -> None:
    queue_name = "devstack-test-durable"
    with start_infra(run_dir, persistent=True, management=False) as first:
        assert first.infra.rabbit_node == "canopy@localhost"
        with pytest.raises(InfraBusy, match=str(os.getpid())):
            start_infra(run_dir, persistent=True)
        assert _port_open(first.infra.amqp_url)  # the failed second start touched nothing
        async with AsyncMongoClient[dict[str, Any]](first.infra.mongo_url) as client:
            await client.canopy.sessions.insert_one({"_id": "s1", "label": "kept"})
        connection = await aio_pika.connect_robust(first.infra.amqp_url)
        async with connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.declare_queue(queue_name, durable=True, arguments=QUORUM_SAC)
            await channel.default_exchange.publish(
                aio_pika.Message(b"kept", delivery_mode=aio_pika.DeliveryMode.PERSISTENT),
                routing_key=queue_name,
                mandatory=True,
            )
    assert owned_processes(run_dir) == []

    with start_infra(run_dir, persistent=True, management=False) as second:
        async with AsyncMongoClient[dict[str, Any]](second.infra.mongo_url) as client:
            assert await client.canopy.sessions.find_one({"_id": "s1"}) == {
                "_id": "s1",
                "label": "kept",
            }
        body = await _roundtrip_quorum_queue(second.infra.amqp_url, queue_name, b"second")
        assert body == b"kept"  # the message published before the restart comes first
    assert owned_processes(run_dir) == []
    assert (run_dir / "rabbitmq" / "mnesia").is_dir()  # kept for the next `make run`


def _mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


async def _logs_in(url: str) -> bool:
    try:
        connection = await aio_pika.connect(url, timeout=10)
    except aio_pika.exceptions.ProbableAuthenticationError:
        return False
    await connection.close()
    return True


@pytest.mark.timeout(120)
async def test_the_folder_is_the_owners_and_the_broker_has_no_guest(run_dir: Path) -> None:
    """Least privilege of `make run` (issue 23): the run folder (the seat secret, the state
    file's admin token, the broker's password, the logs) is 0700; the broker's only user has a
    password new at each start; a kept node from before, which still has guest, loses it."""
    with start_infra(run_dir, persistent=True, management=False) as first:
        assert _mode(run_dir) == 0o700
        assert _mode(run_dir / "rabbitmq" / "definitions.json") == 0o600
        port = first.amqp_port
        guest = f"amqp://guest:guest@127.0.0.1:{port}/"
        assert "guest" not in first.infra.amqp_url
        assert await _logs_in(first.infra.amqp_url)
        assert not await _logs_in(guest)
        # What a node made by an older devstack looks like: guest is there.
        assert first.rabbitmqctl("add_user", "guest", "guest").returncode == 0
        first.rabbitmqctl("set_permissions", "guest", ".*", ".*", ".*")
        (run_dir / "rabbitmq" / "no-guest").unlink()
        assert await _logs_in(guest)
        old_url = first.infra.amqp_url
    os.chmod(run_dir, 0o755)  # as an older devstack left it
    with start_infra(run_dir, persistent=True, management=False) as second:
        assert _mode(run_dir) == 0o700
        assert second.infra.amqp_url != old_url  # a new password
        port = second.amqp_port
        assert await _logs_in(second.infra.amqp_url)
        assert not await _logs_in(old_url.replace(f":{first.amqp_port}/", f":{port}/"))
        assert not await _logs_in(f"amqp://guest:guest@127.0.0.1:{port}/")


def test_orphans_of_a_killed_owner_are_cleared(run_dir: Path) -> None:
    # An owner that dies without stopping anything (kill -9, a crashed pytest).
    owner = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, sys; from pathlib import Path; from devstack.infra import "
            "start_infra; h = start_infra(Path(sys.argv[1]), persistent=False); "
            "print(h.run_dir, flush=True); signal.pause()",
            str(run_dir),
        ],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdout is not None
        folder = Path(owner.stdout.readline().strip())  # printed once infra is ready
        assert folder.is_dir(), "the owner did not start its infra"
        orphans = owned_processes(folder)
        assert "beam.smp" in _comms(orphans)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        if owner.stdout is not None:
            owner.stdout.close()
    assert owned_processes(folder) == orphans  # still running without their owner

    clear_stale_test_folders(run_dir)  # what the next start_infra() does first

    assert owned_processes(folder) == []
    assert _wait_not_listed(orphans) == []
    assert not folder.exists()
