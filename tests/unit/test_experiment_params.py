"""Experiment params are validated when a session is created (PROTOCOL v1.1 "Session
settings"): unknown keys and bad values are refused, naming the offending field."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from services.common import experiments
from services.store.domain import CreateSession


def create(experiment: str, params: dict[str, Any], group_size: int = 2) -> CreateSession:
    return CreateSession(
        experiment=experiment,
        num_participants=group_size * 2,
        group_size=group_size,
        period_length=10,
        params=params,
    )


def refused(experiment: str, params: dict[str, Any], group_size: int = 2) -> str:
    """The dotted field of the first error."""
    with pytest.raises(ValidationError) as caught:
        create(experiment, params, group_size)
    return ".".join(str(p) for p in caught.value.errors()[0]["loc"])


def test_decisions_takes_no_params_at_all() -> None:
    assert create("decisions", {}).params == {}
    assert refused("decisions", {"endowment": 10}) == "params.endowment"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"payoff_matrix": [[[3, 3], [0, 5]], [[5, 0]]]}, "params.payoff_matrix.1"),
        ({"payoff_matrix": [[[3, 3], [0, "5"]], [[5, 0], [1, 1]]]}, "params.payoff_matrix.0.1.1"),
        ({"payoff_matrix": [[[3, 3], [0, True]], [[5, 0], [1, 1]]]}, "params.payoff_matrix.0.1.1"),
        ({"game": "chicken"}, "params.game"),
        ({"initial_decision": 1.5}, "params.initial_decision"),
        ({"colour": "red"}, "params.colour"),
        ({"game": "stag_hunt", "payoff_matrix": [[[4, 4], [0, 3]], [[3, 0], [3, 3]]]}, "params"),
    ],
)
def test_bimatrix_refuses_bad_params(params: dict[str, Any], field: str) -> None:
    assert refused("bimatrix", params) == field


def test_bimatrix_group_rules() -> None:
    assert refused("bimatrix", {}, group_size=1) == "group_size"
    assert refused("bimatrix", {"game": "matching_pennies"}, group_size=3) == "params.game"
    asymmetric = [[[3, 1], [0, 5]], [[5, 0], [1, 1]]]
    assert create("bimatrix", {"payoff_matrix": asymmetric}, group_size=2)  # fine for 2
    assert refused("bimatrix", {"payoff_matrix": asymmetric}, group_size=4) == (
        "params.payoff_matrix"
    )
    assert create("bimatrix", {"game": "stag_hunt"}, group_size=4)
    assert create("bimatrix", {"game": "matching_pennies"}, group_size=2)


def test_a_named_game_sets_the_payoffs() -> None:
    game = experiments.get("bimatrix")
    roles = {"r": 1, "c": 2}
    # Stag hunt, both hunting stag (action 0) for sure: 4 each.
    assert game.payoffs({"r": 1.0, "c": 1.0}, roles, {"game": "stag_hunt"}) == {"r": 4, "c": 4}
    # Matching pennies: heads / tails, the column player wins.
    assert game.payoffs({"r": 1.0, "c": 0.0}, roles, {"game": "matching_pennies"}) == {
        "r": -1,
        "c": 1,
    }


def test_public_goods_params() -> None:
    assert create("public_goods", {"endowment": 10, "mpcr": 0.5}, group_size=3)
    assert refused("public_goods", {"endowment": 0}) == "params.endowment"
    assert refused("public_goods", {"mpcr": -0.1}) == "params.mpcr"
    assert refused("public_goods", {"mpcr": "0.4"}) == "params.mpcr"
    assert refused("public_goods", {"rounds": 3}) == "params.rounds"
