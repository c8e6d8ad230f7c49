"""What a bot does on its turn: one strategy per kind of play, pure (no I/O, no clock).

A strategy looks at a `View` (what the bot's connection last heard: its own code and role,
the group's decisions, the auction's book) and returns the frames to send now, as
`(channel, payload)` pairs, possibly none. Randomness comes from the `random.Random` the
caller passes, so a seeded test gets the same moves every time.

    random_walk     decisions, bimatrix, public goods: a step of up to ±10 % of the range
                    from the bot's current decision, clipped to the range
    best_response   bimatrix: the pure action that pays more against the others' current
                    mix (from the session's payoff matrix); public goods: the dominant
                    contribution (0 when mpcr < 1, the endowment when mpcr > 1)
    fixed           one value, sent whenever the bot's decision is not that value (so once
                    per period, or after a reset of the decisions)
    zi              double auction: Gode and Sunder's zero-intelligence trader with a budget
                    constraint (ZI-C): a buyer bids uniformly in [low, value], a seller asks
                    uniformly in [cost, high], one unit at a time; a new order replaces the
                    bot's resting one (cancel, then order)

`make_strategy(experiment, name, params, options)` builds one; `default` is random_walk for
the decision experiments and zi for the auction. Bad combinations raise `StrategyError`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.experiments import BimatrixParams, DoubleAuctionParams, PublicGoodsParams

Action = tuple[str, Any]  # (channel, payload)
STRATEGIES = ("default", "random_walk", "best_response", "fixed", "zi")
WALK_STEP = 0.1  # a random-walk step: up to this share of the decision range
PRICE_TICK = 0.01  # auction prices are drawn on a cent grid


class StrategyError(ValueError):
    """A strategy that does not fit the experiment, or options it cannot use."""


@dataclass(frozen=True)
class View:
    """What a bot knows when it acts: from its latest `hello` and broadcasts."""

    code: str
    id_in_group: int
    members: tuple[str, ...]
    decisions: Mapping[str, Any] = field(default_factory=dict)  # group_decisions
    book: Mapping[str, Any] | None = None  # double auction: {"bids", "asks"}

    @property
    def mine(self) -> Any:
        return self.decisions.get(self.code)


class Strategy(Protocol):
    def act(self, view: View, rng: random.Random) -> list[Action]:
        """The frames to send now (often one decision; none when there is nothing to do)."""


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


@dataclass(frozen=True)
class RandomWalk:
    low: float
    high: float
    step: float = WALK_STEP

    def act(self, view: View, rng: random.Random) -> list[Action]:
        width = self.high - self.low
        current = _number(view.mine)
        if current is None:
            current = self.low + width / 2
        value = current + rng.uniform(-self.step, self.step) * width
        # Four decimals: what a slider shows; rounding inward keeps the value in the range.
        value = min(self.high, max(self.low, round(value, 4)))
        return [("decisions", value)]


@dataclass(frozen=True)
class Fixed:
    value: float

    def act(self, view: View, rng: random.Random) -> list[Action]:
        return [] if _number(view.mine) == self.value else [("decisions", self.value)]


def bimatrix_best_response(
    matrix: list[list[list[float]]], view: View, current: float | None = None
) -> float | None:
    """The probability of action 0 that is a best response to the others' current mix; None
    while some other member's decision is unknown, `current` (or 0.5) when both actions pay
    the same.

    As the experiment pays (PROTOCOL v1.1): in a group of two, member 1 is the row player and
    member 2 the column player; in larger groups each plays as the row player against the
    mean mix of the others."""
    others = [_number(view.decisions.get(code)) for code in view.members if code != view.code]
    if not others or any(q is None for q in others):
        return None
    mixes = [q for q in others if q is not None]
    q = sum(mixes) / len(mixes)
    if len(view.members) == 2 and view.id_in_group == 2:
        # Column player: payoff of column action a against the row player's mix q.
        pay = [q * matrix[0][a][1] + (1 - q) * matrix[1][a][1] for a in (0, 1)]
    else:
        pay = [q * matrix[a][0][0] + (1 - q) * matrix[a][1][0] for a in (0, 1)]
    if math.isclose(pay[0], pay[1], rel_tol=0.0, abs_tol=1e-12):
        return current if current is not None else 0.5
    return 1.0 if pay[0] > pay[1] else 0.0


@dataclass(frozen=True)
class BimatrixBestResponse:
    matrix: list[list[list[float]]]

    def act(self, view: View, rng: random.Random) -> list[Action]:
        mine = _number(view.mine)
        best = bimatrix_best_response(self.matrix, view, mine)
        return [] if best is None or best == mine else [("decisions", best)]


def public_goods_best_response(endowment: float, mpcr: float, current: float | None) -> float:
    """The dominant contribution: each unit given returns mpcr to the giver and costs 1."""
    if mpcr < 1:
        return 0.0
    if mpcr > 1:
        return endowment
    return current if current is not None else 0.0


@dataclass(frozen=True)
class PublicGoodsBestResponse:
    endowment: float
    mpcr: float

    def act(self, view: View, rng: random.Random) -> list[Action]:
        mine = _number(view.mine)
        best = public_goods_best_response(self.endowment, self.mpcr, mine)
        return [] if best == mine else [("decisions", best)]


@dataclass(frozen=True)
class ZeroIntelligence:
    """ZI-C: random prices that never trade at a loss (Gode and Sunder 1993).

    `value` bounds a buyer's bids from above, `cost` a seller's asks from below; `low` is the
    lowest bid, `high` the highest ask. Odd `id_in_group` buy, even sell (PROTOCOL v1.1)."""

    value: float
    cost: float
    low: float
    high: float

    def act(self, view: View, rng: random.Random) -> list[Action]:
        buyer = view.id_in_group % 2 == 1
        if buyer:
            top = math.floor(self.value / PRICE_TICK)
            bottom = min(math.ceil(self.low / PRICE_TICK), top)
            side, price = "bid", rng.randint(bottom, top) * PRICE_TICK
        else:
            bottom = math.ceil(self.cost / PRICE_TICK)
            top = max(math.floor(self.high / PRICE_TICK), bottom)
            side, price = "ask", rng.randint(bottom, top) * PRICE_TICK
        actions: list[Action] = []
        # Replace the bot's resting order rather than pile up orders: a book that only grows
        # makes every `book` broadcast longer.
        book = view.book or {}
        for entry in book.get("bids" if buyer else "asks", []):
            if entry.get("participant") == view.code:
                actions.append(("cancel", {"seq": entry["seq"]}))
        actions.append(("orders", {"side": side, "price": round(price, 2), "quantity": 1}))
        return actions


def _range(
    experiment: str, params: Mapping[str, Any], options: Mapping[str, Any]
) -> tuple[float, float]:
    if experiment == "public_goods":
        low, high = 0.0, float(PublicGoodsParams.model_validate(params).endowment)
    else:  # bimatrix: a probability; decisions (and plug-ins): the slider's [0, 1] by default
        low, high = 0.0, 1.0
    low, high = _option(options, "low", low), _option(options, "high", high)
    if not low < high:
        raise StrategyError(f"the range needs low < high, not [{low:g}, {high:g}]")
    return low, high


def make_strategy(
    experiment: str,
    name: str = "default",
    params: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> Strategy:
    """The strategy `name` for a session of `experiment` with these `params`.

    `options` (all optional): `value` (fixed: the decision; zi: the buyers' value), `cost`
    (zi: the sellers' cost), `low` / `high` (random_walk: the range; zi: the lowest bid and
    the highest ask). Unset ones come from `params` and the experiment's defaults."""
    params, options = dict(params or {}), dict(options or {})
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
    auction = experiment == "double_auction"
    if name == "default":
        name = "zi" if auction else "random_walk"
    if auction != (name == "zi"):
        fits = "zi" if auction else "random_walk, best_response, fixed"
        raise StrategyError(f"strategy {name!r} does not fit {experiment!r} (use {fits})")
    try:
        if name == "zi":
            auction_params = DoubleAuctionParams.model_validate(params)
            value = _option(options, "value", auction_params.buyer_value)
            cost = _option(options, "cost", auction_params.seller_cost)
            low = _option(options, "low", PRICE_TICK)
            high = _option(options, "high", max(value, cost))
            low, cost = max(low, PRICE_TICK), max(cost, PRICE_TICK)  # prices must be > 0
            if value < low:
                raise StrategyError(f"the buyers' value {value:g} is below the lowest bid {low:g}")
            return ZeroIntelligence(value=value, cost=cost, low=low, high=high)
        if name == "best_response":
            if experiment == "bimatrix":
                return BimatrixBestResponse(BimatrixParams.model_validate(params).matrix())
            if experiment == "public_goods":
                p = PublicGoodsParams.model_validate(params)
                return PublicGoodsBestResponse(float(p.endowment), float(p.mpcr))
            raise StrategyError(
                f"best_response needs payoffs: bimatrix or public_goods, not {experiment!r}"
            )
        low, high = _range(experiment, params, options)
        if name == "fixed":
            value = _option(options, "value", low + (high - low) / 2)
            return Fixed(value)
        return RandomWalk(low, high)
    except ValueError as exc:  # the params models' own complaints
        if isinstance(exc, StrategyError):
            raise
        raise StrategyError(f"the session's params do not fit {experiment!r}: {exc}") from exc


def _option(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key)
    if value is None:
        return float(default)
    number = _number(value)
    if number is None:
        raise StrategyError(f"{key} must be a finite number, not {value!r}")
    return number
