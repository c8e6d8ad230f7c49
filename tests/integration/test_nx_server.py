"""The local MongoDB-wire server as devstack runs it (devstack/nx_server.py): a client killed
in the middle of a transaction leaves nothing open behind it.

Before, nx-27017 kept that transaction open for good and every later write of every client
went inside it, uncommitted: a SIGKILL of the server then lost writes acknowledged long before
(the fault suite saw a whole session vanish: the store killed mid-batch, then nx-27017)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from devstack.infra import free_port, wait_until

pytestmark = [pytest.mark.integration]

# A client that opens a transaction, writes in it, says so, and blocks until it is killed
# (reading a stdin that the test never writes to).
DYING_CLIENT = """
import sys
from pymongo import MongoClient
client = MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000)
session = client.start_session()
session.start_transaction()
client.canopy.things.insert_one({"_id": "uncommitted"}, session=session)
print("in transaction", flush=True)
sys.stdin.read()
"""


def start_server(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    args = [sys.executable, "-m", "devstack.nx_server", "--data-dir", str(data_dir)]
    args += ["--host", "127.0.0.1", "-p", str(port), "--log-file", str(data_dir / "nx.log")]
    args += ["--pid-file", str(data_dir / "nx.pid")]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"mongodb://127.0.0.1:{port}/"

    def answers() -> bool:
        try:
            with MongoClient[dict[str, Any]](url, serverSelectionTimeoutMS=300) as probe:
                probe.admin.command("ping")
            return True
        except Exception:
            return False

    wait_until(answers, timeout=15, what="nx-27017")
    return server


def test_a_killed_clients_transaction_does_not_swallow_later_writes(tmp_path: Path) -> None:
    data_dir = tmp_path
    port = free_port()
    url = f"mongodb://127.0.0.1:{port}/"
    server = start_server(data_dir, port)
    try:
        dying = subprocess.Popen(
            [sys.executable, "-c", DYING_CLIENT, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert dying.stdout is not None
        assert dying.stdout.readline().strip() == "in transaction"
        with MongoClient[dict[str, Any]](url, serverSelectionTimeoutMS=5000) as client:
            things = client.canopy.things
            # nx-27017 shows a transaction's writes to everyone (one SQLite connection).
            assert things.find_one({"_id": "uncommitted"}) is not None
            os.kill(dying.pid, signal.SIGKILL)
            dying.wait(timeout=10)
            dying.stdout.close()
            assert dying.stdin is not None
            dying.stdin.close()
            # Rolled back once its connection closed (a condition with a deadline).
            wait_until(
                lambda: things.find_one({"_id": "uncommitted"}) is None,
                timeout=10,
                what="the dead client's transaction rolled back",
            )
            things.insert_one({"_id": "acknowledged"})
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        server = start_server(data_dir, port)
        with MongoClient[dict[str, Any]](url, serverSelectionTimeoutMS=5000) as client:
            assert client.canopy.things.find_one({"_id": "acknowledged"}) is not None
            assert client.canopy.things.find_one({"_id": "uncommitted"}) is None
    finally:
        server.kill()
        server.wait(timeout=10)


# A client in the middle of writing a batch of events in a transaction (as the store does),
# which will never commit: the store gave up on it (a timeout) and closed its connection.
STALE_WRITE = """
import sys
from pymongo import MongoClient
client = MongoClient(sys.argv[1], serverSelectionTimeoutMS=5000)
session = client.start_session()
session.start_transaction()
client.canopy.events.insert_many(
    [{"_id": f"event-{n}"} for n in range(3)], ordered=False, session=session
)
print("in transaction", flush=True)
sys.stdin.read()
"""


def in_transaction(script: str, url: str) -> subprocess.Popen[str]:
    """A client process running `script`, once it says it is in its transaction."""
    process = subprocess.Popen(
        [sys.executable, "-c", script, url],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline().strip() == "in transaction"
    return process


async def test_a_batch_written_again_does_not_nest_in_its_first_unfinished_write(
    tmp_path: Path,
) -> None:
    """Issue 23 (the database away for 5 minutes): the store's retry of a batch ran inside the
    first attempt's transaction, took its uncommitted events for duplicates, was acknowledged,
    and was rolled back with it. Now the retry is refused as a transient write conflict until
    the first attempt is gone, then writes the batch."""
    from pymongo.errors import OperationFailure

    from services.store.repository import Repository

    port = free_port()
    url = f"mongodb://127.0.0.1:{port}/"
    server = start_server(tmp_path, port)
    repository = Repository(url, "canopy")
    batch = [{"_id": f"event-{n}", "n": n} for n in range(3)]
    try:
        with MongoClient[dict[str, Any]](url, serverSelectionTimeoutMS=5000) as client:
            client.canopy.create_collection("events")  # as the store's start-up does
        stale = in_transaction(STALE_WRITE, url)
        with pytest.raises(OperationFailure) as refused:
            await repository.insert_events(batch)
        assert refused.value.has_error_label("TransientTransactionError")
        os.kill(stale.pid, signal.SIGKILL)  # its connection closes: rolled back
        stale.wait(timeout=10)
        assert stale.stdin is not None and stale.stdout is not None
        stale.stdin.close()
        stale.stdout.close()
        with MongoClient[dict[str, Any]](url, serverSelectionTimeoutMS=5000) as client:
            wait_until(
                lambda: client.canopy.events.count_documents({}) == 0,
                timeout=10,
                what="the stale write rolled back",
            )
            assert await repository.insert_events(batch) == 3
            assert client.canopy.events.count_documents({}) == 3
    finally:
        await repository.close()
        server.kill()
        server.wait(timeout=10)
