"""Bots play what an experiment declares (issue 21): random_walk and fixed stay inside the
declared range and on its step without being told (the `max_<x>` guess is only for a plug-in
that declares nothing or is not installed where the bots run), choices and mixes are played as
such, the decisions worker's `make_strategy(name, "default", params)` gets the declared range
too, and the generic best response, searched over the declaration with the experiment's own
`payoffs`, earns more than random play against a fixed opponent (the Cournot plug-in)."""

from __future__ import annotations

import random
from typing import Any

import pytest

from services.bots.strategies import (
    DeclaredBestResponse,
    Fixed,
    RandomDeclared,
    RandomWalk,
    StrategyError,
    View,
    make_strategy,
)
from services.common.decision import Choice, Decision, Mix, Number, Option
from tests.unit.cournot_plugin import cournot

COURNOT = {"a": 60.0, "cost": 6.0, "max_quantity": 50.0}


class Declares:
    """A plug-in with payoffs u = −(x − 7)² and a declared decision of the given kind."""

    name = "declares"

    def __init__(self, decision: Decision) -> None:
        self.decision = decision

    def payoffs(
        self, decisions: dict[str, Any], roles: dict[str, int], params: dict[str, Any]
    ) -> dict[str, float]:
        return {
            c: -(((v if isinstance(v, int | float) else 0) - 7) ** 2) for c, v in decisions.items()
        }


def view(mine: Any, other: Any = 20.0) -> View:
    return View("a", 1, ("a", "b"), decisions={"a": mine, "b": other})


def test_random_walk_plays_the_declared_range_without_a_guess_or_a_warning() -> None:
    walk = make_strategy(cournot(), "random_walk", COURNOT | {"max_quantity": 80.0})
    assert isinstance(walk, RandomWalk)
    assert (walk.low, walk.high, walk.note) == (0.0, 80.0, "")
    rng, mine, moves = random.Random(4), None, []
    for _ in range(300):
        [(_, mine)] = walk.act(view(mine), rng)
        moves.append(mine)
    assert all(0 <= q <= 80 for q in moves) and max(moves) > 50


def test_random_walk_and_fixed_keep_the_declared_step() -> None:
    stepped = Declares(Decision(input=Number(min=1, max=9, step=0.5)))
    walk = make_strategy(stepped, "random_walk", {})  # type: ignore[arg-type]
    rng, mine = random.Random(7), None
    for _ in range(300):
        [(_, mine)] = walk.act(view(mine), rng)
        assert stepped.decision.check(mine) is None, mine
    fixed = make_strategy(stepped, "fixed", {})  # type: ignore[arg-type]
    assert isinstance(fixed, Fixed) and fixed.value == 5.0 and not fixed.note
    narrowed = make_strategy(stepped, "random_walk", {}, {"low": 2, "high": 3})  # type: ignore[arg-type]
    for _ in range(100):
        [(_, mine)] = narrowed.act(view(mine), rng)
        assert 2 <= mine <= 3 and stepped.decision.check(mine) is None, mine


def test_choices_and_mixes_are_played_as_declared() -> None:
    choice = Decision(
        input=Choice(options=[Option(value="x", label="X"), Option(value="y", label="Y")])
    )
    mix = Decision(input=Mix(actions=["R", "P", "S"]))
    rng = random.Random(3)
    for decision in (choice, mix):
        game = Declares(decision)
        walk = make_strategy(game, "random_walk", {})  # type: ignore[arg-type]
        assert isinstance(walk, RandomDeclared)
        for _ in range(50):
            [(_, value)] = walk.act(view(None), rng)
            assert decision.check(value) is None, value
        fixed = make_strategy(game, "fixed", {})  # type: ignore[arg-type]
        assert isinstance(fixed, Fixed) and decision.check(fixed.value) is None


def test_the_decisions_workers_call_gets_the_built_ins_declared_range() -> None:
    # services/decisions/botplay.py: make_strategy(config.experiment, "default", params).
    goods = make_strategy("public_goods", "default", {"endowment": 30.0, "mpcr": 0.4})
    assert isinstance(goods, RandomWalk) and (goods.low, goods.high) == (0.0, 30.0)
    assert goods.grid is not None and goods.grid.step == 0.1
    bimatrix = make_strategy("bimatrix", "default", {"game": "stag_hunt"})
    assert isinstance(bimatrix, RandomWalk) and (bimatrix.low, bimatrix.high) == (0.0, 1.0)


def test_a_plug_in_not_installed_here_is_guessed_and_said_so() -> None:
    walk = make_strategy("cournot", "random_walk", COURNOT)  # the name only: not registered
    assert isinstance(walk, RandomWalk) and (walk.low, walk.high) == (0.0, 50.0)
    assert "not installed where the bots run" in walk.note
    with pytest.raises(StrategyError, match="not installed here"):
        make_strategy("cournot", "best_response", COURNOT)


def test_the_generic_best_response_finds_the_best_reply_on_the_grid() -> None:
    best = make_strategy(cournot(), "best_response", COURNOT)
    assert isinstance(best, DeclaredBestResponse)
    # Against q2 = 20 the best reply is (a − cost − q2) / 2 = 17, a point of the grid.
    assert best.act(view(0.0, 20.0), random.Random(0)) == [("decisions", 17.0)]
    assert best.act(view(17.0, 20.0), random.Random(0)) == []  # already best: no churn
    peak = make_strategy(Declares(Decision(input=Number(min=0, max=10, step=1))), "best_response")  # type: ignore[arg-type]
    assert peak.act(view(3), random.Random(0)) == [("decisions", 7.0)]


def earnings(mine: Any, rounds: int = 400, seed: int = 11) -> float:
    """What the bot `mine` earns in `rounds` turns against a bot fixed at 20 units, by the
    plug-in's own payoffs (each turn's decisions held for one unit of time)."""
    game = cournot()
    opponent = make_strategy(game, "fixed", COURNOT, {"value": 20})
    rng = random.Random(seed)
    decisions: dict[str, Any] = {"a": 0.0, "b": 0.0}
    roles = {"a": 1, "b": 2}
    total = 0.0
    for _ in range(rounds):
        for code, strategy in (("a", mine), ("b", opponent)):
            seen = View(code, roles[code], ("a", "b"), decisions=dict(decisions))
            for _channel, value in strategy.act(seen, rng):
                assert game.decision(COURNOT).check(value) is None
                decisions[code] = value
        total += game.payoffs(decisions, roles, COURNOT)["a"]
    return total / rounds


def test_the_generic_best_response_earns_more_than_random_play_against_a_fixed_opponent() -> None:
    game = cournot()
    best = earnings(make_strategy(game, "best_response", COURNOT))
    randomly = earnings(make_strategy(game, "random_walk", COURNOT))
    print(f"per turn against q2 = 20: best response {best:.1f}, random walk {randomly:.1f}")
    assert best > randomly + 50
    assert best == pytest.approx(17 * 17, rel=0.01)  # (60 − 37 − 6) · 17 from the 2nd turn
