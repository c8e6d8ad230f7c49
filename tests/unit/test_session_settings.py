"""PROTOCOL v1.1 session settings in the group state machine: carry_decisions,
post_period_delay, on_disconnect (continue, end_period); and that the fold of the log agrees."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.common import experiments
from services.common.directory import GroupConfig
from services.common.group import Broadcast, PausePeriod, ResumePeriod, StartPeriod, rebuild
from services.store.domain import CreateSession
from tests.unit.test_decisions_rebuild import Recorder, comparable


def config(**settings: Any) -> GroupConfig:
    return GroupConfig(
        session="s",
        group="g",
        experiment="bimatrix",
        members=["a", "b"],
        num_periods=2,
        period_length=10.0,
        num_subperiods=0,
        rate_limit=0.0,
        params={},
        **settings,
    )


def connect_and_start(rec: Recorder) -> None:
    rec.presence("a", "a0", True)
    rec.presence("b", "b0", True)
    rec.tick("period_start")


def test_carry_decisions_false_resets_and_announces_at_the_next_period() -> None:
    rec = Recorder(config(carry_decisions=False))
    connect_and_start(rec)
    rec.frame("a", 1, 0.9)
    rec.now += 10
    rec.tick("period_end")
    rec.now += 1
    rec.tick("period_start")
    channels = [r["channel"] for r in rec.rows[-2:]]
    assert channels == ["period_start", "group_decisions"]
    assert rec.rows[-1]["value"] == {"a": 0.5, "b": 0.5}
    assert rec.state.decisions == {"a": 0.5, "b": 0.5}
    assert comparable(rebuild(rec.state.config, rec.state.experiment, rec.rows)) == comparable(
        rec.state
    )


def test_decisions_carry_over_by_default() -> None:
    rec = Recorder(config())
    connect_and_start(rec)
    rec.frame("a", 1, 0.9)
    rec.tick("period_end")
    rec.tick("period_start")
    assert rec.state.decisions["a"] == 0.9
    assert rec.rows[-1]["channel"] == "period_start"


def test_post_period_delay_goes_with_the_next_start_only() -> None:
    rec = Recorder(config(post_period_delay=7.5))
    rec.presence("a", "a0", True)
    rec.presence("b", "b0", True)
    assert rec.started == [StartPeriod(1, 10.0, 0, 0.0)]
    rec.tick("period_start")
    rec.tick("period_end")
    assert rec.started[-1] == StartPeriod(2, 10.0, 0, 7.5)
    assert rec.state.hello("a")["period"] == {"number": 2, "state": "waiting", "ends_at": None}


def test_end_period_on_disconnect_pays_what_was_earned_so_far() -> None:
    rec = Recorder(config(on_disconnect="end_period"))
    connect_and_start(rec)
    rec.frame("a", 1, 1.0)
    rec.frame("b", 1, 1.0)  # (C, C): 3 each
    rec.now += 4
    rec.presence("b", "b0", False)
    assert [r["channel"] for r in rec.rows[-2:]] == ["presence", "period_end"]
    end = rec.rows[-1]["value"]
    assert end["period"] == 1
    assert end["payoffs"]["a"] == pytest.approx(3.0, rel=1e-5)
    assert rec.state.period == 2 and rec.state.state == "waiting"
    # The timers' own period_end of period 1, when it comes, changes nothing.
    assert rec.state.on_timer("period_end", 1, 0, None, now=rec.now + 6) == []
    assert comparable(rebuild(rec.state.config, rec.state.experiment, rec.rows)) == comparable(
        rec.state
    )


def test_end_period_in_discrete_mode_before_a_subperiod_pays_zero() -> None:
    discrete = config(on_disconnect="end_period").model_dump() | {"num_subperiods": 4}
    rec = Recorder(GroupConfig(**discrete))
    connect_and_start(rec)
    rec.presence("a", "a0", False)
    end = rec.rows[-1]["value"]
    assert end["payoffs"] == {"a": 0.0, "b": 0.0}


def test_continue_runs_on() -> None:
    rec = Recorder(config())
    connect_and_start(rec)
    rec.presence("b", "b0", False)
    assert rec.state.state == "running"
    assert isinstance(rec.state.on_frame("a", 1, "decisions", 0.2, now=rec.now)[0], Broadcast)


def test_settings_are_validated() -> None:
    body = {"experiment": "decisions", "num_participants": 2, "group_size": 2, "period_length": 5}
    session = CreateSession.model_validate(body)
    assert (session.on_disconnect, session.carry_decisions, session.post_period_delay) == (
        "continue",
        True,
        0.0,
    )
    for bad in (
        {"on_disconnect": "retry"},
        {"carry_decisions": "no"},
        {"post_period_delay": -1},
    ):
        with pytest.raises(ValidationError) as caught:
            CreateSession.model_validate(body | bad)
        assert caught.value.errors()[0]["loc"] == (next(iter(bad)),)


def test_the_experiment_is_known() -> None:
    assert experiments.get("bimatrix")


def test_pause_stops_the_clock_and_the_payoffs_until_the_group_is_back() -> None:
    rec = Recorder(config(on_disconnect="pause"))
    connect_and_start(rec)
    start = rec.rows[-1]
    ends_at = start["value"]["ends_at"]
    rec.frame("a", 1, 1.0)
    rec.frame("b", 1, 1.0)  # (C, C): 3 each, for 4 s
    rec.now += 4
    effects = rec.state.on_presence("b", "b0", False, now=rec.now)
    rec._log(effects)
    paused = rec.rows[-1]
    assert paused["channel"] == "period_paused"
    assert paused["value"]["remaining"] == pytest.approx(ends_at - paused["ts"])
    assert PausePeriod(1) in effects
    assert rec.state.hello("a")["period"] == {
        "number": 1,
        "state": "paused",
        "ends_at": None,
        "remaining": paused["value"]["remaining"],
    }
    rec.frame("a", 2, 0.0)  # refused while paused
    assert rec.rows[-1]["value"]["code"] == "period_not_running"
    assert rec.state.on_timer("period_end", 1, 0, None, now=rec.now) == []  # a stale tick
    rec.now += 100  # paused for 100 s: not counted
    effects = rec.state.on_presence("b", "b1", True, now=rec.now)
    rec._log(effects)
    resumed = rec.rows[-1]
    assert resumed["channel"] == "period_resumed"
    assert resumed["value"]["ends_at"] == pytest.approx(
        resumed["ts"] + paused["value"]["remaining"]
    )
    assert ResumePeriod(1, resumed["value"]["ends_at"], 1) in effects
    rec.now += 6
    rec.tick("period_end")
    payoffs = rec.rows[-1]["value"]["payoffs"]
    assert payoffs == pytest.approx({"a": 3.0, "b": 3.0}, rel=1e-5)  # 10 s of (C, C)
    assert comparable(rebuild(rec.state.config, rec.state.experiment, rec.rows)) == comparable(
        rec.state
    )


def test_resume_says_which_tick_comes_next() -> None:
    discrete = config(on_disconnect="pause").model_dump() | {"num_subperiods": 4}
    rec = Recorder(GroupConfig(**discrete))
    connect_and_start(rec)
    rec.now += 2.5
    rec.tick("subperiod", 1)
    rec.state.on_presence("a", "a0", False, now=rec.now)
    effects = rec.state.on_presence("a", "a1", True, now=rec.now + 5)
    (resume,) = [e for e in effects if isinstance(e, ResumePeriod)]
    assert resume.next_tick == 2  # period_start and sub-period 1 were applied
