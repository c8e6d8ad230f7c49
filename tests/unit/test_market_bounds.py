"""The double auction's bounds (PROTOCOL v2 "Limits" → `double_auction`): `max_open_orders`,
`max_price`, `max_quantity`, a `book` broadcast cut at `book_depth` per side with its totals,
validated params; that random order streams keep every bound and the price-time priority of a
plain reference market; and that an input's cost does not grow with the book."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.common.experiments import DoubleAuction, DoubleAuctionParams, Outcome, wrap
from services.common.group import rebuild
from tests.unit.test_double_auction import B1, B2, S1, S2, market, order, out

AUCTION = wrap(DoubleAuction())  # the registry's wrapper: hooks take the params as a dict too


def test_the_21st_resting_bid_is_refused_and_changes_nothing() -> None:
    rec = market()
    for i in range(20):
        order(rec, B1, "bid", 10 + i)
    assert len(rec.state.market["bids"]) == 20
    before = len(rec.rows)
    seq = order(rec, B1, "bid", 50)
    (error,) = out(rec, before)
    assert error[0] == "error" and error[1]["code"] == "invalid_decision"
    assert error[1]["seq"] == seq
    assert len(rec.state.market["bids"]) == 20
    assert all(e["seq"] != seq for e in rec.state.market["bids"])
    # Another buyer is not held back by B1's orders.
    order(rec, B2, "bid", 5)
    assert rec.rows[-1]["channel"] == "book" and rec.rows[-1]["value"]["bids_total"] == 21


def test_at_the_limit_an_order_that_fills_completely_is_taken_one_that_would_rest_is_not() -> None:
    rec = market(max_open_orders=2)
    order(rec, S1, "ask", 60)
    order(rec, S1, "ask", 61)
    order(rec, S2, "ask", 40, 1)
    # S1 is at its limit: an ask that would rest is refused ...
    before = len(rec.rows)
    order(rec, S1, "ask", 70)
    assert [c for c, _ in out(rec, before)] == ["error"]
    # ... one that trades completely is taken (nothing of it rests).
    order(rec, B1, "bid", 45, 2)  # 1 from S2 at 40, 1 rests at 45
    before = len(rec.rows)
    order(rec, S1, "ask", 44, 1)
    assert [c for c, _ in out(rec, before)] == ["trade", "book"]
    # An order that would partly fill and rest the remainder beyond the limit: refused as a
    # whole, nothing trades.
    order(rec, B2, "bid", 30, 1)
    before = len(rec.rows)
    order(rec, S1, "ask", 30, 2)
    assert [c for c, _ in out(rec, before)] == ["error"]
    assert [(e["participant"], e["price"]) for e in rec.state.market["bids"]] == [(B2, 30.0)]
    assert rec.state.earned[S1] == 45.0  # at the resting bid's price


def test_prices_and_quantities_above_the_params_are_refused() -> None:
    rec = market(max_price=500, max_quantity=10)
    order(rec, S1, "ask", 500.5)
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"
    assert "500" in rec.rows[-1]["value"]["message"]
    order(rec, S1, "ask", 100, 11)
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"
    order(rec, S1, "ask", 500, 10)
    assert rec.rows[-1]["channel"] == "book"
    # The defaults: a million and a thousand.
    rec = market()
    order(rec, S1, "ask", 1_000_001)
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"
    order(rec, S1, "ask", 5, 1001)
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"


def test_book_broadcasts_and_hello_list_book_depth_entries_per_side_with_totals() -> None:
    rec = market(book_depth=3, max_open_orders=10)
    for i in range(7):
        order(rec, B1, "bid", 10 + i)
        order(rec, S1, "ask", 50 + i)
    before = len(rec.rows)
    order(rec, B2, "bid", 13.5)  # in the middle of the bids
    (book,) = [v for c, v in out(rec, before) if c == "book"]
    assert [e["price"] for e in book["bids"]] == [16, 15, 14]
    assert [e["price"] for e in book["asks"]] == [50, 51, 52]
    assert (book["bids_total"], book["asks_total"]) == (8, 7)
    assert rec.state.hello(S2)["book"] == book
    # The state keeps the whole book: B2's bid is there, 5th best.
    assert [e["participant"] for e in rec.state.market["bids"]].index(B2) == 3
    # The default depth is 50.
    rec = market(max_open_orders=100)
    for i in range(60):
        order(rec, B1, "bid", 1 + i)
    book = rec.rows[-1]["value"]
    assert len(book["bids"]) == 50 and book["bids_total"] == 60 and book["bids"][0]["price"] == 60


def test_cancel_of_an_order_beyond_the_depth_and_a_rebuild_of_the_bounded_book() -> None:
    rec = market(book_depth=1, max_open_orders=3)
    first = order(rec, B1, "bid", 10)
    order(rec, B1, "bid", 10)  # same price, later
    order(rec, B2, "bid", 11)
    rec.frame(B1, rec.state.last_seq[B1] + 1, {"seq": first}, channel="cancel")
    book = rec.rows[-1]["value"]
    assert book["bids_total"] == 2 and [e["participant"] for e in book["bids"]] == [B2]
    assert [(e["participant"], e["seq"]) for e in rec.state.market["bids"]] == [(B2, 1), (B1, 2)]
    rebuilt = rebuild(rec.state.config, rec.state.experiment, rec.rows)
    assert rebuilt.market == rec.state.market
    # The count of open orders follows fills and cancels: B1 may rest 3 again.
    order(rec, S1, "ask", 9, 2)  # fills B2's 11 then B1's 10
    for _ in range(3):
        order(rec, B1, "bid", 5)
        assert rec.rows[-1]["channel"] == "book"
    order(rec, B1, "bid", 5)
    assert rec.rows[-1]["value"]["code"] == "invalid_decision"


@pytest.mark.parametrize(
    "params",
    [
        {"max_open_orders": 0},
        {"max_open_orders": 1001},
        {"max_open_orders": None},
        {"max_open_orders": 2.5},
        {"max_open_orders": True},
        {"max_open_orders": "3"},
        {"book_depth": 0},
        {"book_depth": 1001},
        {"book_depth": None},
        {"max_price": 0},
        {"max_price": None},
        {"max_price": 1e13},
        {"max_price": "5"},
        {"max_quantity": 0},
        {"max_quantity": None},
        {"max_quantity": 1.5},
        {"max_quantity": 10**7},
    ],
)
def test_bad_market_params_are_refused(params: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        DoubleAuctionParams.model_validate(params)


def test_market_params_defaults() -> None:
    p = DoubleAuctionParams.model_validate({})
    assert (p.max_open_orders, p.max_price, p.max_quantity, p.book_depth) == (20, 1e6, 1000, 50)
    assert DoubleAuctionParams.model_validate({"max_open_orders": 1, "book_depth": 1000})


class CountingEntry(dict[str, Any]):
    """A book entry that counts how often it is read."""

    reads = 0

    def __getitem__(self, key: str) -> Any:
        CountingEntry.reads += 1
        return super().__getitem__(key)


def test_an_order_into_a_big_book_reads_few_entries() -> None:
    """The insertion point is found by bisection: an order into a book of n resting orders
    reads O(log n) of them, not all (the old linear scan read each)."""
    params = {"max_open_orders": 1000, "book_depth": 5}
    state: Any = AUCTION.initial_state(params)
    members = [f"s{i}" for i in range(20)]
    for i in range(10_000):
        who = members[i % 20]
        outcome = AUCTION.on_input(
            state, who, 2, i + 1, "orders", {"side": "ask", "price": 100 + i % 997, "quantity": 1},
            params,
        )  # fmt: skip
        assert outcome.problem is None
        state = outcome.state
    state["asks"][:] = [CountingEntry(e) for e in state["asks"]]
    CountingEntry.reads = 0
    outcome = AUCTION.on_input(
        state, "s0", 2, 99_999, "orders", {"side": "ask", "price": 600.5, "quantity": 1}, params
    )
    assert outcome.problem is None
    assert CountingEntry.reads < 100, CountingEntry.reads
    state, CountingEntry.reads = outcome.state, 0
    outcome = AUCTION.on_input(state, "s0", 2, 100_000, "cancel", {"seq": 99_999}, params)
    assert outcome.problem is None
    assert CountingEntry.reads < 100, CountingEntry.reads


# -- property tests against a plain reference market ------------------------------------------


class ReferenceMarket:
    """The market as the protocol says it, the plain way: every order kept in one list in
    arrival order; the best resting order found by sorting on (price priority, arrival)."""

    def __init__(self, max_open: int, max_price: float, max_quantity: int) -> None:
        self.max_open, self.max_price, self.max_quantity = max_open, max_price, max_quantity
        self.orders: list[dict[str, Any]] = []  # resting, in arrival order
        self.arrivals = 0

    def side(self, side: str) -> list[dict[str, Any]]:
        sign = -1 if side == "bid" else 1
        rows = [o for o in self.orders if o["side"] == side]
        rows.sort(key=lambda o: (sign * o["price"], o["arrival"]))
        return [{k: o[k] for k in ("participant", "seq", "price", "quantity")} for o in rows]

    def order(
        self, who: str, seq: int, side: str, price: float, quantity: int
    ) -> list[tuple[str, str, float, int]] | None:
        """The trades (buyer, seller, price, quantity), or None if refused."""
        if price > self.max_price or quantity > self.max_quantity:
            return None
        other = "ask" if side == "bid" else "bid"
        sign = -1 if other == "bid" else 1
        crossing = sorted(
            (o for o in self.orders if o["side"] == other and self.crosses(side, price, o)),
            key=lambda o: (sign * o["price"], o["arrival"]),
        )  # fmt: skip
        left = quantity
        plan = []
        for o in crossing:
            if not left:
                break
            fill = min(left, o["quantity"])
            plan.append((o, fill))
            left -= fill
        if left and sum(o["participant"] == who for o in self.orders) >= self.max_open:
            return None
        trades = []
        for o, fill in plan:
            buyer, seller = (who, o["participant"]) if side == "bid" else (o["participant"], who)
            trades.append((buyer, seller, o["price"], fill))
            o["quantity"] -= fill
        self.orders = [o for o in self.orders if o["quantity"] > 0]
        if left:
            self.arrivals += 1
            self.orders.append(
                {"participant": who, "seq": seq, "side": side, "price": price,
                 "quantity": left, "arrival": self.arrivals}
            )  # fmt: skip
        return trades

    @staticmethod
    def crosses(side: str, price: float, resting: dict[str, Any]) -> bool:
        return bool(resting["price"] <= price if side == "bid" else resting["price"] >= price)

    def cancel(self, who: str, seq: int) -> bool:
        for o in self.orders:
            if o["participant"] == who and o["seq"] == seq:
                self.orders.remove(o)
                return True
        return False


MEMBERS = [(B1, 1), (S1, 2), (B2, 3), (S2, 4)]

action = st.one_of(
    st.tuples(
        st.just("order"),
        st.integers(0, 3),
        st.integers(1, 12).map(float),  # few prices: many ties, so time priority matters
        st.integers(1, 4),
    ),
    st.tuples(st.just("cancel"), st.integers(0, 3), st.integers(1, 40), st.just(0)),
)


@settings(max_examples=300, deadline=None)
@given(
    actions=st.lists(action, max_size=60),
    max_open=st.integers(1, 4),
    depth=st.integers(1, 3),
)
def test_random_order_streams_keep_the_bounds_and_price_time_priority(
    actions: list[tuple[str, int, float, int]], max_open: int, depth: int
) -> None:
    params = {"max_open_orders": max_open, "book_depth": depth, "max_price": 10, "max_quantity": 3}
    reference = ReferenceMarket(max_open, 10, 3)
    state: Any = AUCTION.initial_state(params)
    seqs = dict.fromkeys((m for m, _ in MEMBERS), 0)
    for kind, index, price, quantity in actions:
        who, id_in_group = MEMBERS[index]
        seqs[who] += 1
        seq = seqs[who]
        if kind == "order":
            side = "bid" if id_in_group % 2 else "ask"
            payload: Any = {"side": side, "price": price, "quantity": quantity}
            expected = reference.order(who, seq, side, price, quantity)
        else:
            payload = {"seq": int(price)}
            expected = [] if reference.cancel(who, int(price)) else None
        before = copy.deepcopy(state)
        outcome: Outcome = AUCTION.on_input(
            state, who, id_in_group, seq, "orders" if kind == "order" else "cancel", payload,
            params,
        )  # fmt: skip
        assert state == before, "a hook does not change the state it is given"
        state = outcome.state
        if expected is None:
            assert outcome.problem is not None and outcome.broadcasts == []
        else:
            assert outcome.problem is None
            trades = [
                (t["buyer"], t["seller"], t["price"], t["quantity"])
                for c, t in outcome.broadcasts
                if c == "trade"
            ]
            assert trades == expected
            channel, book = outcome.broadcasts[-1]
            assert channel == "book"
            assert len(book["bids"]) <= depth and len(book["asks"]) <= depth
            assert book["bids_total"] == len(state["bids"])
            assert book["asks_total"] == len(state["asks"])
            assert book["bids"] == state["bids"][:depth] and book["asks"] == state["asks"][:depth]
        assert state["bids"] == reference.side("bid")
        assert state["asks"] == reference.side("ask")
        for member, _ in MEMBERS:
            resting = [e for s in ("bids", "asks") for e in state[s] if e["participant"] == member]
            assert len(resting) <= max_open
            assert len(state["open"].get(member, {})) == len(resting)
        hello = AUCTION.hello(state)["book"]
        assert len(hello["bids"]) <= depth and len(hello["asks"]) <= depth
