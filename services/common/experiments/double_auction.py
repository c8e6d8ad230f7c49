"""The built-in `double_auction` experiment: a continuous double auction with channels of its
own (`orders`, `cancel`), a plug-in on `api` (the `OwnChannels` hooks and `event_payoffs`)."""

from __future__ import annotations

import bisect
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from services.common.experiments.api import Base, Number, Outcome


class DoubleAuctionParams(BaseModel):
    """The market's params (PROTOCOL v2 "Limits"): what one trader may put in the book, and
    how much of it each `book` broadcast shows."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    buyer_value: Annotated[Number, Field(gt=0, le=1e9)] = 100.0
    seller_cost: Annotated[Number, Field(ge=0, le=1e9)] = 0.0
    # Open (resting) orders one participant may have at once.
    max_open_orders: Annotated[int, Field(strict=True, ge=1, le=1_000)] = 20
    # Prices and quantities above these are refused (they bound payoffs and row sizes too).
    max_price: Annotated[Number, Field(gt=0, le=1e12)] = 1_000_000.0
    max_quantity: Annotated[int, Field(strict=True, ge=1, le=1_000_000)] = 1_000
    # Entries per side that `book` broadcasts and `hello.book` list (best first).
    book_depth: Annotated[int, Field(strict=True, ge=1, le=1_000)] = 50


class Order(BaseModel):
    """Channel `orders`: `{"side": "bid" | "ask", "price": number > 0, "quantity": int ≥ 1}`."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    side: Literal["bid", "ask"]
    price: Annotated[Number, Field(gt=0, le=1e12)]
    quantity: Annotated[int, Field(ge=1, le=1_000_000)]


class Cancel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    seq: Annotated[int, Field(ge=1)]


# The book's sort keys: best first, so a bisect to the right of equal prices puts a new order
# after the earlier ones at its price (time priority) without a scan.
_SORT_KEY = {"bids": lambda e: -e["price"], "asks": lambda e: e["price"]}


def _sort_key(side: str, price: float) -> float:
    return -price if side == "bids" else price


class DoubleAuction(Base[DoubleAuctionParams]):
    """A continuous double auction (PROTOCOL v1.1, bounded as v2 says): odd members buy, even
    members sell.

    Price-time priority: an incoming order trades against the best resting orders that cross
    it, at the resting order's price, with partial fills; what is left rests in the book. A
    buyer earns `buyer_value − price` per unit, a seller `price − seller_cost`. The book is the
    experiment's state, emptied at each period's start and end: `{"bids", "asks"}` (best first,
    earlier first at equal prices, each entry `{"participant", "seq", "price", "quantity"}`),
    `"open"` (participant → their resting orders, `str(seq)` → `[side, price]`) and
    `"book_depth"`; plain JSON values. Pure and deterministic: the same inputs give the same
    book, so a rebuild and the replay agree with the live market.

    Bounds (params): an order above `max_price` or `max_quantity` is refused, and so is an order
    that would rest while its sender already has `max_open_orders` resting. That check is made
    before anything trades, and refuses the order as a whole: an order that would partly fill
    and rest the rest beyond the limit trades nothing (predictable for the trader, and an order
    that fills completely is still taken at the limit, since nothing of it rests). A `book`
    broadcast (and `hello.book`) lists at most `book_depth` entries per side, with
    `bids_total` and `asks_total`; the state keeps the whole book.

    Cost per input: O(log n + fills) comparisons (a bisect for the insertion point, the count of
    a trader's open orders and the price of each kept in `open`), plus O(book_depth) for the
    broadcast; the state it is given is not changed (hooks must not, see `Experiment`): the new
    one shares what the input left alone and holds shallow copies of what it touched (the side
    lists, a C-level copy of pointers, and the `open` maps of the traders involved). Entries
    are never changed in place (a partial fill replaces its entry), so a broadcast that lists
    one stays what it was when it was made.
    """

    name = "double_auction"
    channels = frozenset({"orders", "cancel"})
    params_model = DoubleAuctionParams
    event_payoffs = True  # payoffs are the sums of trades' gains, not flow averages

    def check_group(self, params: DoubleAuctionParams, group_size: int) -> tuple[str, str] | None:
        if group_size < 2:
            return "group_size", "a market needs at least a buyer and a seller"
        return None

    def initial_decision(self, id_in_group: int, params: DoubleAuctionParams) -> Any:
        return None

    def validate(self, decision: Any, params: DoubleAuctionParams) -> str | None:
        return "a double auction takes orders and cancels, not decisions"

    def payoffs(
        self,
        decisions: Mapping[str, Any],
        roles: Mapping[str, int],
        params: DoubleAuctionParams,
    ) -> dict[str, float]:
        return dict.fromkeys(decisions, 0.0)  # no flow payoffs: see `earned` in on_input

    def initial_state(self, params: DoubleAuctionParams) -> dict[str, Any]:
        return {"bids": [], "asks": [], "open": {}, "book_depth": params.book_depth}

    def hello(self, state: Any) -> dict[str, Any]:
        return {
            "book": book_view(
                state if state is not None else self.initial_state(DoubleAuctionParams())
            )
        }

    def on_input(
        self,
        state: Any,
        participant: str,
        id_in_group: int,
        seq: int,
        channel: str,
        payload: Any,
        params: DoubleAuctionParams,
    ) -> Outcome:
        book = state if state is not None else self.initial_state(params)
        if channel == "cancel":
            return self._cancel(book, participant, payload)
        try:
            order = Order.model_validate(payload)
        except ValueError:
            return Outcome(book, problem="an order is {side: bid|ask, price > 0, quantity ≥ 1}")
        buyer = id_in_group % 2 == 1
        if (order.side == "bid") != buyer:
            return Outcome(
                book, problem=f"{'buyers' if buyer else 'sellers'} only {'bid' if buyer else 'ask'}"
            )
        p = params
        if order.price > p.max_price:
            return Outcome(book, problem=f"the price may be at most {p.max_price:g}")
        if order.quantity > p.max_quantity:
            return Outcome(book, problem=f"the quantity may be at most {p.max_quantity}")
        side = "bids" if order.side == "bid" else "asks"
        resting, opposite = book[side], book["asks" if side == "bids" else "bids"]
        # Plan the fills without changing anything: the limit may refuse the whole order.
        left, fills = order.quantity, []
        for best in opposite:
            if not left or not _crosses(order.side, order.price, best["price"]):
                break
            fill = min(left, best["quantity"])
            fills.append((best, fill))
            left -= fill
        mine = book["open"].get(participant, {})
        if left and len(mine) >= p.max_open_orders:
            return Outcome(
                book,
                problem=f"at most {p.max_open_orders} open orders each: cancel one first",
            )
        # A new state that shares what this order leaves alone (see the class's docstring).
        other = "asks" if side == "bids" else "bids"
        new = {**book, "open": dict(book["open"])}
        if fills:
            new[other] = opposite = list(opposite)
        trades: list[dict[str, Any]] = []
        earned: dict[str, float] = {}
        gone = 0  # resting orders filled completely: the first `gone` of `opposite`
        for best, fill in fills:
            price = best["price"]
            if order.side == "bid":
                buyer_code, seller_code = participant, best["participant"]
                bid_seq, ask_seq = seq, best["seq"]
            else:
                buyer_code, seller_code = best["participant"], participant
                bid_seq, ask_seq = best["seq"], seq
            trades.append(
                {
                    "price": price,
                    "quantity": fill,
                    "buyer": buyer_code,
                    "seller": seller_code,
                    "bid_seq": bid_seq,
                    "ask_seq": ask_seq,
                }
            )
            earned[buyer_code] = earned.get(buyer_code, 0.0) + (p.buyer_value - price) * fill
            earned[seller_code] = earned.get(seller_code, 0.0) + (price - p.seller_cost) * fill
            if fill == best["quantity"]:
                gone += 1
                _forget(new["open"], best["participant"], best["seq"])
            else:  # only the last fill can be partial: a new entry, see the class's docstring
                opposite[gone] = {**best, "quantity": best["quantity"] - fill}
        del opposite[:gone]
        if left:
            entry = {"participant": participant, "seq": seq, "price": order.price, "quantity": left}
            new[side] = resting = list(resting)
            at = bisect.bisect_right(resting, _sort_key(side, order.price), key=_SORT_KEY[side])
            resting.insert(at, entry)
            new["open"][participant] = {**mine, str(seq): [side, order.price]}
        broadcasts = [("trade", t) for t in trades] + [("book", book_view(new))]
        return Outcome(new, broadcasts, earned=earned)

    def _cancel(self, book: dict[str, Any], participant: str, payload: Any) -> Outcome:
        try:
            target = Cancel.model_validate(payload).seq
        except ValueError:
            return Outcome(book, problem="a cancel is {seq: the seq of one's own open order}")
        mine = book["open"].get(participant, {})
        where = mine.get(str(target))
        if where is None:
            return Outcome(book, problem=f"no open order {target} of yours")
        side, price = where
        entries, key = book[side], _SORT_KEY[side]
        # Only the orders at its price need looking at.
        low = bisect.bisect_left(entries, _sort_key(side, price), key=key)
        high = bisect.bisect_right(entries, _sort_key(side, price), lo=low, key=key)
        at = next(
            i
            for i in range(low, high)
            if entries[i]["participant"] == participant and entries[i]["seq"] == target
        )
        new = {**book, side: entries[:at] + entries[at + 1 :], "open": dict(book["open"])}
        _forget(new["open"], participant, target)
        return Outcome(new, [("book", book_view(new))])


def _forget(opened: dict[str, Any], participant: str, seq: int) -> None:
    """Drop one order from `opened` (a copy of the book's `open`, whose inner maps may still
    be the old state's: they are replaced, never changed)."""
    mine = {k: v for k, v in opened[participant].items() if k != str(seq)}
    if mine:
        opened[participant] = mine
    else:
        del opened[participant]


def book_view(book: Mapping[str, Any]) -> dict[str, Any]:
    """What a `book` broadcast and `hello.book` show: the best `book_depth` entries per side
    and the number of open orders per side."""
    depth = int(book.get("book_depth", DoubleAuctionParams().book_depth))
    bids, asks = book["bids"], book["asks"]
    return {
        "bids": bids[:depth],
        "asks": asks[:depth],
        "bids_total": len(bids),
        "asks_total": len(asks),
    }


def _crosses(side: str, price: float, resting_price: float) -> bool:
    return resting_price <= price if side == "bid" else resting_price >= price
