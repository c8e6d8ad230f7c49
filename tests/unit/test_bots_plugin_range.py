"""Bots on a plug-in experiment (issue 21): a plug-in declares no decision range yet, so
random_walk and fixed take it from the one `max_<x>` (and `min_<x>`) of its params and say so,
or refuse, rather than play the built-in slider's [0, 1] silently."""

from __future__ import annotations

import random

import pytest

from services.bots.strategies import Fixed, RandomWalk, StrategyError, View, make_strategy

COURNOT = {"a": 60.0, "cost": 6.0, "max_quantity": 50.0}  # canopy_cournot's defaults


def _moves(strategy: RandomWalk, turns: int = 200) -> list[float]:
    rng, mine, moves = random.Random(4), None, []
    for _ in range(turns):
        view = View("a", 1, ("a", "b"), decisions={"a": mine, "b": 10.0})
        (_, mine), *_ = strategy.act(view, rng)
        moves.append(mine)
    return moves


def test_random_walk_plays_a_plug_in_on_the_scale_its_params_bound_and_warns() -> None:
    walk = make_strategy("cournot", "random_walk", COURNOT)
    assert isinstance(walk, RandomWalk)
    assert (walk.low, walk.high) == (0.0, 50.0)
    assert "params.max_quantity" in walk.note and "--low and --high" in walk.note
    moves = _moves(walk)
    assert all(0 <= q <= 50 for q in moves)
    assert max(moves) > 30  # the whole scale, not [0, 1]


def test_a_min_param_gives_the_lower_end() -> None:
    walk = make_strategy("effort", "random_walk", {"min_effort": 1, "max_effort": 7})
    assert isinstance(walk, RandomWalk)
    assert (walk.low, walk.high) == (1.0, 7.0)
    assert "params.min_effort to params.max_effort" in walk.note


def test_fixed_takes_the_middle_of_that_range_and_needs_none_with_a_value() -> None:
    middle = make_strategy("cournot", "fixed", COURNOT)
    assert isinstance(middle, Fixed) and middle.value == 25.0 and middle.note
    given = make_strategy("anything", "fixed", {}, {"value": 18})
    assert isinstance(given, Fixed) and given.value == 18.0 and not given.note


@pytest.mark.parametrize(
    ("params", "among"),
    [
        ({"a": 60.0}, ""),
        ({"max_price": 10, "max_quantity": 5}, "max_price, max_quantity"),
        ({"max_quantity": "50"}, ""),  # not a number: no bound
    ],
)
def test_without_one_plain_bound_the_bots_refuse_and_ask_for_the_range(
    params: dict[str, object], among: str
) -> None:
    with pytest.raises(StrategyError, match="give --low and --high") as refused:
        make_strategy("cournot", "random_walk", params)
    assert among in str(refused.value)


def test_a_given_range_wins_and_the_built_ins_keep_their_own_silently() -> None:
    walk = make_strategy("cournot", "random_walk", COURNOT, {"low": 5, "high": 20})
    assert isinstance(walk, RandomWalk)
    assert (walk.low, walk.high, walk.note) == (5.0, 20.0, "")
    chosen = make_strategy("cournot", "random_walk", {}, {"low": 5, "high": 20})
    assert isinstance(chosen, RandomWalk) and (chosen.low, chosen.high) == (5.0, 20.0)
    one_end = make_strategy("cournot", "random_walk", COURNOT, {"low": 10})
    assert isinstance(one_end, RandomWalk) and (one_end.low, one_end.high) == (10.0, 50.0)
    for experiment, params, high in (
        ("decisions", {}, 1.0),
        ("bimatrix", {}, 1.0),
        ("public_goods", {"endowment": 10}, 10.0),
    ):
        built_in = make_strategy(experiment, "random_walk", params)
        assert isinstance(built_in, RandomWalk)
        assert (built_in.low, built_in.high, built_in.note) == (0.0, high, "")
