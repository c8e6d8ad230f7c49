"""Two timers replicas: one leads (MongoDB lease), the other stands by and takes over when the
leader dies; no tick is ever sent twice, none is missing."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from devstack.infra import Popen, free_port, spawn, stop_process
from devstack.stack import PROJECT_ROOT, port_variable
from tests.e2e.protocol import connect_group, create_session, export_until

pytestmark = [pytest.mark.e2e]


async def leader(client: httpx.AsyncClient, url: str) -> bool:
    text = (await client.get(f"{url}/metrics")).text
    return "canopy_timers_leader 1.0" in text


@pytest.fixture
async def standby_timers(stack: Any) -> AsyncIterator[tuple[str, Popen]]:
    port = free_port()
    env = dict(stack.env) | {port_variable("timers"): str(port)}
    process = spawn(
        [sys.executable, "-m", "services.timers"],
        env=env,
        log=stack.logs_dir / "timers-2.log",
        cwd=PROJECT_ROOT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=2.0) as client, asyncio.timeout(30):
            while True:
                assert process.poll() is None
                try:
                    if (await client.get(f"{url}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        yield url, process
    finally:
        stop_process(process, grace=5.0)


async def test_the_standby_takes_over_and_no_tick_is_doubled(
    api: httpx.AsyncClient, gateway_url: str, stack: Any, standby_timers: tuple[str, Popen]
) -> None:
    standby_url, _ = standby_timers
    async with httpx.AsyncClient(timeout=2.0) as client:
        assert await leader(client, stack.urls.timers_url)
        assert not await leader(client, standby_url)
        session = await create_session(api, period_length=4, num_subperiods=4)
        codes = [p["code"] for p in session["participants"]]
        a, b = await connect_group(gateway_url, codes)
        killed = time.monotonic()
        stack.stop_service("timers", sig=signal.SIGKILL)
        try:
            end = await a.expect("period_end", timeout=20)
            took_over = time.monotonic() - killed
            assert await leader(client, standby_url)
        finally:
            stack.start_service("timers")  # the stack's own, back for the other tests
            await asyncio.to_thread(stack.wait_ready, ["timers"])
        assert end["period"] == 1
        rows = await export_until(
            api, session["session"], lambda r: any(x["channel"] == "period_end" for x in r)
        )
        channels = Counter(r["channel"] for r in rows)
        assert channels["period_start"] == 1 and channels["period_end"] == 1, channels
        indices = [json.loads(r["value"])["index"] for r in rows if r["channel"] == "subperiod"]
        assert sorted(indices) == [1, 2, 3, 4]
        # The restarted one stands by now: one leader at a time.
        assert not (
            await leader(client, stack.urls.timers_url) and await leader(client, standby_url)
        )
    print(f"\nthe standby ended the period {took_over:.2f} s after the leader was killed")
    await a.close()
    await b.close()
