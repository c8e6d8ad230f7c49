"""A rolling restart under the real supervisor: SIGTERM each service in turn, mid-period.

Each service stops gracefully (services/common/serve.py; decisions hands its shards over,
the gateway closes its sockets with 1012) and the supervisor starts it again. Nothing
acknowledged may be lost, doubled or reordered, every group's state must equal the fold of its
log, and a participant sees at most one reconnect (the gateway's restart).
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import pytest

from tests.faults.bots import Bot
from tests.faults.test_faults import (
    acked_after,
    check_log,
    check_state_equals_replay,
    export_with,
    fault_session,
    researcher,
    stale_hellos,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

ROLL = ("store", "timers", "decisions", "gateway")
PERIOD = 30.0
RATE = 5.0
SERVICE_RESTART = 1012


@pytest.mark.timeout(240)
async def test_rolling_restart_loses_nothing(supervised: Any) -> None:
    urls = supervised.urls
    async with researcher(supervised) as api:
        session = await fault_session(
            api, period_length=PERIOD, num_subperiods=0, label="rolling restart"
        )
        bots = [Bot(urls["gateway"], p["code"], rate=RATE) for p in session["participants"]]
        for bot in bots:
            bot.start()
        timings: dict[str, float] = {}
        try:
            for bot in bots:
                await bot.wait_started(30)
            await acked_after(bots, 20)
            started = time.monotonic()
            for name in ROLL:
                previous = supervised.kill(name, signal.SIGTERM)
                timings[name] = await asyncio.to_thread(
                    supervised.wait_restarted, name, previous, 60
                )
                exit_was = supervised.state()["processes"][name]["last_exit"]
                assert exit_was in ("killed by SIGTERM", "exited with 0"), (name, exit_was)
                await acked_after(bots, 30)
            rolled = time.monotonic() - started
            assert rolled < PERIOD, "the period ended before the roll was over"
            for bot in bots:
                await bot.wait_ended(PERIOD + 60)
        finally:
            for bot in bots:
                await bot.stop()

        rows = await export_with(api, session["session"], bots, 60)
        check_log(session, rows, bots, PERIOD, 0, max(timings.values()))
        stale = stale_hellos(bots)
        assert not stale, f"an ack and then an older hello: {stale}"
        await check_state_equals_replay(session, rows, urls["gateway"])
    for bot in bots:
        # Connected once, and once more after the gateway's restart at most; that close said
        # "service restart" (the bot closed the last socket itself: not in `closes`).
        assert bot.connects <= 2, (bot.code, bot.connects, bot.closes)
        assert SERVICE_RESTART in bot.closes, (bot.code, bot.closes)
    print(
        "\nROLLING RESTART (SIGTERM, supervisor restarts): "
        + ", ".join(f"{name} back in {seconds:.2f} s" for name, seconds in timings.items())
        + f"; {sum(len(b.acked) for b in bots)} frames acknowledged, 0 lost, 0 duplicated"
    )
