"""Fault injection: kill one process of a running session with SIGKILL; nothing may be lost.

Each case runs scripted participants (`bots.Bot`, which reconnect and resend as the JS client
does) through a whole period on a stack started the way `make run` starts it (the real
supervisor, which restarts what dies), kills one process mid-period, and then checks:
- every acknowledged frame is in the export exactly once, and no frame is logged twice;
- every tick is in the log once: one period_start, each sub-period, one period_end;
- the period ended on time, late by at most the time the fault took to mend;
- the group's state equals the fold of its exported log (`group.rebuild`, the code the live
  worker uses), and a `hello` after the end says the same;
- participants were resynchronised (a `hello`) where their connection or their group's
  worker was lost, and broadcasts resumed;
- the ack held (PROTOCOL v2 "The ack holds through everything"): every `hello` a bot got
  said `last_seq` at least the highest seq acknowledged to it before, on that connection or
  an earlier one (`stale_hellos`).
Recovery time per fault is printed (`-s`) and collected in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections import Counter
from datetime import datetime
from typing import Any

import httpx
import pytest

from services.common import experiments
from services.common.directory import GroupConfig
from services.common.group import rebuild
from tests.e2e.protocol import RESEARCHER_HOOKS
from tests.faults.bots import Bot

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

GROUPS, SIZE, RATE = 2, 2, 10.0


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


async def export(api: httpx.AsyncClient, session: str) -> list[dict[str, Any]]:
    response = await api.get(f"/api/sessions/{session}/events", params={"format": "jsonl"})
    assert response.status_code == 200, response.text
    return [json.loads(line) for line in response.text.splitlines() if line]


async def export_with(
    api: httpx.AsyncClient, session: str, bots: list[Bot], timeout: float, groups: int = GROUPS
) -> list[dict[str, Any]]:
    """The export, once every acknowledged frame and every group's period_end is in it."""
    async with asyncio.timeout(timeout):
        while True:
            rows = await export(api, session)
            logged = {(r["participant"], r["seq"]) for r in rows if r["direction"] == "in"}
            ends = sum(1 for r in rows if r["channel"] == "period_end")
            if ends >= groups and all((b.code, s) in logged for b in bots for s in b.acked):
                return rows
            await asyncio.sleep(0.1)  # the store writes in batches


async def acked_after(bots: list[Bot], timeout: float) -> None:
    """Until every bot has had a frame acknowledged that it sent after now (a recovery)."""
    marks = {bot.code: max(bot.acked | set(bot.unacked) | {0}) for bot in bots}
    for bot in bots:
        await bot.wait_for(
            "an ack after the fault",
            lambda b=bot: any(s > marks[b.code] for s in b.acked),
            timeout,
        )


def stale_hellos(bots: list[Bot]) -> list[str]:
    """Every `hello` whose `last_seq` was below a seq acknowledged to its bot before it."""
    return [
        f"{bot.code}: hello on connection {h.connection} said last_seq {h.last_seq} after "
        f"ack {h.acked} ({h.acked_here} on that same connection)"
        for bot in bots
        for h in bot.hellos
        if h.last_seq < h.acked
    ]


def researcher(stack: Any) -> httpx.AsyncClient:
    """The researchers' API of a supervised stack."""
    return httpx.AsyncClient(
        base_url=stack.urls["store"],
        headers={"Authorization": f"Bearer {stack.admin_token}"},
        timeout=10.0,
        event_hooks=RESEARCHER_HOOKS,  # notes seat keys (tests.e2e.protocol)
    )


async def fault_session(
    api: httpx.AsyncClient, *, period_length: float, num_subperiods: int, label: str
) -> dict[str, Any]:
    """GROUPS groups of SIZE members of `decisions`, one period."""
    response = await api.post(
        "/api/sessions",
        json={
            "experiment": "decisions",
            "num_participants": GROUPS * SIZE,
            "group_size": SIZE,
            "num_periods": 1,
            "period_length": period_length,
            "num_subperiods": num_subperiods,
            "label": label,
        },
    )
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return session


async def run_case(
    stack: Any,
    victim: str,
    *,
    period_length: float,
    num_subperiods: int = 0,
    drops: bool,
) -> dict[str, Any]:
    """`drops`: the fault closes the members' sockets (they reconnect); otherwise nobody's
    presence may change. Members get a new `hello` if they reconnect or their worker died."""
    hello_expected = drops or victim == "decisions"
    urls = stack.urls
    async with researcher(stack) as api:
        session = await fault_session(
            api,
            period_length=period_length,
            num_subperiods=num_subperiods,
            label=f"fault {victim}",
        )
        bots = [Bot(urls["gateway"], p["code"], rate=RATE) for p in session["participants"]]
        for bot in bots:
            bot.start()
        try:
            for bot in bots:
                await bot.wait_started(30)
            for bot in bots:  # some traffic before the fault
                await bot.wait_for("acks", lambda b=bot: len(b.acked) >= 10, 20)

            previous = stack.pid(victim)
            killed_at = time.monotonic()
            stack.kill(victim, signal.SIGKILL)
            restart = await asyncio.to_thread(stack.wait_restarted, victim, previous, 60)

            # Recovered: every bot had a frame sent after the kill acknowledged, and saw a
            # broadcast of its group's decisions after that.
            await acked_after(bots, period_length + 60)
            recovered_at = time.monotonic()
            for bot in bots:
                await bot.wait_ended(period_length + 60)
            if hello_expected:
                for bot in bots:
                    assert bot.first("hello", killed_at) is not None, f"{bot.code}: no hello"
            for bot in bots:
                assert bot.first("group_decisions", killed_at) is not None
        finally:
            for bot in bots:
                await bot.stop()

        rows = await export_with(api, session["session"], bots, 60)
        acked = sum(len(b.acked) for b in bots)
        check_log(session, rows, bots, period_length, num_subperiods, restart)
        stale = stale_hellos(bots)
        assert not stale, f"an ack and then an older hello ({victim} killed): {stale}"
        if not drops:  # (the bots leave after period_end: those rows are no fault's)
            ended = {r["group"]: r["ts"] for r in rows if r["channel"] == "period_end"}
            dropped = [
                r["value"]
                for r in rows
                if r["channel"] == "presence"
                and not r["value"]["connected"]
                and r["ts"] < ended[r["group"]]
            ]
            assert not dropped, f"presence changed though nobody disconnected: {dropped}"
        delay, late = tick_delays(rows, period_length, num_subperiods)
        await check_state_equals_replay(session, rows, urls["gateway"])
    return {
        "fault": victim,
        "restart_s": restart,
        "recovery_s": recovered_at - killed_at,
        "acked": acked,
        "lost": 0,
        "duplicated": 0,
        "tick_delay_s": delay,
        "late_ticks": late,
        "hellos": sum(len(b.hellos) for b in bots),
    }


def tick_delays(
    rows: list[dict[str, Any]], period_length: float, num_subperiods: int
) -> tuple[float, int]:
    """The largest delay of a sub-period or period_end row past its deadline, and how many
    ticks were marked late."""
    worst, late = 0.0, 0
    starts = {r["group"]: r["value"] for r in rows if r["channel"] == "period_start"}
    for row in rows:
        if row["channel"] not in ("subperiod", "period_end"):
            continue
        ends_at = starts[row["group"]]["ends_at"]
        due = ends_at
        if row["channel"] == "subperiod":
            due = ends_at - period_length + row["value"]["index"] * period_length / num_subperiods
        worst = max(worst, epoch(row["ts"]) - due)
        late += bool(row["value"].get("late"))
    return worst, late


def check_log(
    session: dict[str, Any],
    rows: list[dict[str, Any]],
    bots: list[Bot],
    period_length: float,
    num_subperiods: int,
    restart: float,
) -> None:
    inbound = Counter((r["participant"], r["seq"]) for r in rows if r["direction"] == "in")
    doubled = [key for key, n in inbound.items() if n > 1]
    assert not doubled, f"frames logged twice: {doubled[:10]}"
    for bot in bots:
        missing = sorted(s for s in bot.acked if (bot.code, s) not in inbound)
        assert not missing, f"{bot.code}: acknowledged, not logged: {missing[:20]}"
    errors = Counter((r["participant"], r["seq"]) for r in rows if r["channel"] == "error")
    assert all(n == 1 for n in errors.values()), "an error row answered one frame twice"
    for group in session["groups"]:
        mine = [r for r in rows if r["group"] == group["group"] and r["direction"] == "out"]
        ticks = Counter(r["channel"] for r in mine)
        assert ticks["period_start"] == 1 and ticks["period_end"] == 1, ticks
        indices = [r["value"]["index"] for r in mine if r["channel"] == "subperiod"]
        assert sorted(indices) == list(range(1, num_subperiods + 1)), indices
        start = next(r for r in mine if r["channel"] == "period_start")
        end = epoch(next(r["ts"] for r in mine if r["channel"] == "period_end"))
        # Never early; late by at most the repair (plus a loaded machine's scheduling).
        ends_at = start["value"]["ends_at"]
        assert ends_at - 0.001 <= end <= ends_at + restart + 5, (end, ends_at)
        assert end - epoch(start["ts"]) <= period_length + restart + 5
        stamps = [epoch(r["ts"]) for r in rows if r["group"] == group["group"]]
        assert stamps == sorted(stamps)


async def check_state_equals_replay(
    session: dict[str, Any], rows: list[dict[str, Any]], gateway_url: str
) -> None:
    """The fold of each group's exported log is the state the service holds (its hello)."""
    for group in session["groups"]:
        members = group["participants"]
        config = GroupConfig(
            session=session["session"],
            group=group["group"],
            experiment="decisions",
            members=members,
            num_periods=1,
            period_length=1.0,
            num_subperiods=0,
            rate_limit=0.0,
            params={},
        )
        mine = [
            {**r, "ts": epoch(r["ts"]), "seq": r["seq"]}
            for r in rows
            if r["group"] == group["group"]
        ]
        state = rebuild(config, experiments.get("decisions"), mine)
        end = next(r["value"] for r in mine if r["channel"] == "period_end")
        assert state.decisions == end["group_decisions"]
        late = Bot(gateway_url, members[0])
        late.start()
        try:
            await late.wait_for("hello", lambda b=late: bool(b.payloads("hello")), 20)
        finally:
            await late.stop()
        hello = late.payloads("hello")[0]
        assert hello["group_decisions"] == state.decisions
        assert hello["last_seq"] == state.last_seq[members[0]]
        assert hello["period"]["state"] == "ended"


CASES = [
    # (process, period length, sub-periods, whether members lose their connection)
    ("decisions", 10.0, 0, False),
    ("timers", 10.0, 5, False),
    ("store", 10.0, 0, False),
    ("gateway", 10.0, 0, True),
    ("mongo", 10.0, 0, False),
    ("rabbitmq", 20.0, 0, True),
]
RESULTS: list[dict[str, Any]] = []


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("victim", "length", "subperiods", "drops"), CASES)
async def test_sigkill_loses_nothing(
    supervised: Any, victim: str, length: float, subperiods: int, drops: bool
) -> None:
    result = await run_case(
        supervised, victim, period_length=length, num_subperiods=subperiods, drops=drops
    )
    RESULTS.append(result)
    print(
        f"\nFAULT {victim}: restarted in {result['restart_s']:.2f} s, participants recovered "
        f"in {result['recovery_s']:.2f} s; {result['acked']} frames acknowledged, 0 lost, "
        f"0 duplicated; ticks at most {result['tick_delay_s']:.3f} s late "
        f"({result['late_ticks']} marked late); {result['hellos']} hellos, none behind an ack"
    )
