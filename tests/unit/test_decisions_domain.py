"""The group state machine, driven without broker or clock."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from services.common import experiments
from services.common.directory import GroupConfig
from services.common.group import Broadcast, Control, FlushAt, GroupState, StartPeriod


def make_state(
    *,
    experiment: str = "decisions",
    rate_limit: float = 0.0,
    num_periods: int = 1,
    members: tuple[str, ...] = ("a", "b"),
) -> GroupState:
    config = GroupConfig(
        session="s",
        group="g",
        experiment=experiment,
        members=list(members),
        num_periods=num_periods,
        period_length=10.0,
        num_subperiods=0,
        rate_limit=rate_limit,
        params={},
    )
    return GroupState(config, experiments.get(experiment))


def running_state(**kwargs: object) -> GroupState:
    state = make_state(**kwargs)  # type: ignore[arg-type]
    for code in state.config.members:
        state.on_presence(code, f"c-{code}", connected=True)
    state.on_timer("period_start", 1, 0, ends_at=110.0, now=100.0)
    return state


def channels(effects: Sequence[object]) -> list[str]:
    return [e.channel for e in effects if isinstance(e, Broadcast | Control)]


def test_hello_snapshot_before_anything() -> None:
    state = make_state(experiment="bimatrix")
    hello = state.hello("b")
    assert hello == {
        "participant": "b",
        "group": "g",
        "id_in_group": 2,
        "members": ["a", "b"],
        "group_decisions": {"a": 0.5, "b": 0.5},
        "period": {"number": 1, "state": "waiting", "ends_at": None},
        "last_seq": 0,
        "presence": {"a": False, "b": False},
    }
    assert make_state().hello("a")["group_decisions"] == {"a": None, "b": None}


def test_period_starts_once_when_the_whole_group_is_connected() -> None:
    state = make_state()
    first = state.on_presence("a", "c1", connected=True)
    assert channels(first) == ["hello", "presence"]
    assert not any(isinstance(e, StartPeriod) for e in first)
    second = state.on_presence("b", "c2", connected=True)
    assert [e for e in second if isinstance(e, StartPeriod)] == [StartPeriod(1, 10.0, 0)]
    # A reconnect while starting asks for nothing more.
    state.on_presence("b", "c2", connected=False)
    again = state.on_presence("b", "c3", connected=True)
    assert not any(isinstance(e, StartPeriod) for e in again)
    assert state.hello("a")["period"]["state"] == "waiting"


def test_decision_outside_a_running_period_is_refused_but_counts_as_seen() -> None:
    state = make_state()
    effects = state.on_frame("a", 1, "decisions", 0.3, now=0.0)
    assert effects == [
        Broadcast(
            "error",
            {"code": "period_not_running", "message": "period 1 is waiting", "seq": 1},
            participant="a",
            seq=1,
        )
    ]
    assert state.last_seq["a"] == 1


def test_decisions_are_broadcast_and_duplicates_ignored() -> None:
    state = running_state()
    assert state.on_frame("a", 1, "decisions", 0.25, now=1.0) == [
        Broadcast("group_decisions", {"a": 0.25, "b": None})
    ]
    assert state.on_frame("a", 1, "decisions", 0.99, now=1.1) == []
    assert state.decisions["a"] == 0.25


@pytest.mark.parametrize("value", ["x", True, None, float("nan"), [1]])
def test_invalid_decision(value: object) -> None:
    state = running_state()
    (effect,) = state.on_frame("a", 1, "decisions", value, now=1.0)
    assert isinstance(effect, Broadcast)
    assert effect.payload["code"] == "invalid_decision"
    assert effect.participant == "a"


def test_bimatrix_accepts_only_probabilities() -> None:
    state = running_state(experiment="bimatrix")
    assert channels(state.on_frame("a", 1, "decisions", 1.5, now=1.0)) == ["error"]
    assert channels(state.on_frame("a", 2, "decisions", 1, now=1.0)) == ["group_decisions"]


def test_rate_limit_coalesces_and_never_drops_the_last_change() -> None:
    state = running_state(rate_limit=1.0)
    assert channels(state.on_frame("a", 1, "decisions", 0.1, now=10.0)) == ["group_decisions"]
    assert state.on_frame("a", 2, "decisions", 0.2, now=10.2) == [FlushAt(11.0)]
    assert state.on_frame("b", 1, "decisions", 0.3, now=10.5) == []
    assert state.flush(now=11.0) == [Broadcast("group_decisions", {"a": 0.2, "b": 0.3})]
    assert state.flush(now=11.1) == []
    # A pending change is flushed before period_end.
    state.on_frame("a", 3, "decisions", 0.4, now=11.5)
    assert channels(state.on_timer("period_end", 1, 0, ends_at=None, now=100.0)) == [
        "group_decisions",
        "period_end",
        "finished",  # the last period: each member's outcome (tests/unit/test_finished.py)
        "finished",
    ]


def test_replacement_is_no_presence_change_and_old_connection_is_told() -> None:
    state = make_state()
    state.on_presence("a", "c1", connected=True)
    effects = state.on_presence("a", "c2", connected=True)
    assert channels(effects) == ["hello", "replaced"]
    replaced = [e for e in effects if isinstance(e, Control) and e.channel == "replaced"]
    assert replaced[0].connection == "c1"
    assert state.on_presence("a", "c1", connected=False) == []  # the old one closing
    assert channels(state.on_presence("a", "c2", connected=False)) == ["presence"]


def test_period_end_and_next_period() -> None:
    state = running_state(num_periods=2)
    effects = state.on_timer("period_end", 1, 0, ends_at=None, now=100.0)
    assert channels(effects) == ["period_end"]
    assert StartPeriod(2, 10.0, 0) in effects
    assert state.on_timer("period_end", 1, 0, ends_at=None, now=100.0) == []  # redelivered tick
    state.on_timer("period_start", 2, 0, ends_at=200.0, now=100.0)
    assert state.hello("a")["period"] == {"number": 2, "state": "running", "ends_at": 200.0}


def test_subperiod_snapshots() -> None:
    state = running_state(experiment="bimatrix")
    (effect,) = state.on_timer("subperiod", 1, 1, ends_at=None, now=100.0)
    assert isinstance(effect, Broadcast)
    assert effect.payload["index"] == 1
    assert set(effect.payload["payoffs"]) == {"a", "b"}
    assert state.on_timer("subperiod", 1, 1, ends_at=None, now=100.0) == []
