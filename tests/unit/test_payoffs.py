"""Period payoffs (PROTOCOL v1.1 "Payoffs"), checked against a recomputation from the log rows.

`recompute` below is written from the contract's text only (a researcher's script): applied
decisions hold from their `in` row's ts until the next applied one; the period runs from the
`ts` of its `period_start` row to that of its `period_end` row; discrete periods pay the mean
of their sub-period snapshots.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from services.common import experiments
from services.common.directory import GroupConfig
from tests.unit.test_decisions_rebuild import Recorder

PD: list[list[list[float]]] = [[[3, 3], [0, 5]], [[5, 0], [1, 1]]]


def config(members: list[str], *, num_subperiods: int = 0, **params: Any) -> GroupConfig:
    return GroupConfig(
        session="s",
        group="g",
        experiment="bimatrix",
        members=members,
        num_periods=2,
        period_length=10.0,
        num_subperiods=num_subperiods,
        rate_limit=0.0,
        params=params,
    )


def expected(p: float, q: float, player: int, matrix: list[list[list[float]]] = PD) -> float:
    return (
        p * q * matrix[0][0][player]
        + p * (1 - q) * matrix[0][1][player]
        + (1 - p) * q * matrix[1][0][player]
        + (1 - p) * (1 - q) * matrix[1][1][player]
    )


def recompute(rows: list[dict[str, Any]], members: list[str], period: int) -> dict[str, float]:
    """Continuous payoffs of `period` from the rows alone (two members: row and column)."""
    errors = {(r["participant"], r["seq"]) for r in rows if r["channel"] == "error"}
    decisions = dict.fromkeys(members, 0.5)
    start = end = None
    area = dict.fromkeys(members, 0.0)
    since = 0.0

    def flow() -> dict[str, float]:
        p, q = decisions[members[0]], decisions[members[1]]
        return {members[0]: expected(p, q, 0), members[1]: expected(p, q, 1)}

    for row in rows:
        value = row["value"]
        if row["channel"] == "period_start" and value["period"] == period:
            start = since = row["ts"]
        elif row["channel"] == "period_end" and value["period"] == period:
            end = row["ts"]
            for code, u in flow().items():
                area[code] += u * (end - since)
            break
        elif (
            row["direction"] == "in"
            and row["channel"] == "decisions"
            and (row["participant"], row["seq"]) not in errors
        ):
            if start is not None:
                for code, u in flow().items():
                    area[code] += u * (row["ts"] - since)
                since = row["ts"]
            decisions[row["participant"]] = value
    assert start is not None and end is not None
    return {code: a / (end - start) for code, a in area.items()}


def play(rec: Recorder, seed: int, steps: int) -> None:
    rng = random.Random(seed)
    seqs = dict.fromkeys(rec.state.config.members, 0)
    for _ in range(steps):
        rec.now += rng.choice([0.01, 0.1, 0.7])
        member = rng.choice(rec.state.config.members)
        seqs[member] += 1
        rec.frame(member, seqs[member], rng.choice([rng.random(), 1.5]))  # 1.5: refused


def start_period(rec: Recorder) -> None:
    for code in rec.state.config.members:
        rec.presence(code, f"{code}0", True)
    rec.started.clear()
    rec.tick("period_start")


@pytest.mark.parametrize("seed", range(10))
def test_continuous_payoffs_are_the_time_average_of_the_log(seed: int) -> None:
    members = ["row", "col"]
    rec = Recorder(config(members))
    rec.now += 1
    play(rec, seed, 3)  # before the period: refused (period_not_running)
    start_period(rec)
    play(rec, seed + 100, 40)
    rec.now += 0.5
    rec.tick("period_end")
    end = next(r for r in rec.rows if r["channel"] == "period_end")
    live = end["value"]["payoffs"]
    again = recompute(rec.rows, members, 1)
    assert live == pytest.approx(again, rel=1e-9, abs=1e-12)
    assert set(live) == set(members)


def test_a_decision_held_the_whole_period_pays_its_flow_payoff() -> None:
    members = ["row", "col"]
    rec = Recorder(config(members))
    start_period(rec)
    rec.now += 2
    rec.frame("row", 1, 1.0)  # cooperate for sure: 8 of the 10 s
    rec.frame("col", 1, 0.0)  # defect for sure
    rec.now += 8
    rec.tick("period_end")
    payoffs = next(r for r in rec.rows if r["channel"] == "period_end")["value"]["payoffs"]
    # 2 s of both at 0.5 (row 2.25, col 2.25), then 8 s of (C, D): row 0, col 5.
    duration = rec.rows[-1]["ts"] - next(
        r["ts"] for r in rec.rows if r["channel"] == "period_start"
    )
    assert payoffs["row"] == pytest.approx(2.25 * 2 / duration, rel=1e-5)
    assert payoffs["col"] == pytest.approx((2.25 * 2 + 5 * 8) / duration, rel=1e-5)


def test_discrete_payoffs_are_the_mean_of_the_subperiod_snapshots() -> None:
    members = ["row", "col"]
    rec = Recorder(config(members, num_subperiods=2))
    start_period(rec)
    rec.frame("row", 1, 1.0)
    rec.frame("col", 1, 1.0)  # (C, C): 3 each
    rec.now += 5
    rec.tick("subperiod", 1)
    rec.frame("col", 2, 0.0)  # (C, D): row 0, col 5
    rec.now += 5
    rec.tick("subperiod", 2)
    rec.tick("period_end")
    subs = [r["value"]["payoffs"] for r in rec.rows if r["channel"] == "subperiod"]
    assert subs == [{"row": 3.0, "col": 3.0}, {"row": 0.0, "col": 5.0}]
    end = next(r for r in rec.rows if r["channel"] == "period_end")["value"]["payoffs"]
    assert end == {"row": 1.5, "col": 4.0}


def test_bimatrix_pays_the_column_player_as_the_column_player() -> None:
    game = experiments.get("bimatrix")
    roles = {"r": 1, "c": 2}
    assert game.payoffs({"r": 1.0, "c": 0.0}, roles, {}) == {"r": 0.0, "c": 5.0}
    assert game.payoffs({"r": 0.0, "c": 1.0}, roles, {}) == {"r": 5.0, "c": 0.0}
    # Larger groups: each as the row player against the others' mean mix.
    three = game.payoffs({"a": 1.0, "b": 1.0, "c": 0.0}, {"a": 1, "b": 2, "c": 3}, {})
    assert three["c"] == pytest.approx(expected(0.0, 1.0, 0))
    assert three["a"] == pytest.approx(expected(1.0, 0.5, 0))


def test_decisions_has_no_payoffs() -> None:
    rec = Recorder(
        GroupConfig(
            session="s",
            group="g",
            experiment="decisions",
            members=["a", "b"],
            num_periods=1,
            period_length=1.0,
            num_subperiods=0,
            rate_limit=0.0,
            params={},
        )
    )
    start_period(rec)
    rec.frame("a", 1, 3.0)
    rec.tick("period_end")
    end = [row for row in rec.rows if row["channel"] == "period_end"][-1]
    assert end["value"]["payoffs"] == {}


def test_public_goods_pays_the_endowment_kept_plus_a_share_of_the_pot() -> None:
    game = experiments.get("public_goods")
    roles = {"a": 1, "b": 2, "c": 3}
    assert game.initial_decision(1, {}) == 0
    assert game.payoffs({"a": 20, "b": 0, "c": 10}, roles, {}) == pytest.approx(
        {"a": 0 + 0.4 * 30, "b": 20 + 0.4 * 30, "c": 10 + 0.4 * 30}
    )
    params = {"endowment": 10, "mpcr": 0.5}
    assert game.payoffs({"a": 10, "b": 10, "c": 0}, roles, params) == pytest.approx(
        {"a": 10.0, "b": 10.0, "c": 20.0}
    )
    assert game.validate(20, {}) is None
    assert game.validate(20.5, {}) is not None
    assert game.validate(-1, {}) is not None
    assert game.validate(11, params) is not None
    assert game.validate(True, {}) is not None
