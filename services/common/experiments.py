"""Experiments: the per-experiment hooks the decisions service calls (pure functions, no I/O).

An experiment says which inbound channels it accepts, its `params` (a pydantic model: a session
with bad params is refused with 422 when it is created), what a group must be like
(`check_group`), a member's initial decision, whether a decision is valid, and the payoffs of a
set of group decisions (oTree / otree_redwood's `initial_decision`, validation and payoff
functions). Register new ones with `register()`.

Plug-ins are loaded once per process, on first use (the services ask at start, `load()`): each
is logged with where it came from, and one that fails to load is logged with its error and
left out, the others still served. A params model names the field of a check across fields
with `params_error` (the 422's `field`). docs/experiments.md is the contract, written out.

An experiment may declare what a decision is (`decision`, a `services.common.decision.Decision`
or a hook of the params giving one): the generic page, the bots and the check of inputs of an
experiment without `validate` are built from it (`declared`, `check_input`, `shown_values`).
"""

from __future__ import annotations

import bisect
import importlib
import logging
import math
import os
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from importlib.metadata import entry_points
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from services.common.decision import Decision, Mix, Shown
from services.common.decision import Number as NumberInput

log = logging.getLogger(__name__)


class Experiment(Protocol):
    """The hooks of one experiment. Pure and deterministic: no I/O, no clock, no randomness,
    and no change to their arguments (they are the group's state).

    Every hook gets `params` as the `params_model` validated and dumped them (defaults filled
    in), never the raw request. A hook that raises (or returns what its contract does not
    allow, such as a non-finite payoff) changes nothing: on a participant's input the input is
    still logged and answered with an `experiment_error` error, the group's state staying as it
    was; on a tick or a connection the hook's result counts as empty (see
    `services.common.group`).

    Optional, looked up with getattr: `description` (text for `GET /api/experiments` and the
    console; else the class docstring), `page` (its participant page, docs/pages.md),
    `decision` (a `Decision`, or `decision(params) -> Decision | None`: what a decision is, for
    the generic page, the bots and the check of inputs), `shown(decisions, roles, params)`
    (the values its `decision.shows` names, live on the generic page), `on_input` /
    `initial_state` / `hello` / `event_payoffs` (channels of its own, see `DoubleAuction`).
    `validate` may be left out when `decision` is declared: inputs are then checked against the
    declaration. docs/experiments.md writes the contract out."""

    @property
    def name(self) -> str: ...

    @property
    def channels(self) -> frozenset[str]:
        """Inbound channels participants may send on."""

    @property
    def params_model(self) -> type[BaseModel]:
        """The session's `params`: unknown keys and bad values are refused (422)."""

    def check_group(self, params: BaseModel, group_size: int) -> tuple[str, str] | None:
        """(field, message) if a group of `group_size` cannot play with these params. The one
        hook that gets the validated `params_model` instance, not the dumped dict."""

    def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
        """A member's decision before it sends one (plain JSON); raises: `None`."""

    def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
        """None if the decision is acceptable, else a message for `invalid_decision`."""

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        """Flow payoffs, code → finite number; raises on a tick: no payoffs (`{}`)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> Any:
    """A JSON number (int or float, finite); "3" and true are not numbers."""
    if not _is_number(value):
        raise ValueError("must be a finite number")
    return float(value)


Number = Annotated[float, BeforeValidator(_number)]


class NoParams(BaseModel):
    """An experiment without params: any key is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


GAMES: dict[str, list[list[list[float]]]] = {
    "prisoners_dilemma": [[[3, 3], [0, 5]], [[5, 0], [1, 1]]],
    "stag_hunt": [[[4, 4], [0, 3]], [[3, 0], [3, 3]]],
    "hawk_dove": [[[0, 0], [3, 1]], [[1, 3], [2, 2]]],
    "matching_pennies": [[[1, -1], [-1, 1]], [[-1, 1], [1, -1]]],
}


def _not_nullable(schema: dict[str, Any]) -> None:
    """The JSON schema of a field whose `None` only means "not given" (see `_not_null`): no
    null among its types, and no default to show."""
    schema.pop("default", None)
    branches = [b for b in schema.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        schema.update(branches[0])
    elif branches:
        schema["anyOf"] = branches


def _not_null(value: Any) -> Any:
    """`null` is not a value of these params: leave the key out to get its default."""
    if value is None:
        raise ValueError("must not be null (leave it out for the default)")
    return value


# Bounds that keep every flow payoff, and so every period's integral, finite (PROTOCOL v2).
MAX_PAYOFF_ENTRY = 1e9
PayoffEntry = Annotated[Number, Field(ge=-MAX_PAYOFF_ENTRY, le=MAX_PAYOFF_ENTRY)]
PayoffMatrix = Annotated[
    list[
        Annotated[
            list[Annotated[list[PayoffEntry], Field(min_length=2, max_length=2)]],
            Field(min_length=2, max_length=2),
        ]
    ],
    Field(min_length=2, max_length=2),
]
GameName = Literal["prisoners_dilemma", "stag_hunt", "hawk_dove", "matching_pennies"]
DEFAULT_GAME = "prisoners_dilemma"


class BimatrixParams(BaseModel):
    """`payoff_matrix[r][c] = [row player's, column player's]` (entries within ±1e9), or a
    named `game`; not both. Neither: `game` is `prisoners_dilemma`.

    Neither key takes `null` (its schema has no null): absence means the default. The dump
    (what the store keeps and the hooks get) names the one that was chosen, so validating a
    dump again gives the same params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # `None` only inside the model, meaning "the other one was chosen"; refused as input.
    payoff_matrix: Annotated[PayoffMatrix | None, BeforeValidator(_not_null)] = Field(
        default=None, json_schema_extra=_not_nullable
    )
    game: Annotated[GameName | None, BeforeValidator(_not_null)] = Field(
        default=None, json_schema_extra=_not_nullable
    )
    initial_decision: Annotated[Number, Field(ge=0, le=1)] = 0.5

    @model_validator(mode="before")
    @classmethod
    def _default_game(cls, data: Any) -> Any:
        if isinstance(data, dict) and "payoff_matrix" not in data and "game" not in data:
            return {**data, "game": DEFAULT_GAME}
        return data

    @model_validator(mode="after")
    def _one_game(self) -> BimatrixParams:
        if self.payoff_matrix is not None and self.game is not None:
            raise ValueError("give either payoff_matrix or game, not both")
        return self

    @model_serializer(mode="wrap")
    def _chosen_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        return {k: v for k, v in dumped.items() if v is not None}

    def matrix(self) -> list[list[list[float]]]:
        if self.payoff_matrix is not None:
            return self.payoff_matrix
        return GAMES[self.game or DEFAULT_GAME]


# The two actions of each named game, first action first (as the bimatrix page names them).
ACTION_NAMES: dict[str, list[str]] = {
    "prisoners_dilemma": ["Cooperate", "Defect"],
    "stag_hunt": ["Stag", "Hare"],
    "hawk_dove": ["Hawk", "Dove"],
    "matching_pennies": ["Heads", "Tails"],
}


def _matrix(params: Mapping[str, Any]) -> Any:
    if "payoff_matrix" in params:
        return params["payoff_matrix"]
    return GAMES[str(params.get("game", "prisoners_dilemma"))]


class PublicGoodsParams(BaseModel):
    """Bounded so that payoffs stay finite: |u_i| ≤ endowment · (1 + mpcr · group_size)
    ≤ 1e9 · (1 + 1e3 · 1e3) ≈ 1e15."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endowment: Annotated[Number, Field(gt=0, le=1e9)] = 20.0
    mpcr: Annotated[Number, Field(ge=0, le=1e3)] = 0.4


@dataclass(frozen=True)
class PlainDecisions:
    """Relays numbers: every member's decision is any finite number; no payoffs."""

    name: str = "decisions"
    channels: frozenset[str] = field(default_factory=lambda: frozenset({"decisions"}))
    params_model: type[BaseModel] = NoParams

    def check_group(self, params: BaseModel, group_size: int) -> tuple[str, str] | None:
        return None

    def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
        return None

    def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
        return None if _is_number(decision) else "a decision must be a finite number"

    def decision(self, params: Mapping[str, Any]) -> Decision:
        """What its page offers (and bots play): a number from 0 to 1. The relay itself takes
        any finite number (its own `validate`)."""
        return Decision(
            input=NumberInput(min=0, max=1, step=0.01, label="Your decision, from 0 to 1"),
            instructions="Move the slider to choose a number between 0 and 1. You can change "
            "it at any time while the period is running.",
        )

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        return {}


@dataclass(frozen=True)
class Bimatrix:
    """Continuous-time 2×2 game: a decision is the probability of playing the first action.

    Payoffs (`params.payoff_matrix`, default a prisoner's dilemma [[[3,3],[0,5]],[[5,0],[1,1]]])
    are the expected flow payoffs of each player against the mean of the other members' mixes.
    """

    name: str = "bimatrix"
    channels: frozenset[str] = field(default_factory=lambda: frozenset({"decisions"}))
    params_model: type[BaseModel] = BimatrixParams

    def check_group(self, params: BaseModel, group_size: int) -> tuple[str, str] | None:
        assert isinstance(params, BimatrixParams)
        if group_size < 2:
            return "group_size", "bimatrix needs groups of at least 2"
        if params.game == "matching_pennies" and group_size != 2:
            return "params.game", "matching_pennies is for groups of 2 only"
        matrix = params.matrix()
        symmetric = all(matrix[r][c][0] == matrix[c][r][1] for r in range(2) for c in range(2))
        if group_size > 2 and not symmetric:
            field = "params.payoff_matrix" if params.payoff_matrix is not None else "params.game"
            return field, (
                "groups larger than 2 need a symmetric game "
                "(payoff_matrix[r][c][0] == payoff_matrix[c][r][1])"
            )
        return None

    def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
        value = params.get("initial_decision", 0.5)
        return float(value) if _is_number(value) else 0.5

    def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
        if _is_number(decision) and 0.0 <= decision <= 1.0:
            return None
        return "a bimatrix decision must be a number in [0, 1]"

    def decision(self, params: Mapping[str, Any]) -> Decision:
        """A mix of the two actions, sent as the probability of the first (named for the
        named games, as its page names them)."""
        actions = ACTION_NAMES.get(str(params.get("game")), ["A", "B"])
        if "game" not in params and params.get("payoff_matrix") == GAMES[DEFAULT_GAME]:
            actions = ACTION_NAMES[DEFAULT_GAME]
        return Decision(
            input=Mix(actions=actions, form="first", label=f"How often you play {actions[0]}"),
            instructions=f"Choose how likely you are to play {actions[0]} rather than "
            f"{actions[1]}. Your payoff each moment is what that mix earns on average against "
            "the others' mixes. You can change it at any time while the period is running.",
        )

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        """Expected flow payoffs. Two members: member 1 is the row player, member 2 the column
        player (`matrix[r][c] = [row's, column's]`). More: each plays as the row player against
        the mean mix of the others (the matrix is symmetric then)."""
        matrix = _matrix(params)
        if len(decisions) == 2 and sorted(roles.get(c, 0) for c in decisions) == [1, 2]:
            row, column = sorted(decisions, key=lambda c: roles[c])
            if not (_is_number(decisions[row]) and _is_number(decisions[column])):
                return dict.fromkeys(decisions, 0.0)
            p, q = float(decisions[row]), float(decisions[column])
            return {row: _expected(matrix, p, q, 0), column: _expected(matrix, p, q, 1)}
        # O(N): the others' total is everyone's total less one's own (not a list per member,
        # which made every input O(N²)); the mean is clamped to [0, 1] against rounding.
        mixes = {code: float(v) for code, v in decisions.items() if _is_number(v)}
        total, count = sum(mixes.values()), len(mixes)
        result: dict[str, float] = {}
        for me in decisions:
            mine = mixes.get(me)
            if mine is None or count < 2:
                result[me] = 0.0
                continue
            q = min(1.0, max(0.0, (total - mine) / (count - 1)))
            result[me] = _expected(matrix, mine, q, 0)
        return result


def _expected(matrix: Any, p: float, q: float, player: int) -> float:
    """The expected payoff of `player` (0 row, 1 column) when the row player plays action 0
    with probability p and the column player with probability q."""
    return float(
        p * q * matrix[0][0][player]
        + p * (1 - q) * matrix[0][1][player]
        + (1 - p) * q * matrix[1][0][player]
        + (1 - p) * (1 - q) * matrix[1][1][player]
    )


@dataclass(frozen=True)
class PublicGoods:
    """Continuous public goods game: a decision is a contribution in [0, endowment], initial 0;
    `u_i = endowment − c_i + mpcr · Σ_j c_j` (`params.endowment` 20, `params.mpcr` 0.4)."""

    name: str = "public_goods"
    channels: frozenset[str] = field(default_factory=lambda: frozenset({"decisions"}))
    params_model: type[BaseModel] = PublicGoodsParams

    def check_group(self, params: BaseModel, group_size: int) -> tuple[str, str] | None:
        return None

    def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
        return 0

    def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
        endowment = float(params.get("endowment", 20))
        if _is_number(decision) and 0 <= decision <= endowment:
            return None
        return f"a contribution must be a number in [0, {endowment:g}]"

    def decision(self, params: Mapping[str, Any]) -> Decision:
        """A contribution from 0 to the endowment, in steps of about 1/100 of it (the page's
        slider; `validate` takes any number in the range)."""
        endowment = float(params.get("endowment", 20))
        mpcr = float(params.get("mpcr", 0.4))
        return Decision(
            input=NumberInput(
                min=0,
                max=endowment,
                step=10 ** (math.floor(math.log10(endowment)) - 2),
                unit="points",
                label=f"Your contribution to the group account, from 0 to {endowment:g}",
            ),
            instructions=f"You have {endowment:g} points. What you put in the group account "
            f"is multiplied by {mpcr:g} and paid to every member; what you keep is yours. You "
            "can change your contribution at any time while the period is running.",
            shows=[
                Shown(name="total", label="Group total", unit="points"),
                Shown(name="kept", label="You keep", unit="points"),
            ],
        )

    def shown(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, Any]:
        endowment = float(params.get("endowment", 20))
        given = {c: float(v) if _is_number(v) else 0.0 for c, v in decisions.items()}
        return {
            "total": sum(given.values()),
            "kept": {code: endowment - c for code, c in given.items()},
        }

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        endowment = float(params.get("endowment", 20))
        mpcr = float(params.get("mpcr", 0.4))
        given = {c: float(v) if _is_number(v) else 0.0 for c, v in decisions.items()}
        pot = mpcr * sum(given.values())
        return {code: endowment - c + pot for code, c in given.items()}


@dataclass(frozen=True)
class Outcome:
    """What an experiment's own channel made of one input (`on_input`).

    `state`: the experiment's state after it; `broadcasts`: (channel, payload) for the whole
    group, in order; `problem`: the message of an `invalid_decision` (state unchanged);
    `earned`: payoff events (code → amount) that this input caused."""

    state: Any
    broadcasts: list[tuple[str, Any]] = field(default_factory=list)
    problem: str | None = None
    earned: dict[str, float] = field(default_factory=dict)


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


@dataclass(frozen=True)
class DoubleAuction:
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

    name: str = "double_auction"
    channels: frozenset[str] = field(default_factory=lambda: frozenset({"orders", "cancel"}))
    params_model: type[BaseModel] = DoubleAuctionParams
    event_payoffs: bool = True  # payoffs are the sums of trades' gains, not flow averages

    def check_group(self, params: BaseModel, group_size: int) -> tuple[str, str] | None:
        if group_size < 2:
            return "group_size", "a market needs at least a buyer and a seller"
        return None

    def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
        return None

    def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
        return "a double auction takes orders and cancels, not decisions"

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        return dict.fromkeys(decisions, 0.0)  # no flow payoffs: see `earned` in on_input

    def initial_state(self, params: Mapping[str, Any]) -> dict[str, Any]:
        depth = DoubleAuctionParams.model_validate(params).book_depth
        return {"bids": [], "asks": [], "open": {}, "book_depth": depth}

    def hello(self, state: Any) -> dict[str, Any]:
        return {"book": book_view(state if state is not None else self.initial_state({}))}

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
        p = DoubleAuctionParams.model_validate(params)
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


_REGISTRY: dict[str, Experiment] = {}
_SOURCES: dict[str, str] = {}  # name → where it came from ("built-in", "entry point …", …)
_FAILURES: dict[str, str] = {}  # plug-in spec → why it is not registered
_plugins_loaded = False
_loading_from: str | None = None  # the plug-in being loaded, for its own register() calls
ENTRY_POINT_GROUP = "canopy.experiments"
# What every experiment has (the `Experiment` protocol); the rest is optional (getattr), and
# `validate` may be left out by an experiment that declares its `decision`.
REQUIRED = (
    "name",
    "channels",
    "params_model",
    "check_group",
    "initial_decision",
    "validate",
    "payoffs",
)
MODULES_ENV = "CANOPY_EXPERIMENT_MODULES"


class PluginError(RuntimeError):
    """A plug-in experiment could not be loaded (the message says which and why)."""


def params_error(field: str, message: str, value: Any = None) -> ValidationError:
    """The error a params model raises to refuse a value at one of its fields, for a check
    that pydantic cannot pin to a field itself (one across fields, in a `model_validator`):
    `raise params_error("cost", "cost must be below a", self.cost)` is answered by
    `POST /api/sessions` with a 422 whose `field` is `params.cost` (a plain `ValueError`
    there would name just `params`). `field` is dotted for nested values ("matrix.0.1")."""
    loc = tuple(int(part) if part.isdigit() else part for part in field.split("."))
    return ValidationError.from_exception_data(
        "params",
        [InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=value)],
    )


def declared(experiment: Experiment, params: Mapping[str, Any]) -> Decision | None:
    """What `experiment` declares a decision to be for these params (its `decision`
    attribute, or the hook's answer), None when it declares nothing. Raises when the hook
    raises or gives something else than a `Decision` (or its JSON)."""
    found = getattr(experiment, "decision", None)
    if callable(found):
        found = found(params)
    if found is None or isinstance(found, Decision):
        return found
    if isinstance(found, Mapping):
        return Decision.model_validate(found)
    raise TypeError(f"decision is {type(found).__name__}, not a Decision")


def declared_json(experiment: Experiment, params: Mapping[str, Any]) -> dict[str, Any] | None:
    """The declaration as the page and `GET /api/experiments` get it; None when there is none
    or the hook failed (logged: the generic page then falls back to a text box)."""
    try:
        decision = declared(experiment, params)
    except Exception as exc:
        log.error("experiment %r: its decision hook failed: %r", experiment.name, exc, exc_info=exc)
        return None
    return None if decision is None else decision.model_dump(mode="json")


def check_input(experiment: Experiment, decision: Any, params: Mapping[str, Any]) -> str | None:
    """Whether an input on `decisions` is acceptable: the experiment's own `validate` when it
    has one (it knows best), else its declared decision's check; an experiment with neither
    takes any JSON value. None if acceptable, else the message of `invalid_decision`. Raises
    what the hooks raise (the caller answers `experiment_error`)."""
    validate = getattr(experiment, "validate", None)
    if validate is not None:
        problem: str | None = validate(decision, params)
        return problem
    declaration = declared(experiment, params)
    return None if declaration is None else declaration.check(decision)


def shown_values(
    experiment: Experiment,
    decisions: Mapping[str, Any],
    roles: Mapping[str, int],
    params: Mapping[str, Any],
) -> dict[str, float | dict[str, float]]:
    """What the experiment's `shown` hook gives for these decisions, checked: each name of
    its declared `shows` maps to a finite number (the same for everyone) or code → number;
    names it does not declare are left out. {} without the hook. Raises when the hook fails."""
    hook = getattr(experiment, "shown", None)
    if hook is None:
        return {}
    declaration = declared(experiment, params)
    names = {s.name for s in declaration.shows} if declaration is not None else set()
    result = hook(decisions, roles, params)
    if not isinstance(result, Mapping):
        raise TypeError(f"shown returned {type(result).__name__}, not a mapping")
    values: dict[str, float | dict[str, float]] = {}
    for name, value in result.items():
        if name not in names:
            continue
        if isinstance(value, Mapping):
            values[name] = {
                str(code): _finite_value(v, name) for code, v in value.items() if code in roles
            }
        else:
            values[name] = _finite_value(value, name)
    return values


def _finite_value(value: Any, name: str) -> float:
    if not _is_number(value):
        raise ValueError(f"shown {name!r}: {value!r} is not a finite number")
    return float(value)


def register(experiment: Experiment) -> None:
    """Add an experiment. A name may be registered once: a plug-in cannot replace another."""
    known = _REGISTRY.get(experiment.name)
    if known is not None and type(known) is type(experiment):
        return  # the same plug-in named twice (entry point and CANOPY_EXPERIMENT_MODULES)
    if known is not None:
        raise PluginError(f"an experiment named {experiment.name!r} is registered already")
    _REGISTRY[experiment.name] = experiment
    _SOURCES[experiment.name] = _loading_from or f"module {type(experiment).__module__}"


def get(name: str) -> Experiment:
    _load_plugins()
    return _REGISTRY[name]


def names() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def source(name: str) -> str:
    """Where experiment `name` came from: "built-in", "entry point <module:attr>,
    <distribution> <version>", "CANOPY_EXPERIMENT_MODULES <module:attr>", or "module <name>"
    (a module that called `register()` itself)."""
    _load_plugins()
    return _SOURCES[name]


def failures() -> dict[str, str]:
    """The plug-ins that failed to load (spec → error): they are left out, and logged."""
    _load_plugins()
    return dict(_FAILURES)


def load() -> list[str]:
    """Load the plug-ins now (the services call this at start, so that the log says at once
    which experiments they serve); the registered names."""
    return names()


def _load_plugins() -> None:
    """Plug-ins, once per process: every entry point of the `canopy.experiments` group (an
    installed package's `[project.entry-points."canopy.experiments"]`, naming a class or an
    instance), and each `module:attribute` (or a module that calls `register()` itself) of
    CANOPY_EXPERIMENT_MODULES, comma-separated.

    Logged once: one line naming every experiment and its source, and an error (with its
    traceback) for each plug-in that failed to load or to register. Such a plug-in is left out
    and the others are served: a service that stopped instead would take down every study on
    it for one broken package, and its sessions are refused at creation as an unknown
    experiment, which the log explains."""
    global _plugins_loaded, _loading_from
    if _plugins_loaded:
        return
    _plugins_loaded = True
    targets = [
        (f"entry point {ep.value}{_distribution(ep)}", ep.value, ep.load)
        for ep in entry_points(group=ENTRY_POINT_GROUP)
    ]
    for spec in filter(None, (s.strip() for s in os.environ.get(MODULES_ENV, "").split(","))):
        targets.append((f"{MODULES_ENV} {spec}", spec, partial(_import, spec)))
    for where, spec, load_target in targets:
        _loading_from = where
        try:
            found = load_target()
            if isinstance(found, types.ModuleType):
                continue  # a module named without an attribute registers its experiments itself
            experiment = found() if isinstance(found, type) else found
            for attribute in REQUIRED:
                if attribute == "validate" and getattr(experiment, "decision", None) is not None:
                    continue  # inputs are checked against the declared decision
                if not hasattr(experiment, attribute):
                    raise PluginError(f"it has no {attribute!r}")
            register(experiment)
        except Exception as exc:
            _FAILURES[spec] = repr(exc)
            log.error(
                "experiment plug-in %r failed to load, left out (%s): %r",
                spec,
                where,
                exc,
                exc_info=exc,
            )
        finally:
            _loading_from = None
    log.info(
        "experiments: %s",
        ", ".join(f"{name} ({_SOURCES[name]})" for name in sorted(_REGISTRY)),
    )


def _distribution(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return f", {dist.name} {dist.version}" if dist is not None else ""


def _import(spec: str) -> Any:
    module, _, attribute = spec.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded


# The built-ins use the plug-ins' surface, nothing more.
_loading_from = "built-in"
for _experiment in (PlainDecisions(), Bimatrix(), PublicGoods(), DoubleAuction()):
    register(_experiment)
_loading_from = None
