"""A decisions worker cut off from MongoDB while it still reaches RabbitMQ (issue 23,
"Partitions"): its leases expire and the other worker takes its shard; the old owner must stop
applying that shard's inputs before its lease can expire (fencing by the lease's own time), so
no input is applied by two workers and none after the lease said it was no longer the owner's.

Two decisions workers on 2 shards: the supervised one, and a second one whose MongoDB URL goes
through a TCP proxy the test controls (`tcpproxy.CutProxy`). The cut keeps the sockets open and
drops every byte, as a partition does (a refused connection would fail fast and prove less).
The test polls the cut-off worker's applied-frames counter and the shard's lease document and
checks: the counter's last rise came before the lease's `expires_at`, which came before the
other worker took the shard; the moved groups' members get broadcasts again; after the heal,
nothing acknowledged is lost or doubled and the periods end (late by at most the move).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from pymongo import AsyncMongoClient

from devstack.infra import free_port, spawn, stop_process
from devstack.stack import PROJECT_ROOT, port_variable
from services.common.bus import shard_of
from tests.faults.bots import Bot
from tests.faults.conftest import Supervised, start_supervised
from tests.faults.tcpproxy import CutProxy
from tests.faults.test_faults import check_log, export_with, researcher

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

SHARDS = 2
GROUPS, SIZE, RATE, PERIOD = 8, 2, 5.0, 30.0
APPLIED = re.compile(r'^canopy_decisions_frames_total\{outcome="applied"\} (\S+)$', re.M)
POLL = 0.02


@pytest.fixture(scope="module")
def two_shards() -> Iterator[Supervised]:
    with start_supervised(env={"CANOPY_SHARDS": str(SHARDS)}) as handle:
        yield handle


def process_env(pid: int) -> dict[str, str]:
    """The environment the supervisor gave a service (its credentials and URLs)."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (entry.decode().split("=", 1) for entry in raw if b"=" in entry)
    return {k: v for k, v in pairs}


@contextlib.asynccontextmanager
async def cut_off_worker(stack: Supervised, proxy: CutProxy) -> AsyncIterator[tuple[str, int]]:
    """A second decisions worker whose MongoDB goes through `proxy`: (its URL, its pid)."""
    port = free_port()
    env = process_env(stack.pid("decisions")) | {port_variable("decisions"): str(port)}
    target = urlsplit(env["CANOPY_MONGO_URL"]).netloc.rsplit("@", 1)[-1]
    env["CANOPY_MONGO_URL"] = env["CANOPY_MONGO_URL"].replace(target, f"127.0.0.1:{proxy.port}")
    log = stack.run_dir / "logs" / f"decisions-{port}.log"
    process = spawn(
        [sys.executable, "-m", "services.decisions"], env=env, log=log, cwd=PROJECT_ROOT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2.0) as client:
            deadline = time.monotonic() + 60
            while True:
                assert process.poll() is None, log.read_text()[-3000:]
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(f"{url}/readyz")).status_code == 200:
                        break
                assert time.monotonic() < deadline, f"second worker not ready\n{log.read_text()}"
                await asyncio.sleep(0.1)  # a process starting: nothing to wait on but /readyz
        yield url, process.pid
    finally:
        stop_process(process, grace=5.0)


class Watch:
    """Samples, every POLL seconds, the cut-off worker's applied-frames counter and the lease
    documents, with the wall time each answer came back."""

    def __init__(self, worker_url: str, leases: Any) -> None:
        self._url = worker_url
        self._leases = leases
        self.applied: list[tuple[float, float]] = []  # (time answered, counter)
        self.lease: dict[str, list[tuple[float, str, float]]] = {}  # key -> (time, owner, exp)

    async def run(self) -> None:
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                text = (await client.get(f"{self._url}/metrics")).text
                match = APPLIED.search(text)
                self.applied.append((time.time(), float(match.group(1)) if match else 0.0))
                async for doc in self._leases.find({}):
                    seen = (time.time(), doc["owner"], doc["expires_at"])
                    self.lease.setdefault(doc["_id"], []).append(seen)
                await asyncio.sleep(POLL)

    def owner(self, key: str) -> str | None:
        samples = self.lease.get(key)
        return samples[-1][1] if samples else None

    def last_rise(self) -> float:
        """When the counter was last seen higher than before (an upper bound of the last
        application)."""
        rises = [
            t
            for (t, v), (_, before) in zip(self.applied[1:], self.applied, strict=False)
            if v > before
        ]
        return rises[-1] if rises else float("-inf")


async def until(check: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {timeout:g} s"
        await asyncio.sleep(POLL)


@pytest.mark.timeout(240)
async def test_worker_cut_off_from_the_database_stops_before_its_lease_expires(
    two_shards: Supervised,
) -> None:
    stack = two_shards
    mongo = urlsplit(stack.mongo_url)
    proxy = CutProxy(mongo.hostname or "127.0.0.1", mongo.port or 27017)
    await proxy.start()
    db = AsyncMongoClient[dict[str, Any]](stack.mongo_url)
    leases = db[process_env(stack.pid("decisions"))["CANOPY_MONGO_DB"]]["decisions_leases"]
    try:
        async with cut_off_worker(stack, proxy) as (worker_url, worker_pid):
            watch = Watch(worker_url, leases)
            watching = asyncio.create_task(watch.run())
            try:
                await run_cut(stack, proxy, watch, worker_pid)
            finally:
                watching.cancel()
                await asyncio.gather(watching, return_exceptions=True)
    finally:
        await proxy.close()
        await db.close()


async def run_cut(stack: Supervised, proxy: CutProxy, watch: Watch, worker_pid: int) -> None:
    keys = [f"shard.{i}" for i in range(SHARDS)]

    def cut_key() -> str | None:
        return next((k for k in keys if (watch.owner(k) or "").endswith(f"-{worker_pid}")), None)

    await until(lambda: cut_key() is not None and all(watch.owner(k) for k in keys),
                "shards spread over both workers", 30)  # fmt: skip
    key = cut_key()
    assert key is not None
    other = next(watch.owner(k) for k in keys if k != key)
    async with researcher(stack) as api:
        response = await api.post(
            "/api/sessions",
            json={
                "experiment": "decisions",
                "num_participants": GROUPS * SIZE,
                "group_size": SIZE,
                "num_periods": 1,
                "period_length": PERIOD,
                "label": "worker cut off from the database",
            },
        )
        assert response.status_code == 201, response.text
        session: dict[str, Any] = response.json()
        moved = {
            g["group"] for g in session["groups"] if f"shard.{shard_of(g['group'], SHARDS)}" == key
        }
        assert moved, f"no group on {key}: {session['groups']}"
        bots = [Bot(stack.urls["gateway"], p["code"], rate=RATE) for p in session["participants"]]
        members = {code: g["group"] for g in session["groups"] for code in g["participants"]}
        for bot in bots:
            bot.start()
        try:
            for bot in bots:
                await bot.wait_started(30)
            for bot in bots:
                await bot.wait_for("acks", lambda b=bot: len(b.acked) >= 10, 20)
            await until(lambda: watch.applied and watch.applied[-1][1] > 0, "applied frames", 10)

            cut_at, cut_mono = time.time(), time.monotonic()
            proxy.cut()
            await until(lambda: watch.owner(key) == other, f"{other} taking {key}", 60)
            taken_at, taken_mono = time.time(), time.monotonic()
            expires = max(exp for _, owner, exp in watch.lease[key] if owner != other)
            moved_bots = [b for b in bots if members[b.code] in moved]
            for bot in moved_bots:  # the new owner applies the moved groups' inputs
                await bot.wait_for(
                    "a broadcast from the new owner",
                    lambda b=bot: b.first("group_decisions", taken_mono) is not None,
                    30,
                )
            recovered = max(b.first("group_decisions", taken_mono) or 0 for b in moved_bots)
            last = watch.last_rise()
            print(
                f"\nCUT-OFF WORKER: cut at 0, last input applied by the old owner by "
                f"{last - cut_at:+.3f} s, its lease expired at {expires - cut_at:+.3f} s, "
                f"taken over at {taken_at - cut_at:+.3f} s (seen), moved groups' broadcasts "
                f"again at {recovered - cut_mono:+.3f} s"
            )
            assert last < expires, (
                f"the cut-off worker applied inputs {last - expires:.3f} s after its lease "
                f"expired (lease {expires - cut_at:+.3f} s, last rise {last - cut_at:+.3f} s)"
            )
            assert expires <= taken_at
            proxy.heal()
            for bot in bots:
                await bot.wait_ended(PERIOD + 60)
        finally:
            for bot in bots:
                await bot.stop()
        rows = await export_with(api, session["session"], bots, 60, groups=GROUPS)
        check_log(session, rows, bots, PERIOD, 0, restart=recovered - cut_mono)
        acked = sum(len(b.acked) for b in bots)
        print(f"CUT-OFF WORKER: {acked} frames acknowledged, 0 lost, 0 doubled")
