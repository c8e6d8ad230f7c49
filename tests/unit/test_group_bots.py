"""Bots in a group's state machine (PROTOCOL v2 "Online studies"), without I/O: a member away
for `dropout_grace` is played by a bot, takes the seat back, bot inputs are applied like frames,
seats the lobby gave bots are seated on the first input, and the fold agrees with live."""

from __future__ import annotations

from typing import Any

from services.common import experiments
from services.common.directory import GroupConfig
from services.common.group import BotAfter, Broadcast, Effect, GroupState, StartPeriod, rebuild


def state(**overrides: Any) -> GroupState:
    body: dict[str, Any] = {
        "session": "s",
        "group": "g",
        "experiment": "decisions",
        "members": ["a", "b"],
        "num_periods": 1,
        "period_length": 10.0,
        "num_subperiods": 0,
        "rate_limit": 0.0,
        "params": {},
        "on_disconnect": "bots",
        "dropout_grace": 5.0,
    }
    return GroupState(GroupConfig(**(body | overrides)), experiments.get("decisions"))


def rows(effects: list[Effect], stamp: GroupState | None = None) -> list[dict[str, Any]]:
    """The log rows of these effects (`stamp`: the group that stamps rows the adapter would)."""
    return [
        {
            "ts": e.ts if e.ts is not None or stamp is None else stamp.stamp(0.0),
            "participant": e.participant,
            "direction": "out",
            "channel": e.channel,
            "seq": e.seq,
            "value": e.payload,
        }
        for e in effects
        if isinstance(e, Broadcast)
    ]


def presences(effects: list[Effect]) -> list[dict[str, Any]]:
    return [e.payload for e in effects if isinstance(e, Broadcast) and e.channel == "presence"]


def test_a_member_away_past_the_grace_is_played_by_a_bot_until_they_are_back() -> None:
    group = state()
    group.on_presence("a", "ca", True, now=1.0)
    group.on_presence("b", "cb", True, now=2.0)
    group.on_timer("period_start", 1, 0, ends_at=13.0, now=3.0)
    left = group.on_presence("b", "cb", False, now=4.0)
    (after,) = [e for e in left if isinstance(e, BotAfter)]
    assert after.participant == "b" and after.at == group.away_since["b"] + 5.0

    took = group.bot_takes_over("b", now=9.0)
    assert presences(took) == [{"participant": "b", "connected": True, "bot": True}]
    assert group.bots == {"b"} and group.hello("a")["presence"] == {"a": True, "b": True}
    assert group.hello("a")["bots"] == ["b"]
    assert group.bot_takes_over("b", now=9.5) == []  # once

    moved = group.on_bot_input("b", "decisions", 0.7, now=10.0)
    assert [e.channel for e in moved if isinstance(e, Broadcast)] == ["group_decisions"]
    assert group.decisions["b"] == 0.7
    assert group.on_bot_input("b", "decisions", "not a number", now=10.5) == []  # to nobody
    assert group.on_bot_input("a", "decisions", 0.1, now=10.6) == []  # a is a person

    back = group.on_presence("b", "cb2", True, now=11.0)
    assert presences(back) == [{"participant": "b", "connected": True}]
    assert group.bots == set() and group.last_seq["b"] == 0  # the bot used no seq of b's


def test_back_within_the_grace_no_bot_plays() -> None:
    group = state()
    group.on_presence("a", "ca", True, now=1.0)
    group.on_presence("b", "cb", True, now=2.0)
    group.on_presence("b", "cb", False, now=3.0)
    group.on_presence("b", "cb2", True, now=4.0)
    assert group.bot_takes_over("b", now=8.0) == []


def test_a_bot_lets_a_group_that_waited_for_the_member_start() -> None:
    group = state()
    group.on_presence("a", "ca", True, now=1.0)
    group.on_presence("b", "cb", True, now=2.0)
    group.on_timer("period_start", 1, 0, ends_at=13.0, now=3.0)
    group.on_timer("period_end", 1, 0, ends_at=None, now=13.0)
    assert group.bot_takes_over("b", now=20.0) == []  # over: nobody is played any more


def test_seats_the_lobby_gave_bots_are_seated_on_the_first_input() -> None:
    group = state(bots=["b"])
    effects = group.on_presence("a", "ca", True, now=1.0)
    assert presences(effects)[0] == {"participant": "b", "connected": True, "bot": True}
    assert any(isinstance(e, StartPeriod) for e in effects)  # a and b's bot: complete
    group.on_timer("period_start", 1, 0, ends_at=11.0, now=2.0)
    ended = group.on_timer("period_end", 1, 0, ends_at=None, now=11.0)
    finished = [e for e in ended if isinstance(e, Broadcast) and e.channel == "finished"]
    assert [e.participant for e in finished] == ["a"]  # nobody to tell for the bot's seat


def test_the_fold_of_the_log_arrives_at_the_live_state() -> None:
    live = state()
    log: list[dict[str, Any]] = []
    log += rows(live.on_presence("a", "ca", True, now=1.0))
    log += rows(live.on_presence("b", "cb", True, now=2.0))
    log += rows(live.on_timer("period_start", 1, 0, ends_at=13.0, now=3.0))
    log += rows(live.on_presence("b", "cb", False, now=4.0))
    log += rows(live.bot_takes_over("b", now=9.0))
    ts = live.stamp(10.0)
    log.append(
        {"ts": ts, "participant": "b", "direction": "in", "channel": "decisions", "seq": None,
         "value": 0.4}
    )  # fmt: skip
    log += rows(live.on_bot_input("b", "decisions", 0.4, now=ts), live)
    folded = rebuild(live.config, experiments.get("decisions"), log)
    assert folded.bots == live.bots == {"b"}
    assert folded.decisions == live.decisions and folded.decisions["b"] == 0.4
    assert folded.away_since == live.away_since == {}

    # Away but not yet played: a rebuild knows since when (the worker re-arms the grace).
    away = state()
    log = rows(away.on_presence("a", "ca", True, now=1.0))
    log += rows(away.on_presence("a", "ca", False, now=2.0))
    assert rebuild(away.config, experiments.get("decisions"), log).away_since == away.away_since
