"""Bots on the real stack: `start_bots` / `fill_session` join slots and play; their frames land
in the event log, once each; a best-response bot answers a person's move; a zero-intelligence
fleet trades within its limits; a person opening a bot's link takes the slot over; and
`make run BOTS=1`'s bots process fills every demo slot but the one the banner marks."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from devstack.__main__ import create_demo_sessions, print_banner
from devstack.infra import stop_process
from devstack.stack import STOP_GRACE, start_bots_process
from services.bots.runner import BotsError, fill_session, open_slots, start_bots
from tests.e2e.protocol import TIMEOUT, Participant, create_session, export_until, inbound

pytestmark = [pytest.mark.e2e]

PERIOD = 2.0  # seconds: long enough for a few turns at RATE, short for the suite
RATE = 10.0


def _logged(rows: list[dict[str, str]], code: str) -> set[int]:
    return {int(r["seq"]) for r in inbound(rows, code)}


async def test_start_bots_play_a_period_and_every_acked_frame_is_logged_once(
    api: httpx.AsyncClient,
) -> None:
    session = await create_session(
        api, experiment="public_goods", num_participants=4, group_size=4, period_length=PERIOD
    )
    links = [p["url"] for p in session["participants"]]
    fleet = await start_bots(
        links, experiment="public_goods", params={}, rate=RATE, num_periods=1, seed=1
    )
    try:
        await fleet.wait_connected(10)
        await fleet.wait_finished(PERIOD + 15)
    finally:
        await fleet.stop()
    stats = fleet.stats()
    assert set(stats) == {p["code"] for p in session["participants"]}
    for bot in fleet.bots:
        assert stats[bot.code]["sent"] >= 5, stats
        # A turn taken as the period ends can reach the group after its period_end.
        assert all(e["code"] == "period_not_running" for e in bot.errors), bot.errors
        assert len(bot.errors) <= 1, bot.errors
    rows = await export_until(
        api,
        session["session"],
        lambda rows: (
            any(r["channel"] == "period_end" for r in rows)
            and all(len(_logged(rows, b.code)) >= len(b.acked) for b in fleet.bots)
        ),
    )
    for bot in fleet.bots:
        logged = [int(r["seq"]) for r in inbound(rows, bot.code)]
        assert len(logged) == len(set(logged)), "a frame was logged twice"
        assert bot.acked <= set(logged)
        values = [json.loads(r["value"]) for r in inbound(rows, bot.code)]
        assert all(0 <= v <= 20 for v in values)  # the default endowment
    ends = [r for r in rows if r["channel"] == "period_end"]
    assert len(ends) == 1


async def test_best_response_bot_answers_a_person_in_a_stag_hunt(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(
        api, experiment="bimatrix", params={"game": "stag_hunt"}, period_length=30
    )
    person, slot = session["participants"]
    fleet = await start_bots(
        [slot["url"]],
        experiment="bimatrix",
        params={"game": "stag_hunt"},
        strategy="best_response",
        rate=RATE,
    )
    human = await Participant.connect(gateway_url, person["code"])
    try:
        await human.expect("period_start")
        bot = fleet.bots[0]
        # Stag hunt: against a stag hunter (probability 1 of action 0), hunting stag pays.
        await human.ack(await human.send(1.0))
        await bot.wait_for("stag", lambda: bot.decisions.get(bot.code) == 1.0, 10)
        await human.ack(await human.send(0.0))
        await bot.wait_for("hare", lambda: bot.decisions.get(bot.code) == 0.0, 10)
        assert fleet.stats()[bot.code]["errors"] == 0
    finally:
        await human.close()
        await fleet.stop()


async def test_zero_intelligence_traders_trade_within_their_limits(
    api: httpx.AsyncClient,
) -> None:
    params = {"buyer_value": 60, "seller_cost": 20}
    session = await create_session(
        api,
        experiment="double_auction",
        num_participants=4,
        group_size=4,
        period_length=PERIOD,
        params=params,
    )
    fleet = await fill_session(
        str(api.base_url),
        api.headers["Authorization"].removeprefix("Bearer "),
        session["session"],
        rate=RATE,
        seed=7,
    )
    try:
        await fleet.wait_finished(PERIOD + 15)
    finally:
        await fleet.stop()
    rows = await export_until(
        api, session["session"], lambda rows: any(r["channel"] == "period_end" for r in rows)
    )
    orders = [json.loads(r["value"]) for r in rows if r["channel"] == "orders"]
    trades = [json.loads(r["value"]) for r in rows if r["channel"] == "trade"]
    assert orders and trades, "ZI traders with crossing limits trade within two seconds"
    # ZI-C: bids at most the value, asks at least the cost; so no trade outside [cost, value].
    assert all(o["price"] <= 60 for o in orders if o["side"] == "bid"), orders
    assert all(20 <= o["price"] <= 60 for o in orders if o["side"] == "ask"), orders
    assert all(20 <= t["price"] <= 60 for t in trades)
    # Refusals: a cancel that raced a fill (the order was no longer open), or a turn taken as
    # the period ended. Never a malformed or out-of-limits order.
    sent = {(r["participant"], r["seq"]): r["channel"] for r in rows if r["direction"] == "in"}
    for r in rows:
        if r["channel"] == "error":
            code = json.loads(r["value"])["code"]
            assert code in ("invalid_decision", "period_not_running"), r
            if code == "invalid_decision":
                assert sent[(r["participant"], r["seq"])] == "cancel", r
    print(f"\n{len(orders)} orders, {len(trades)} trades")


async def test_a_person_opening_a_bots_link_takes_the_slot(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    session = await create_session(api, period_length=30)
    _, second = session["participants"]
    detail = (await api.get(f"/api/sessions/{session['session']}")).json()
    assert [p["code"] for p in open_slots(detail, all_but=1)] == [second["code"]]
    with pytest.raises(BotsError):
        open_slots(detail, count=1, all_but=1)
    fleet = await start_bots([second["url"]], experiment="decisions", params={}, rate=RATE)
    try:
        await fleet.wait_connected(10)
        human = await Participant.connect(gateway_url, second["code"])
        await human.expect("hello")
        bot = fleet.bots[0]
        await bot.wait_for("4409", lambda: bot.gave_up is not None, 10)
        assert bot.gave_up == "replaced" and bot.finished
        await human.close()
    finally:
        await fleet.stop()


async def test_make_run_bots_take_every_demo_slot_but_the_marked_one(
    stack: Any, api: httpx.AsyncClient, gateway_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sessions = create_demo_sessions(stack.urls)
    timings = {"infra": 1.0, "services": 1.0, "session": 0.1, "total": 2.1}
    print_banner(stack.urls, sessions, None, timings, stack.run_dir, None, True)
    banner = capsys.readouterr().out
    marked = [line.split()[2] for line in banner.splitlines() if "<- open this one" in line]
    assert len(marked) == len(sessions) and banner.count("(bot)") == sum(
        len(s["participants"]) - 1 for s in sessions
    )
    process = start_bots_process(stack, [s["session"] for s in sessions])
    try:

        async def connected() -> list[dict[str, Any]]:
            return [(await api.get(f"/api/sessions/{s['session']}")).json() for s in sessions]

        async with asyncio.timeout(TIMEOUT):
            while not all(d["connected"] == len(d["participants"]) - 1 for d in await connected()):
                assert process.poll() is None, stack.log_tail("bots")
                await asyncio.sleep(0.05)  # the API has no event to wait on
        for detail in await connected():
            free = [p["url"] for p in detail["participants"] if not p["connected"]]
            assert len(free) == 1 and free[0] in marked
        # The newcomer opens the marked bimatrix link: the period starts, the bot plays.
        bimatrix = next(s for s in sessions if "dilemma" in s["label"])
        url = next(u for u in marked if any(p["url"] == u for p in bimatrix["participants"]))
        human = await Participant.connect(gateway_url, url.rsplit("/", 1)[1])
        try:
            await human.expect("period_start")
            bot_code = next(p["code"] for p in bimatrix["participants"] if p["url"] != url)
            # The bot's random walk moves it away from the initial 0.5.
            await human.expect("group_decisions", lambda d: d[bot_code] != 0.5)
        finally:
            await human.close()
    finally:
        stop_process(process, grace=STOP_GRACE)
    assert process.returncode == 0, stack.log_tail("bots")
