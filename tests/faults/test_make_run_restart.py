"""Stopping `make run` (Ctrl-C) during a period and starting it again: the session goes on.

Before, the pending `period_end` was lost with the timers' memory and the groups stayed
"running · 0 s left" for good. Now the broker's queues, the database (files) and the timers'
schedules outlive the stop: the browsers reconnect by themselves, the period ends (late by
the downtime if it was due meanwhile), and nothing acknowledged is lost or doubled.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.faults.bots import Bot
from tests.faults.test_faults import (
    check_log,
    check_state_equals_replay,
    export_with,
    fault_session,
    researcher,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]


@pytest.mark.timeout(240)
async def test_make_run_stopped_and_started_again_mid_period(supervised: Any) -> None:
    length = 25.0
    urls = supervised.urls
    async with researcher(supervised) as api:
        session = await fault_session(
            api, period_length=length, num_subperiods=5, label="make run restart"
        )
        bots = [Bot(urls["gateway"], p["code"], rate=5.0) for p in session["participants"]]
        for bot in bots:
            bot.start()
        try:
            for bot in bots:
                await bot.wait_started(30)
                await bot.wait_for("acks", lambda b=bot: len(b.acked) >= 5, 20)
            stopped = time.monotonic()
            down = await asyncio.to_thread(supervised.relaunch)
            for bot in bots:
                await bot.wait_for("hello", lambda b=bot: b.first("hello", stopped) is not None, 60)
            for bot in bots:
                await bot.wait_ended(length + 60)
        finally:
            for bot in bots:
                await bot.stop()
    async with researcher(supervised) as api:
        rows = await export_with(api, session["session"], bots, 60)
    check_log(session, rows, bots, length, 5, down)
    await check_state_equals_replay(session, rows, urls["gateway"])
    print(f"\nmake run was down {down:.1f} s; the session went on, nothing lost")
