"""Experiment code that raises never loses an input (PROTOCOL v2 "The ack holds through
everything"), driven through `GroupState` and `rebuild` without broker or clock.

`Fragile` is a plug-in-like experiment (the same surface as tests/plugins/site) whose hooks
raise on inputs the test chooses: a decision of "boom-validate" or "boom-payoffs", an order
"boom". A `Recorder` plays the decisions handler's part (an `in` row per new frame, an `out`
row per broadcast), so every test can also check that the fold of the log equals live.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
import pytest
from pydantic import BaseModel, ConfigDict, Field

from services.common import experiments
from services.common.directory import GroupConfig
from services.common.experiments import Outcome
from services.common.group import Broadcast, Effect, GroupState, rebuild
from tests.unit.recording import out_rows

MAX_PAYLOAD_BYTES = 262_144  # PROTOCOL v2 "Size": 256 KiB

MEMBERS = ["a", "b", "c"]


class FragileParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    bonus: Annotated[float, Field(ge=0, le=100)] = 1.0


@dataclass
class Fragile:
    """Payoff: own decision (a number) + `params["bonus"]` (indexed: defaults must be there).

    `fail`: hooks that raise whatever they are given ("payoffs", "initial_state", "hello",
    "initial_decision"); `fail_for`: ids in group whose initial decision raises."""

    name: str = "fragile"
    channels: frozenset[str] = frozenset({"decisions", "orders"})
    params_model: type[BaseModel] = FragileParams
    fail: set[str] = field(default_factory=set)
    fail_for: set[int] = field(default_factory=set)
    seen_params: list[Mapping[str, Any]] = field(default_factory=list)

    def check_group(self, params: BaseModel, group_size: int) -> tuple[str, str] | None:
        return None

    def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
        self.seen_params.append(params)
        if "initial_decision" in self.fail or id_in_group in self.fail_for:
            raise RuntimeError("initial_decision failed")
        return 0

    def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
        self.seen_params.append(params)
        if decision == "boom-validate":
            raise ValueError("validate failed")
        if decision == "boom-payoffs" or isinstance(decision, int | float | str):
            return None
        return "a number or a string"

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        self.seen_params.append(params)
        if "payoffs" in self.fail or "boom-payoffs" in decisions.values():
            raise ZeroDivisionError("payoffs failed")
        if "inf" in decisions.values():
            return dict.fromkeys(decisions, float("inf"))  # breaks the contract: not finite
        bonus = params["bonus"]
        return {
            code: (float(v) if isinstance(v, int | float) else 0.0) + bonus
            for code, v in decisions.items()
        }

    def initial_state(self, params: Mapping[str, Any]) -> Any:
        if "initial_state" in self.fail:
            raise KeyError("initial_state failed")
        return {"orders": []}

    def hello(self, state: Any) -> dict[str, Any]:
        if "hello" in self.fail:
            raise AttributeError("hello failed")
        return {"book": state}

    def on_input(
        self,
        state: Any,
        participant: str,
        id_in_group: int,
        seq: int,
        channel: str,
        payload: Any,
        params: Mapping[str, Any],
    ) -> Outcome:
        if payload == "boom":
            raise RuntimeError("on_input failed")
        if isinstance(payload, dict) and "pad" in payload:  # a broadcast as big as asked
            return Outcome(state, [("echo", "x" * int(payload["pad"]))])
        new = {"orders": [*state["orders"], payload]}
        return Outcome(new, [("book", new)], earned={participant: 1.0})


def config(**overrides: Any) -> GroupConfig:
    fields: dict[str, Any] = {
        "session": "s",
        "group": "g",
        "experiment": "fragile",
        "members": MEMBERS,
        "num_periods": 2,
        "period_length": 10.0,
        "num_subperiods": 0,
        "rate_limit": 0.0,
        "params": {},
    }
    return GroupConfig(**(fields | overrides))


class Recorder:
    """The handler's part: stamps, `in` rows for new frames, `out` rows for broadcasts."""

    def __init__(self, experiment: Any, cfg: GroupConfig | None = None) -> None:
        self.state = GroupState(cfg or config(), experiment)
        self.rows: list[dict[str, Any]] = []
        self.now = 1000.0
        self.out: list[Effect] = []

    def _log(self, effects: list[Effect]) -> list[Effect]:
        self.rows.extend(out_rows(self.state, effects, self.now))
        self.out = effects
        return effects

    def frame(self, who: str, seq: int, value: Any, channel: str = "decisions") -> list[Effect]:
        self.now += 0.5
        ts = self.now
        if not self.state.seen(who, seq):
            ts = self.state.stamp(self.now)
            self.rows.append(
                {
                    "ts": ts,
                    "participant": who,
                    "direction": "in",
                    "channel": channel,
                    "seq": seq,
                    "value": value,
                }
            )
        return self._log(self.state.on_frame(who, seq, channel, value, ts))

    def start(self) -> None:
        for code in self.state.config.members:
            self._log(self.state.on_presence(code, f"{code}-c", True, now=self.now))
        self.tick("period_start")

    def tick(self, event: str, index: int = 0) -> list[Effect]:
        self.now += 1.0
        ends_at = self.now + self.state.config.period_length
        period = self.state.period
        return self._log(self.state.on_timer(event, period, index, ends_at, now=self.now))


def state_of(state: GroupState) -> dict[str, Any]:
    """Everything an input may change, except `last_seq` (which a failed input moves)."""
    return {
        "decisions": dict(state.decisions),
        "market": orjson.loads(orjson.dumps(state.market)),
        "flow": dict(state.flow),
        "flow_since": state.flow_since,
        "area": dict(state.area),
        "earned": dict(state.earned),
        "last_broadcast_at": state.last_broadcast_at,
        "flush_pending": state.flush_pending,
        "period": state.period,
        "state": state.state,
        "history": orjson.loads(orjson.dumps(state.history)),
    }


def comparable(state: GroupState) -> dict[str, Any]:
    """What the fold must re-make: as tests/unit/test_decisions_rebuild.py compares (a rebuild
    sends a pending StartPeriod again; the rate limit's clock is the broadcast row's `ts`)."""
    return {
        **state_of(state),
        "state": "waiting" if state.state == "starting" else state.state,
        "last_broadcast_at": None,
        "last_seq": dict(state.last_seq),
    }


def errors(effects: list[Effect]) -> list[dict[str, Any]]:
    return [e.payload for e in effects if isinstance(e, Broadcast) and e.channel == "error"]


@pytest.mark.parametrize(
    ("value", "channel"),
    [("boom-validate", "decisions"), ("boom-payoffs", "decisions"), ("boom", "orders")],
)
def test_a_hook_that_raises_on_an_input_changes_nothing_and_says_so(
    value: str, channel: str, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Recorder(Fragile())
    rec.start()
    rec.frame("a", 1, 5)
    rec.frame("b", 1, {"price": 1}, channel="orders")
    before = state_of(rec.state)

    with caplog.at_level(logging.DEBUG, logger="services.common.group"):
        effects = rec.frame("a", 2, value, channel=channel)

    # Acknowledged and seen (a resend is a duplicate), answered, and nothing else changed.
    assert effects == [
        Broadcast(
            "error",
            {
                "code": "experiment_error",
                "message": "the experiment failed on this input; it changed nothing",
                "seq": 2,
            },
            participant="a",
            seq=2,
        )
    ]
    assert rec.state.last_seq["a"] == 2
    assert rec.state.on_frame("a", 2, channel, value, rec.now) == []
    assert state_of(rec.state) == before
    # Logged once, with its traceback, naming the code and seq (no key exists in here).
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "a's input 2" in failures[0].getMessage()

    # The group goes on: the next inputs apply.
    rec.frame("a", 3, 7)
    assert rec.state.decisions["a"] == 7
    assert errors(rec.frame("c", 1, {"price": 2}, channel="orders")) == []
    rec.tick("period_end")
    assert comparable(rebuild(rec.state.config, rec.state.experiment, rec.rows)) == comparable(
        rec.state
    )


def test_a_non_finite_payoff_is_a_failure_of_the_hook() -> None:
    rec = Recorder(Fragile())
    rec.start()
    rec.frame("a", 1, 2)
    before = state_of(rec.state)
    assert errors(rec.frame("b", 1, "inf"))[0]["code"] == "experiment_error"
    assert state_of(rec.state) == before


def test_the_fold_takes_the_logs_word_for_a_failed_input() -> None:
    """Live, the hook failed on a→2; rebuilt with an experiment that no longer fails (a hook
    that is not as deterministic as it must be), the input still changes nothing."""
    rec = Recorder(Fragile(fail={"payoffs"}))
    rec.start()  # period_start: payoffs fail → no flow payoffs
    assert rec.state.flow == {}
    errors_seen = errors(rec.frame("a", 1, 4))
    assert errors_seen[0]["code"] == "experiment_error"
    rebuilt = rebuild(rec.state.config, experiments.wrap(Fragile()), rec.rows)
    assert rebuilt.decisions == rec.state.decisions == dict.fromkeys(MEMBERS, 0)
    assert rebuilt.last_seq == rec.state.last_seq
    # …while a fold without the log's word would have applied it.
    folded = GroupState(rec.state.config, experiments.wrap(Fragile()))
    for row in rec.rows:
        folded.fold(row)
    assert folded.decisions["a"] == 4


def test_hooks_that_fail_on_ticks_and_connections_count_as_empty(
    caplog: pytest.LogCaptureFixture,
) -> None:
    experiment = Fragile(fail={"payoffs", "initial_state", "hello"}, fail_for={2})
    with caplog.at_level(logging.DEBUG, logger="services.common.group"):
        rec = Recorder(experiment, config(num_subperiods=2))
        assert rec.state.decisions == {"a": 0, "b": None, "c": 0}
        rec.start()
        assert rec.state.market is None
        assert rec.state.hello("a")["group_decisions"] == {"a": 0, "b": None, "c": 0}
        assert "book" not in rec.state.hello("a")
        rec.tick("subperiod", 1)
        assert rec.out[0].payload["payoffs"] == {}  # type: ignore[union-attr]
        rec.tick("period_end")
        end = rec.out[0].payload  # type: ignore[union-attr]
        assert end["payoffs"] == {}
        assert rec.state.period == 2
    live = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert {r.getMessage().split(": ")[1].split(" ")[0] for r in live} == {
        "initial_decision",
        "payoffs",
        "initial_state",
        "hello",
    }
    assert all(r.exc_info is not None for r in live)

    # The fold meets the same failures, gets the same state, and logs them quietly.
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="services.common.group"):
        rebuilt = rebuild(rec.state.config, experiments.wrap(experiment), rec.rows)
    assert comparable(rebuilt) == comparable(rec.state)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_hooks_get_the_validated_params_with_defaults() -> None:
    experiment = Fragile()
    rec = Recorder(experiment)  # params {}: `payoffs` indexes params["bonus"]
    rec.start()
    rec.frame("a", 1, 2)
    assert rec.state.flow == {"a": 3.0, "b": 1.0, "c": 1.0}
    assert experiment.seen_params
    assert all(dict(p) == {"bonus": 1.0} for p in experiment.seen_params)


def test_v1_params_still_load() -> None:
    """Sessions stored before v2: `{}`, a named game, and the `null` v1 let through (which made
    every decision fail then) all play, with the model's defaults."""
    bimatrix = experiments.get("bimatrix")
    for stored, expected in [
        ({}, {"game": "prisoners_dilemma", "initial_decision": 0.5}),
        ({"game": "stag_hunt"}, {"game": "stag_hunt", "initial_decision": 0.5}),
        ({"game": None}, {"game": "prisoners_dilemma", "initial_decision": 0.5}),
        (
            {"payoff_matrix": None, "initial_decision": 1},
            {"game": "prisoners_dilemma", "initial_decision": 1.0},
        ),
    ]:
        cfg = config(experiment="bimatrix", members=["r", "c"], params=stored)
        state = GroupState(cfg, bimatrix)
        assert state.params == expected
        for code in ("r", "c"):
            state.on_presence(code, f"{code}-c", True)
        state.on_timer("period_start", 1, 0, 10.0, now=0.0)
        assert errors(state.on_frame("r", 1, "decisions", 1.0, 1.0)) == []
        assert state.decisions["r"] == 1.0


def test_an_input_whose_broadcasts_would_pass_the_cap_is_refused() -> None:
    rec = Recorder(Fragile())
    rec.start()
    rec.frame("a", 1, "x" * 100_000)
    rec.frame("b", 1, "y" * 100_000)
    before = state_of(rec.state)
    refused = errors(rec.frame("c", 1, "z" * 100_000))  # 300 kB of group_decisions
    assert [e["code"] for e in refused] == ["invalid_decision"]
    assert "256 KiB" in refused[0]["message"]
    assert state_of(rec.state) == before
    assert errors(rec.frame("c", 2, "z" * 40_000)) == []  # smaller: fits

    # Its own row: a payload past the cap is refused before any hook sees it.
    assert errors(rec.frame("a", 2, "w" * MAX_PAYLOAD_BYTES))[0]["code"] == "invalid_decision"
    # An own channel's broadcast past the cap: refused, the market as it was.
    market = state_of(rec.state)["market"]
    refused = errors(rec.frame("a", 3, {"pad": MAX_PAYLOAD_BYTES}, channel="orders"))
    assert [e["code"] for e in refused] == ["invalid_decision"]
    assert state_of(rec.state)["market"] == market
    assert comparable(rebuild(rec.state.config, rec.state.experiment, rec.rows)) == comparable(
        rec.state
    )


def test_an_experiments_long_message_is_cut() -> None:
    class Wordy(Fragile):
        def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
            return "no" * 100_000

    rec = Recorder(Wordy())
    rec.start()
    (error,) = errors(rec.frame("a", 1, 1))
    assert error["code"] == "invalid_decision"
    assert len(error["message"]) <= 500


def test_a_broadcast_that_is_not_json_is_a_failure_of_the_hook() -> None:
    class Opaque(Fragile):
        def on_input(self, state: Any, *args: Any) -> Outcome:
            return Outcome({"orders": ["changed"]}, [("book", object())])

    rec = Recorder(Opaque())
    rec.start()
    before = state_of(rec.state)
    assert errors(rec.frame("a", 1, {"price": 1}, channel="orders"))[0]["code"] == (
        "experiment_error"
    )
    assert state_of(rec.state) == before
