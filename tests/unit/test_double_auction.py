"""The continuous double auction (PROTOCOL v1.1): price-time priority, partial fills,
cancels, trade then book broadcasts, trade payoffs; and that a rebuild re-makes the book."""

from __future__ import annotations

from typing import Any

import pytest

from services.common.directory import GroupConfig
from services.common.group import rebuild
from tests.unit.test_decisions_rebuild import Recorder

B1, S1, B2, S2 = "b1", "s1", "b2", "s2"  # odd id_in_group buy, even sell


def market(**params: Any) -> Recorder:
    rec = Recorder(
        GroupConfig(
            session="s",
            group="g",
            experiment="double_auction",
            members=[B1, S1, B2, S2],
            num_periods=2,
            period_length=60.0,
            num_subperiods=0,
            rate_limit=0.0,
            params=params,
        )
    )
    for code in rec.state.config.members:
        rec.presence(code, f"{code}-c", True)
    rec.tick("period_start")
    return rec


def order(rec: Recorder, who: str, side: str, price: float, quantity: int = 1) -> int:
    seq = rec.state.last_seq[who] + 1
    rec.frame(who, seq, {"side": side, "price": price, "quantity": quantity}, channel="orders")
    return seq


def out(rec: Recorder, since: int) -> list[tuple[str, Any]]:
    return [(r["channel"], r["value"]) for r in rec.rows[since:] if r["direction"] == "out"]


def test_price_time_priority_partial_fills_at_the_resting_price() -> None:
    rec = market()
    order(rec, S1, "ask", 60, 2)
    order(rec, S2, "ask", 55, 1)
    order(rec, S1, "ask", 55, 1)  # same price as S2's, later
    start = len(rec.rows)
    seq = order(rec, B1, "bid", 58, 3)
    trades = [v for c, v in out(rec, start) if c == "trade"]
    assert [(t["seller"], t["price"], t["quantity"]) for t in trades] == [(S2, 55, 1), (S1, 55, 1)]
    assert trades[0] == {
        "price": 55,
        "quantity": 1,
        "buyer": B1,
        "seller": S2,
        "bid_seq": seq,
        "ask_seq": 1,
    }
    (book,) = [v for c, v in out(rec, start) if c == "book"]
    assert out(rec, start)[-1][0] == "book"  # the book after the trades
    # 1 unit of the bid rests (58 does not reach 60).
    assert book["bids"] == [{"participant": B1, "seq": seq, "price": 58.0, "quantity": 1}]
    assert book["asks"] == [{"participant": S1, "seq": 1, "price": 60.0, "quantity": 2}]
    assert rec.state.earned == {B1: (100 - 55) * 2, S2: 55, S1: 55}


def test_wrong_side_bad_orders_and_cancels_are_invalid_and_change_nothing() -> None:
    rec = market()
    order(rec, B1, "ask", 50)  # a buyer may only bid
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"
    rec.frame(S1, 1, {"side": "ask", "price": -1, "quantity": 1}, channel="orders")
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"
    rec.frame(S1, 2, {"side": "ask", "price": 5, "quantity": 1.5}, channel="orders")
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"
    seq = order(rec, S1, "ask", 70)
    rec.frame(S2, 1, {"seq": seq}, channel="cancel")  # not S2's order
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"
    assert rec.state.market["asks"][0]["seq"] == seq
    rec.frame(S1, seq + 1, {"seq": seq}, channel="cancel")
    assert rec.rows[-1]["channel"] == "book" and rec.rows[-1]["value"]["asks"] == []
    rec.frame(S1, seq + 2, {"seq": seq}, channel="cancel")  # gone already
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"


def test_payoffs_are_the_trades_and_the_book_empties_at_period_end() -> None:
    rec = market(buyer_value=80, seller_cost=10)
    order(rec, S1, "ask", 30, 2)
    order(rec, B1, "bid", 35, 2)
    rec.tick("period_end")
    end = rec.rows[-1]["value"]
    assert end["payoffs"] == {B1: (80 - 30) * 2, S1: (30 - 10) * 2, B2: 0.0, S2: 0.0}
    assert end["group_decisions"] == dict.fromkeys([B1, S1, B2, S2])
    assert rec.state.hello(B1)["book"] == {"bids": [], "asks": [], "bids_total": 0, "asks_total": 0}
    rec.frame(B1, 9, {"side": "bid", "price": 10, "quantity": 1}, channel="orders")
    assert rec.rows[-1]["value"]["code"] == "period_not_running"


def test_a_rebuild_remakes_the_book_and_the_earnings() -> None:
    rec = market()
    order(rec, S1, "ask", 40, 3)
    order(rec, S2, "ask", 42, 1)
    order(rec, B1, "bid", 41, 2)
    order(rec, B2, "bid", 39, 1)
    rebuilt = rebuild(rec.state.config, rec.state.experiment, rec.rows)
    assert rebuilt.market == rec.state.market
    assert rebuilt.earned == rec.state.earned
    assert rebuilt.hello(B2)["book"] == rec.state.hello(B2)["book"]


def test_decisions_are_not_taken() -> None:
    rec = market()
    rec.frame(B1, 1, 0.5)
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"


@pytest.mark.parametrize("size", [1])
def test_a_market_needs_two(size: int) -> None:
    from services.store.domain import CreateSession

    with pytest.raises(ValueError, match="buyer and a seller"):
        CreateSession(
            experiment="double_auction",
            num_participants=2,
            group_size=size,
            period_length=5,
        )
