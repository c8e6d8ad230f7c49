"""What a bot does on its turn: one strategy per kind of play, pure (no I/O, no clock).

A strategy looks at a `View` (what the bot's connection last heard: its own code and role,
the group's decisions, the auction's book) and returns the frames to send now, as
`(channel, payload)` pairs, possibly none. Randomness comes from the `random.Random` the
caller passes, so a seeded test gets the same moves every time.

    random_walk     a declared number (every built-in but the auction, a plug-in that
                    declares one): a step of up to ±10 % of the range from the bot's current
                    decision, clipped to the range and put on its step; a declared choice,
                    mix or compound: a new random value of that kind
    best_response   bimatrix: the pure action that pays more against the others' current
                    mix (from the session's payoff matrix); public goods: the dominant
                    contribution (0 when mpcr < 1, the endowment when mpcr > 1); any other
                    experiment with payoffs and a declared decision: the value of a grid over
                    the declaration (101 points of a number's range, every option) that pays
                    the bot most against the others' current decisions, by the experiment's
                    own `payoffs` hook
    fixed           one value, sent whenever the bot's decision is not that value (so once
                    per period, or after a reset of the decisions); by default the middle of
                    a declared number's range (on its step), a mix's uniform mix, a choice's
                    first option
    zi              double auction: Gode and Sunder's zero-intelligence trader with a budget
                    constraint (ZI-C): a buyer bids uniformly in [low, value], a seller asks
                    uniformly in [cost, high], one unit at a time, within the session's
                    max_price; a new order replaces the bot's open ones (cancel, then order),
                    so it never holds more than one and stays under max_open_orders

`make_strategy(experiment, name, params, options)` builds one; `default` is random_walk for
the decision experiments and zi for the auction. Bad combinations raise `StrategyError`.

The range of random_walk (and fixed's default value): what the experiment declares
(`services.common.decision`; the built-ins declare [0, 1] for a plain decision and a bimatrix
mix, [0, endowment] in steps for public goods), or `low` / `high`. A plug-in that declares
nothing, or that is not installed where the bots run (the bots need it for its declaration),
has its range taken from its params only when one pair says it plainly (`max_<x>`, with
`min_<x>` or else 0; e.g. Cournot's `max_quantity`), with a `note` that the CLI prints as a
warning; with none or several such pairs they refuse (StrategyError) rather than play on a
scale the experiment does not use.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common import experiments
from services.common.decision import Compound, Decision, Mix, Number
from services.common.experiments import (
    BimatrixParams,
    DoubleAuctionParams,
    Experiment,
    PublicGoodsParams,
    Registry,
    wrap,
)

Action = tuple[str, Any]  # (channel, payload)
STRATEGIES = ("default", "random_walk", "best_response", "fixed", "zi")
WALK_STEP = 0.1  # a random-walk step: up to this share of the decision range
PRICE_TICK = 0.01  # auction prices are drawn on a cent grid
MAX_PENDING_CANCELS = 100  # cancels whose error might still come, remembered per trader


class StrategyError(ValueError):
    """A strategy that does not fit the experiment, or options it cannot use."""


@dataclass(frozen=True)
class View:
    """What a bot knows when it acts: from its latest `hello` and broadcasts."""

    code: str
    id_in_group: int
    members: tuple[str, ...]
    decisions: Mapping[str, Any] = field(default_factory=dict)  # group_decisions
    book: Mapping[str, Any] | None = None  # double auction: {"bids", "asks", "..._total"}
    # Double auction: the bot's own open orders (seq → {"price", "quantity"}) as `OpenOrders`
    # knows them; the book lists only its best entries. None: those of the book.
    open_orders: Mapping[int, Mapping[str, Any]] | None = None

    @property
    def mine(self) -> Any:
        return self.decisions.get(self.code)


@dataclass
class OpenOrders:
    """A trader's own open orders, known from its own orders, cancels and the trades that name
    it (PROTOCOL v2: a `book` lists only the best `book_depth` entries per side). An order is
    open from when it is sent until a trade fills it, its cancel is sent, or an `error`
    answers it; a book that lists one gives its quantity, and a book that would have to list
    one and does not (the whole side is listed, or it is better than the last entry listed)
    says it is gone (filled while the bot was away). canopy's page does the same."""

    orders: dict[int, dict[str, Any]] = field(default_factory=dict)
    cancels: dict[int, tuple[int, dict[str, Any]]] = field(default_factory=dict)

    def sent(self, seq: int, channel: str, payload: Any) -> None:
        if not isinstance(payload, Mapping):
            return
        if channel == "orders":
            self.orders[seq] = {"price": payload.get("price"), "quantity": payload.get("quantity")}
        elif channel == "cancel" and isinstance(payload.get("seq"), int):
            order = self.orders.pop(payload["seq"], None)
            if order is not None:
                self.cancels[seq] = (payload["seq"], order)
                while len(self.cancels) > MAX_PENDING_CANCELS:  # answered ones are not told
                    del self.cancels[next(iter(self.cancels))]

    def refused(self, seq: int, code: str | None) -> None:
        self.orders.pop(seq, None)
        cancel = self.cancels.pop(seq, None)
        # A cancel refused as invalid: that order is not open. Otherwise (flood): it still is.
        if cancel is not None and code not in ("invalid_decision", "period_not_running"):
            self.orders[cancel[0]] = cancel[1]

    def traded(self, trade: Mapping[str, Any], code: str) -> None:
        if trade.get("buyer") == code:
            seq = trade.get("bid_seq")
        elif trade.get("seller") == code:
            seq = trade.get("ask_seq")
        else:
            return
        if not isinstance(seq, int) or seq not in self.orders:
            return
        order = self.orders[seq]
        left = (order.get("quantity") or 0) - (trade.get("quantity") or 0)
        if left > 0:
            self.orders[seq] = {**order, "quantity": left}
        else:
            del self.orders[seq]

    def seen_book(self, book: Mapping[str, Any], code: str, buyer: bool) -> None:
        side = "bids" if buyer else "asks"
        listed = [e for e in book.get(side) or [] if isinstance(e, Mapping)]
        total = book.get(f"{side}_total")
        if not isinstance(total, int):
            total = len(listed)
        shown = set()
        cancelling = {target for target, _ in self.cancels.values()}
        for entry in listed:
            if entry.get("seq") in cancelling:
                continue  # its cancel is on its way
            if entry.get("participant") == code and isinstance(entry.get("seq"), int):
                shown.add(entry["seq"])
                self.orders[entry["seq"]] = {
                    "price": entry.get("price"),
                    "quantity": entry.get("quantity"),
                }
        last = _number(listed[-1].get("price")) if listed else None
        for seq, order in list(self.orders.items()):
            if seq in shown:
                continue
            price = _number(order.get("price"))
            better = (
                last is not None and price is not None and (price > last if buyer else price < last)
            )
            if len(listed) >= total or better:
                del self.orders[seq]

    def clear(self) -> None:
        self.orders.clear()
        self.cancels.clear()


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
    note: str = field(default="", compare=False)  # a warning for whoever starts the bots
    grid: Number | None = None  # the declared number: its step is kept

    def act(self, view: View, rng: random.Random) -> list[Action]:
        width = self.high - self.low
        current = _number(view.mine)
        if current is None:
            current = self.low + width / 2
        value = current + rng.uniform(-self.step, self.step) * width
        if self.grid is not None and self.grid.step is not None:
            value = self.grid.snap(value)
            if not self.low <= value <= self.high:  # a range given narrower than declared
                value = self.grid.snap(current if self.low <= current <= self.high else self.low)
        # Four decimals: what a slider shows; rounding inward keeps the value in the range.
        value = min(self.high, max(self.low, round(value, 4)))
        return [("decisions", value)]


@dataclass(frozen=True)
class RandomDeclared:
    """A declared choice, mix or compound: each turn a new random value of that kind."""

    decision: Decision
    note: str = field(default="", compare=False)

    def act(self, view: View, rng: random.Random) -> list[Action]:
        return [("decisions", self.decision.sample(rng))]


@dataclass(frozen=True)
class Fixed:
    value: Any
    note: str = field(default="", compare=False)

    def act(self, view: View, rng: random.Random) -> list[Action]:
        return [] if view.mine == self.value else [("decisions", self.value)]


@dataclass(frozen=True)
class DeclaredBestResponse:
    """Any experiment with flow payoffs and a declared decision: the candidate of the
    declaration's grid that pays this bot most by the experiment's own `payoffs`, the others'
    current decisions held (myopic, as a best response is). The bot keeps its decision when
    it pays as much as the best (no churn between equals); candidates the hook fails on, or
    gives no payoff for, are skipped, and without any payoff the bot does nothing."""

    experiment: Any = field(compare=False)  # the Experiment: its `payoffs` hook
    params: Mapping[str, Any]
    candidates: tuple[Any, ...]

    def _pay(self, view: View, value: Any, roles: Mapping[str, int]) -> float | None:
        decisions = {code: view.decisions.get(code) for code in view.members}
        decisions[view.code] = value
        try:
            paid = self.experiment.payoffs(decisions, roles, self.params).get(view.code)
        except Exception:  # an experiment's hook, on a value it may not take
            return None
        return _number(paid)

    def best(self, view: View) -> Any:
        """The best candidate now; None when no candidate has a payoff."""
        roles = {code: i for i, code in enumerate(view.members, start=1)}
        best, best_pay = None, -math.inf
        for candidate in self.candidates:
            pay = self._pay(view, candidate, roles)
            if pay is not None and pay > best_pay + 1e-12:
                best, best_pay = candidate, pay
        if best is None:
            return None
        current = self._pay(view, view.mine, roles) if view.mine is not None else None
        return view.mine if current is not None and current >= best_pay - 1e-9 else best

    def act(self, view: View, rng: random.Random) -> list[Action]:
        best = self.best(view)
        return [] if best is None or best == view.mine else [("decisions", best)]


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
    max_price: float = 1_000_000.0  # the session's: never a price above it

    def act(self, view: View, rng: random.Random) -> list[Action]:
        buyer = view.id_in_group % 2 == 1
        if buyer:
            top = math.floor(min(self.value, self.max_price) / PRICE_TICK)
            bottom = min(math.ceil(self.low / PRICE_TICK), top)
            side, price = "bid", rng.randint(bottom, top) * PRICE_TICK
        else:
            bottom = math.ceil(self.cost / PRICE_TICK)
            top = max(math.floor(min(self.high, self.max_price) / PRICE_TICK), bottom)
            side, price = "ask", rng.randint(bottom, top) * PRICE_TICK
        actions: list[Action] = []
        # Replace the bot's open orders rather than pile them up: one open order at a time
        # stays under any max_open_orders (≥ 1). Its own record of them when it keeps one: the
        # book lists only the best entries.
        if view.open_orders is not None:
            own = sorted(view.open_orders)
        else:
            book = view.book or {}
            own = [
                entry["seq"]
                for entry in book.get("bids" if buyer else "asks", [])
                if entry.get("participant") == view.code
            ]
        actions.extend(("cancel", {"seq": seq}) for seq in own)
        actions.append(("orders", {"side": side, "price": round(price, 2), "quantity": 1}))
        return actions


def _numeric(decision: Decision | None) -> Number | None:
    """The declared number a random walk walks on (a two-action mix sent as the probability
    of its first action is a number in [0, 1])."""
    if decision is None:
        return None
    if isinstance(decision.input, Number):
        return decision.input
    if isinstance(decision.input, Mix) and decision.input.form == "first":
        return Number(min=0, max=1)
    return None


def _range(
    experiment: str,
    params: Mapping[str, Any],
    options: Mapping[str, Any],
    declared: Number | None = None,
    installed: bool = True,
) -> tuple[float, float, str]:
    """(low, high, note): the decisions' range, and a warning when it is a guess."""
    note = ""
    if declared is not None:
        low, high = declared.min, declared.max
    elif options.get("low") is not None and options.get("high") is not None:
        low, high = 0.0, 1.0  # both given: nothing to guess
    else:
        low, high, note = _plugin_range(experiment, params, installed)
    low, high = _option(options, "low", low), _option(options, "high", high)
    if not low < high:
        raise StrategyError(f"the range needs low < high, not [{low:g}, {high:g}]")
    if note:
        note += f": [{low:g}, {high:g}]; give --low and --high to choose"
    return low, high, note


def _plugin_range(
    experiment: str, params: Mapping[str, Any], installed: bool = True
) -> tuple[float, float, str]:
    """A plug-in's range from the one `max_<x>` of its params (and `min_<x>`, else 0), for a
    plug-in that declares no decision or is not installed here."""
    why = (
        f"{experiment!r} declares no range for its decisions"
        if installed
        else f"{experiment!r} is not installed where the bots run, so its declared decision "
        "is unknown"
    )
    bounds = sorted(
        key
        for key, value in params.items()
        if key.startswith("max_") and len(key) > 4 and _number(value) is not None
    )
    if len(bounds) != 1:
        among = f" (its params have {', '.join(bounds)})" if bounds else ""
        raise StrategyError(
            f"{why}{among}, and bots do not guess a range: give --low and --high "
            "(options low / high)"
        )
    top = bounds[0]
    bottom = "min_" + top.removeprefix("max_")
    low = _number(params.get(bottom))
    where = f"params.{bottom} to params.{top}" if low is not None else f"0 to params.{top}"
    note = f"{why}; bots play {where}"
    return (0.0 if low is None else low), float(params[top]), note


def _installed(experiment: str | Experiment, registry: Registry | None) -> Experiment | None:
    """The experiment itself: given, or registered under that name in `registry` (None if
    not); without a registry, in the process's default (a researcher's script: the built-ins
    and the plug-ins installed where it runs)."""
    if not isinstance(experiment, str):
        return wrap(experiment)  # a plug-in handed in as is: the whole API
    try:
        # The module-level default only here: the bots' library API for researchers' scripts
        # (start_bots, fill_session, make_strategy by name), documented in docs/cli.md.
        return (experiments.default() if registry is None else registry).get(experiment)
    except KeyError:
        return None


def make_strategy(
    experiment: str | Experiment,
    name: str = "default",
    params: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    *,
    registry: Registry | None = None,
) -> Strategy:
    """The strategy `name` for a session of `experiment` (its name, or the experiment itself)
    with these `params` (as the session holds them: validated, defaults filled in).

    `options` (all optional): `value` (fixed: the decision; zi: the buyers' value), `cost`
    (zi: the sellers' cost), `low` / `high` (random_walk: the range; zi: the lowest bid and
    the highest ask). Unset ones come from the experiment's declared decision, `params` and
    the experiment's defaults. A name is looked up in `registry` (the caller's: the CLI's, the
    store's), else in the process's default registry."""
    params, options = dict(params or {}), dict(options or {})
    found = _installed(experiment, registry)
    experiment = experiment if isinstance(experiment, str) else experiment.name
    try:
        decision = found.declared(params) if found is not None else None
    except Exception as exc:  # the experiment's hook; its params are the session's
        raise StrategyError(f"{experiment!r} failed to declare its decision: {exc!r}") from exc
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
            top = auction_params.max_price
            if value < low:
                raise StrategyError(f"the buyers' value {value:g} is below the lowest bid {low:g}")
            if low > top or cost > top:
                raise StrategyError(f"the lowest bid and the cost must be under max_price {top:g}")
            return ZeroIntelligence(value=value, cost=cost, low=low, high=high, max_price=top)
        if name == "best_response":
            if experiment == "bimatrix":
                return BimatrixBestResponse(BimatrixParams.model_validate(params).matrix())
            if experiment == "public_goods":
                p = PublicGoodsParams.model_validate(params)
                return PublicGoodsBestResponse(float(p.endowment), float(p.mpcr))
            if experiment == "decisions" or found is None or decision is None:
                raise StrategyError(
                    f"best_response needs payoffs and a declared decision, which {experiment!r}"
                    + (" has not" if found is not None else " (not installed here) may have")
                )
            return DeclaredBestResponse(found, params, tuple(decision.grid()))
        if name == "fixed" and options.get("value") is not None:
            return Fixed(_option(options, "value", 0.0))
        number = _numeric(decision)
        if decision is not None and number is None and not _ranged(options):
            # A declared choice, mix or compound: its own values.
            if name == "fixed":
                return Fixed(_middle(decision))
            return RandomDeclared(decision)
        low, high, note = _range(experiment, params, options, number, found is not None)
        if name == "fixed":
            middle = low + (high - low) / 2
            return Fixed(number.snap(middle) if number is not None else middle, note=note)
        return RandomWalk(low, high, note=note, grid=number)
    except ValueError as exc:  # the params models' own complaints
        if isinstance(exc, StrategyError):
            raise
        raise StrategyError(f"the session's params do not fit {experiment!r}: {exc}") from exc


def _ranged(options: Mapping[str, Any]) -> bool:
    return options.get("low") is not None or options.get("high") is not None


def _middle(decision: Decision) -> Any:
    """fixed's default for a declared choice, mix or compound: the first option, the uniform
    mix, each field's own default."""

    def middle(kind: Any) -> Any:
        if isinstance(kind, Number):
            return kind.snap(kind.min + (kind.max - kind.min) / 2)
        if isinstance(kind, Mix):
            if kind.form == "first":
                return 0.5
            share = round(1 / len(kind.actions), 6)
            return [share] * (len(kind.actions) - 1) + [
                round(1 - share * (len(kind.actions) - 1), 6)
            ]
        if isinstance(kind, Compound):
            return {name: middle(part) for name, part in kind.fields.items()}
        return kind.options[0].value  # a Choice

    return middle(decision.input)


def _option(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key)
    if value is None:
        return float(default)
    number = _number(value)
    if number is None:
        raise StrategyError(f"{key} must be a finite number, not {value!r}")
    return number
