"""A rolling upgrade to a version that adds a field, under load (issue 23, "No silent dead
letters"; docs/reliability.md, "Faults beyond a crash").

The supervised stack runs with tests/faults/newer on its PYTHONPATH: a process that starts
after the marker file exists is "the newer version", and every message it puts on the bus
carries a field today's readers do not know (top-level, in each envelope of a batch, in each
log record: tests/faults/newer/sitecustomize.py). The test creates the marker mid-period and
restarts each service in turn (SIGTERM; the supervisor starts it again), so that for a while
old and new versions read each other's messages. Nothing acknowledged may be lost, doubled or
reordered, every period ends on time, and nothing goes to the dead-letter queue.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.bots import Bot
from tests.faults.conftest import Supervised, start_supervised
from tests.faults.test_faults import (
    acked_after,
    check_log,
    check_state_equals_replay,
    export_with,
    fault_session,
    researcher,
)

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

NEWER = Path(__file__).parent / "newer"
ROLL = ("store", "timers", "decisions", "gateway")
PERIOD = 30.0
RATE = 5.0
SAYS_NEWER = "newer version: bus messages carry"


@pytest.fixture(scope="module")
def upgradable(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Supervised, Path]]:
    marker = tmp_path_factory.mktemp("upgrade") / "newer"
    path = os.pathsep.join(p for p in (str(NEWER), os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "DEVSTACK_NEWER_MARKER": str(marker)}
    with start_supervised(env) as handle:
        yield handle, marker


@pytest.mark.timeout(240)
async def test_a_rolling_upgrade_that_adds_a_field_loses_nothing(
    upgradable: tuple[Supervised, Path],
) -> None:
    supervised, marker = upgradable
    urls = supervised.urls
    for name in ROLL:  # all old before the upgrade
        assert SAYS_NEWER not in supervised.log_path(name).read_text(), name
    async with researcher(supervised) as api:
        session = await fault_session(
            api, period_length=PERIOD, num_subperiods=0, label="rolling upgrade"
        )
        bots = [Bot(urls["gateway"], p["code"], rate=RATE) for p in session["participants"]]
        for bot in bots:
            bot.start()
        timings: dict[str, float] = {}
        try:
            for bot in bots:
                await bot.wait_started(30)
            await acked_after(bots, 20)
            marker.touch()  # from now on, a service that starts is the newer version
            started = time.monotonic()
            for name in ROLL:
                previous = supervised.kill(name, signal.SIGTERM)
                timings[name] = await asyncio.to_thread(
                    supervised.wait_restarted, name, previous, 60
                )
                await acked_after(bots, 30)  # old and new side by side, under load
            rolled = time.monotonic() - started
            assert rolled < PERIOD, "the period ended before the roll was over"
            for bot in bots:
                await bot.wait_ended(PERIOD + 60)
        finally:
            for bot in bots:
                await bot.stop()

        rows = await export_with(api, session["session"], bots, 60)
        check_log(session, rows, bots, PERIOD, 0, max(timings.values()))
        await check_state_equals_replay(session, rows, urls["gateway"])
        dead = (await api.get("/api/dead-letters")).json()
    for name in ROLL:  # each was really replaced by the newer version
        assert SAYS_NEWER in supervised.log_path(name).read_text(), name
    assert dead["total"] == 0, f"dead letters during the upgrade: {dead['dead_letters']}"
    print(
        "\nROLLING UPGRADE (a new field on every bus message): "
        + ", ".join(f"{name} back in {seconds:.2f} s" for name, seconds in timings.items())
        + f"; {sum(len(b.acked) for b in bots)} frames acknowledged, 0 lost, 0 duplicated, "
        + "0 dead letters"
    )
