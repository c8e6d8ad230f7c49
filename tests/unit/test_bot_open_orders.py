"""The zero-intelligence bot under the market's bounds (PROTOCOL v2): it knows its own open
orders from what it sent, the trades that name it and the errors that answer it (`OpenOrders`),
so with a `book` that lists only the best `book_depth` entries it still replaces its order
instead of piling them up past `max_open_orders`; and it never asks above `max_price`."""

from __future__ import annotations

import random
from typing import Any

from services.bots.strategies import OpenOrders, View, make_strategy
from services.common.experiments import DoubleAuction, wrap

AUCTION = wrap(DoubleAuction())  # the registry's wrapper: hooks take the params as a dict too


def test_zi_bots_keep_one_open_order_each_behind_a_one_entry_book() -> None:
    params = {
        "buyer_value": 80,
        "seller_cost": 30,
        "max_open_orders": 2,
        "book_depth": 1,
        "max_price": 60,
    }
    strategy = make_strategy("double_auction", "zi", params, {"high": 120})
    rng = random.Random(4)
    members = tuple(f"m{i}" for i in range(1, 9))
    state: Any = AUCTION.initial_state(params)
    seqs = dict.fromkeys(members, 0)
    known = {code: OpenOrders() for code in members}
    book: dict[str, Any] = AUCTION.hello(state)["book"]
    for turn in range(600):
        code = members[rng.randrange(len(members))]
        id_in_group = members.index(code) + 1
        view = View(code, id_in_group, members, {}, book, dict(known[code].orders))
        for channel, payload in strategy.act(view, rng):
            seqs[code] += 1
            seq = seqs[code]
            known[code].sent(seq, channel, payload)
            if channel == "orders":
                assert payload["price"] <= 60
            outcome = AUCTION.on_input(state, code, id_in_group, seq, channel, payload, params)
            if outcome.problem is not None:
                # Only a cancel of an order that traded meanwhile may be refused.
                assert channel == "cancel", (turn, channel, payload, outcome.problem)
                known[code].refused(seq, "invalid_decision")
                continue
            state = outcome.state
            for name, body in outcome.broadcasts:  # every bot hears every broadcast
                for member in members:
                    buyer = (members.index(member) + 1) % 2 == 1
                    if name == "trade":
                        known[member].traded(body, member)
                    else:
                        known[member].seen_book(body, member, buyer)
                if name == "book":
                    book = body
        for member in members:
            resting = {
                e["seq"]
                for side in ("bids", "asks")
                for e in state[side]
                if e["participant"] == member
            }
            assert len(resting) <= 1, (turn, member, resting)
            assert set(known[member].orders) == resting, (turn, member)
    assert book["bids_total"] + book["asks_total"] > 2, "the book held more than it listed"


def test_open_orders_follow_fills_errors_cancels_and_a_book_seen_after_a_gap() -> None:
    own = OpenOrders()
    own.sent(1, "orders", {"side": "bid", "price": 10, "quantity": 3})
    own.sent(2, "orders", {"side": "bid", "price": 9, "quantity": 1})
    own.sent(3, "orders", {"side": "bid", "price": 8, "quantity": 1})
    own.refused(3, "invalid_decision")
    assert set(own.orders) == {1, 2}
    own.traded({"buyer": "me", "seller": "s", "bid_seq": 1, "ask_seq": 4, "quantity": 2}, "me")
    assert own.orders[1]["quantity"] == 1
    own.traded({"buyer": "x", "seller": "s", "bid_seq": 1, "ask_seq": 5, "quantity": 1}, "me")
    assert own.orders[1]["quantity"] == 1  # someone else's bid 1
    own.sent(4, "cancel", {"seq": 2})
    assert set(own.orders) == {1}
    own.refused(4, "too_many_messages")  # the cancel never applied: the order is open
    assert set(own.orders) == {1, 2}
    # A book listing one best bid (9.5, not ours) of 5: our 10 would be listed, so it is gone;
    # our 9 may be further down.
    listed = [{"participant": "x", "seq": 7, "price": 9.5, "quantity": 1}]
    own.seen_book({"bids": listed, "asks": [], "bids_total": 5, "asks_total": 0}, "me", True)
    assert set(own.orders) == {2}
    # The whole side listed, and ours not in it: none open.
    own.seen_book({"bids": listed, "asks": [], "bids_total": 1, "asks_total": 0}, "me", True)
    assert own.orders == {}
