"""Bot strategies (pure): best responses are best against the experiment's own payoffs, the
zero-intelligence trader's orders stay within its limits and pass the auction's validation,
random walks stay in range, fixed values are sent once; and the link / slot helpers."""

from __future__ import annotations

import random
from typing import Any

import pytest

from services.bots.client import link_key, ws_url
from services.bots.runner import BotsError, open_slots
from services.bots.strategies import (
    StrategyError,
    View,
    bimatrix_best_response,
    make_strategy,
    public_goods_best_response,
)
from services.common.experiments import GAMES, Bimatrix, DoubleAuction, wrap

# An asymmetric game: the row player wants to match, the column player to mismatch
# ([r][c] = [row's, column's]).
ASYMMETRIC: list[list[list[float]]] = [[[4, 1], [0, 3]], [[1, 0], [2, 2]]]
ROLES = {"a": 1, "b": 2}


def _view(code: str, decisions: dict[str, Any], **kw: Any) -> View:
    members = tuple(decisions)
    return View(code=code, id_in_group=members.index(code) + 1, members=members,
                decisions=decisions, **kw)  # fmt: skip


@pytest.mark.parametrize("matrix", [ASYMMETRIC, *GAMES.values()])
@pytest.mark.parametrize("me", ["a", "b"])
def test_bimatrix_best_response_pays_at_least_any_other_mix(
    matrix: list[list[list[float]]], me: str
) -> None:
    bimatrix, params = wrap(Bimatrix()), {"payoff_matrix": matrix}
    other = "b" if me == "a" else "a"
    rng = random.Random(3)
    for q in [0.0, 1.0, 0.5, *(rng.random() for _ in range(20))]:
        best = bimatrix_best_response(matrix, _view(me, {"a": 0.5, "b": 0.5} | {other: q}))
        assert best is not None

        def pay(p: float, q: float = q) -> float:
            return bimatrix.payoffs({me: p, other: q}, ROLES, params)[me]

        assert all(pay(best) >= pay(p / 10) - 1e-12 for p in range(11)), (matrix, me, q, best)


def test_bimatrix_best_response_known_answers() -> None:
    pd = GAMES["prisoners_dilemma"]  # defecting (action 1) is dominant for both
    assert bimatrix_best_response(pd, _view("a", {"a": 1.0, "b": 1.0})) == 0.0
    assert bimatrix_best_response(pd, _view("b", {"a": 0.0, "b": 1.0})) == 0.0
    # Row player matches the column's likelier action; the column player mismatches.
    assert bimatrix_best_response(ASYMMETRIC, _view("a", {"a": 0.5, "b": 0.9})) == 1.0
    assert bimatrix_best_response(ASYMMETRIC, _view("a", {"a": 0.5, "b": 0.1})) == 0.0
    assert bimatrix_best_response(ASYMMETRIC, _view("b", {"a": 0.9, "b": 0.5})) == 0.0
    # Indifference (stag hunt at q = 3/4): keep the current mix.
    stag = GAMES["stag_hunt"]
    assert bimatrix_best_response(stag, _view("a", {"a": 0.3, "b": 0.75}), 0.3) == 0.3
    # Larger groups: the row player against the others' mean mix.
    view = View("a", 1, ("a", "b", "c"), {"a": 0.5, "b": 1.0, "c": 0.0})
    assert bimatrix_best_response(stag, view) == 0.0  # mean 0.5 < 3/4: hunt hare
    assert bimatrix_best_response(stag, View("a", 1, ("a", "b"), {"a": 0.5, "b": None})) is None


def test_best_response_strategy_sends_only_when_its_answer_changes() -> None:
    strategy = make_strategy("bimatrix", "best_response", {"game": "prisoners_dilemma"})
    rng = random.Random(0)
    assert strategy.act(_view("a", {"a": 0.5, "b": 0.5}), rng) == [("decisions", 0.0)]
    assert strategy.act(_view("a", {"a": 0.0, "b": 0.5}), rng) == []


def test_public_goods_best_response_is_the_dominant_contribution() -> None:
    assert public_goods_best_response(20, 0.4, 7.0) == 0.0
    assert public_goods_best_response(20, 1.5, 7.0) == 20
    assert public_goods_best_response(20, 1.0, 7.0) == 7.0
    strategy = make_strategy("public_goods", "best_response", {"endowment": 10, "mpcr": 2})
    assert strategy.act(_view("a", {"a": 0, "b": 0}), random.Random()) == [("decisions", 10.0)]


def test_zi_orders_stay_within_limits_and_pass_the_auctions_validation() -> None:
    auction, params = wrap(DoubleAuction()), {"buyer_value": 80, "seller_cost": 30}
    strategy = make_strategy("double_auction", "zi", params, {"low": 10, "high": 120})
    rng = random.Random(11)
    book = auction.initial_state(params)
    members = ("b1", "s1", "b2", "s2")
    seqs = dict.fromkeys(members, 0)
    prices: dict[str, list[float]] = {"bid": [], "ask": []}
    for turn in range(400):
        code = members[turn % 4]
        view = View(code, members.index(code) + 1, members, {}, book)
        actions = strategy.act(view, rng)
        *cancels, (channel, order) = actions
        assert channel == "orders" and order["quantity"] == 1
        own = {
            e["seq"] for side in ("bids", "asks") for e in book[side] if e["participant"] == code
        }
        assert {p["seq"] for c, p in cancels if c == "cancel"} == own
        assert order["side"] == ("bid" if view.id_in_group % 2 else "ask")
        prices[order["side"]].append(order["price"])
        for channel, payload in actions:
            seqs[code] += 1
            outcome = auction.on_input(
                book, code, view.id_in_group, seqs[code], channel, payload, params
            )
            assert outcome.problem is None, (channel, payload, outcome.problem)
            book = outcome.state
        mine = [e for side in ("bids", "asks") for e in book[side] if e["participant"] == code]
        assert len(mine) <= 1, "a new order replaces the bot's resting one"
    assert all(10 <= p <= 80 for p in prices["bid"]) and all(30 <= p <= 120 for p in prices["ask"])
    # Uniform draws: the whole range is used, not one price.
    assert min(prices["bid"]) < 30 and max(prices["bid"]) > 60
    assert min(prices["ask"]) < 60 and max(prices["ask"]) > 100


def test_zi_defaults_come_from_the_sessions_params() -> None:
    strategy = make_strategy("double_auction", "default", {"buyer_value": 50, "seller_cost": 0})
    rng = random.Random(5)
    bids = [strategy.act(View("b", 1, ("b", "s")), rng)[-1][1]["price"] for _ in range(200)]
    asks = [strategy.act(View("s", 2, ("b", "s")), rng)[-1][1]["price"] for _ in range(200)]
    # A zero cost still asks a positive price (the auction refuses 0).
    assert all(0 < p <= 50 for p in bids) and all(0 < p <= 50 for p in asks)


def test_random_walk_stays_in_range_and_fixed_is_sent_once() -> None:
    rng = random.Random(2)
    walk = make_strategy("public_goods", "random_walk", {"endowment": 10})
    decisions: dict[str, Any] = {"a": 0, "b": 0}
    for _ in range(500):
        [(channel, value)] = walk.act(_view("a", decisions), rng)
        assert channel == "decisions" and 0 <= value <= 10
        decisions["a"] = value
    fixed = make_strategy("bimatrix", "fixed", {}, {"value": 0.25})
    assert fixed.act(_view("a", {"a": 0.5, "b": 0.5}), rng) == [("decisions", 0.25)]
    assert fixed.act(_view("a", {"a": 0.25, "b": 0.5}), rng) == []
    plain = make_strategy("decisions", "random_walk", {}, {"low": -5, "high": 5})
    assert all(-5 <= plain.act(_view("a", {"a": None}), rng)[0][1] <= 5 for _ in range(50))


@pytest.mark.parametrize(
    ("experiment", "name", "params", "options", "complaint"),
    [
        ("bimatrix", "zi", {}, {}, "does not fit"),
        ("double_auction", "random_walk", {}, {}, "does not fit"),
        ("decisions", "best_response", {}, {}, "needs payoffs"),
        ("bimatrix", "nonsense", {}, {}, "unknown strategy"),
        ("bimatrix", "best_response", {"game": "chess"}, {}, "params do not fit"),
        ("decisions", "random_walk", {}, {"low": 3, "high": 1}, "low < high"),
        ("double_auction", "zi", {}, {"value": "a lot"}, "finite number"),
    ],
)
def test_bad_combinations_are_refused_with_a_reason(
    experiment: str, name: str, params: dict[str, Any], options: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(StrategyError, match=complaint):
        make_strategy(experiment, name, params, options)


def test_links_and_open_slots() -> None:
    assert ws_url("http://127.0.0.1:8000/p/abc") == "ws://127.0.0.1:8000/ws/abc"
    assert ws_url("https://lab.example/canopy/p/abc") == "wss://lab.example/canopy/ws/abc"
    assert link_key("https://lab.example/canopy/p/abc") == "abc"
    with pytest.raises(ValueError, match="not a participant link"):
        ws_url("http://127.0.0.1:8000/api/sessions")
    session = {
        "groups": [{"group": "g1"}, {"group": "g2"}],
        "participants": [
            {"code": "d", "group": "g2", "id_in_group": 2, "connected": False},
            {"code": "a", "group": "g1", "id_in_group": 1, "connected": False},
            {"code": "b", "group": "g1", "id_in_group": 2, "connected": True},
            {"code": "c", "group": "g2", "id_in_group": 1, "connected": False},
        ],
    }
    assert [p["code"] for p in open_slots(session)] == ["a", "c", "d"]
    assert [p["code"] for p in open_slots(session, all_but=1)] == ["c", "d"]
    assert [p["code"] for p in open_slots(session, count=1)] == ["a"]
    with pytest.raises(BotsError):
        open_slots(session, count=1, all_but=1)
