"""A declared decision: what one member's decision is, in a small typed vocabulary.

An experiment declares it (its `decision` attribute, or a `decision(params)` hook, see
docs/experiments.md), and one declaration drives three things that would otherwise each need
code of their own: the generic participant page (the right control, its label and unit, the
others' decisions in the same terms, a chart on the declared scale), the bots (random and
fixed play inside the declared range and step, and a best response searched over it), and the
check of every input when the experiment has no `validate` of its own.

    Number(min, max, step=None, unit="", label=...)   a number: a slider, or a number box for
                                                       a wide range; the decision is the number
    Choice(options=[Option(value, label), ...])        one of labelled values (radio buttons);
                                                       the decision is the chosen `value`
    Mix(actions=["Cooperate", "Defect"])               a mixed strategy: the decision is the
                                                       list of probabilities (summing to 1), or
                                                       with form="first" (two actions) the
                                                       probability of the first, as bimatrix
    Compound(fields={"price": Number(...), ...})       several at once: the decision is an
                                                       object with one value per field

`Decision(input=..., instructions=..., shows=[Shown(name, label, unit), ...])` wraps one with
the text a participant reads and the values the page shows live, which the experiment computes
with its `shown` hook from the group's decisions (price, profit: no formula in the page).

Everything here is a frozen pydantic model whose JSON (`model_dump(mode="json")`) is what the
page and `GET /api/experiments` get; `check` is the validation, and `grid` / `sample` are what
the bots search and draw from. Pure: no I/O.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_OPTIONS = 50  # choices, mix actions and compound fields: what a page can lay out
MAX_SHOWN = 20
MIX_TOLERANCE = 1e-6  # how far from 1 a mix's probabilities may sum (floating point)
GRID_POINTS = 101  # the points of a number's range a bot's best response tries
GRID_LIMIT = 2_000  # at most this many candidates in all (a compound's product is cut down)
SLIDER_POSITIONS = 1_000  # beyond this many steps a slider cannot be aimed: a number box

Label = Annotated[str, Field(max_length=200)]
Scalar = str | bool | int | float  # bool before int: `True` stays a bool


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Number(_Model):
    """A number in [min, max], on the grid min + k·step when `step` is given. `control`:
    "auto" lets the page choose (a slider unless the range has more than 1,000 steps, then a
    number box), or "slider" / "box"."""

    kind: Literal["number"] = "number"
    min: float
    max: float
    step: Annotated[float, Field(gt=0)] | None = None
    unit: Label = ""
    label: Label = "Your decision"
    control: Literal["auto", "slider", "box"] = "auto"

    @model_validator(mode="after")
    def _ordered(self) -> Number:
        if not (math.isfinite(self.min) and math.isfinite(self.max) and self.min < self.max):
            raise ValueError(f"a Number needs finite min < max, not [{self.min}, {self.max}]")
        return self

    def check(self, value: Any) -> str | None:
        unit = f" {self.unit}" if self.unit else ""
        wanted = f"a number from {self.min:g} to {self.max:g}{unit}"
        if not _is_number(value) or not self.min <= value <= self.max:
            return wanted
        if self.step is not None and not _on_grid(value, self.min, self.step):
            return f"{wanted}, in steps of {self.step:g}"
        return None

    def grid(self, points: int = GRID_POINTS) -> list[float]:
        """Up to `points` values spread over the range, on the step grid, both ends included."""
        if self.step is not None:
            steps = math.floor((self.max - self.min) / self.step + 1e-9)
            if steps + 1 <= points:
                return [self.snap(self.min + k * self.step) for k in range(steps + 1)]
        values = [self.min + (self.max - self.min) * k / (points - 1) for k in range(points)]
        return sorted({self.snap(v) for v in values})

    def snap(self, value: float) -> float:
        """`value` moved onto the step grid and into the range (rounded, not to drift)."""
        value = min(self.max, max(self.min, value))
        if self.step is None:
            return round(value, 10)
        k = round((value - self.min) / self.step)
        snapped = self.min + k * self.step
        if snapped > self.max + 1e-9:
            snapped -= self.step
        decimals = max(0, -math.floor(math.log10(self.step)) + 2)
        return round(snapped, decimals)

    def sample(self, rng: random.Random) -> float:
        return self.snap(rng.uniform(self.min, self.max))


def _on_grid(value: float, start: float, step: float) -> bool:
    k = (value - start) / step
    return abs(k - round(k)) <= 1e-6


class Option(_Model):
    value: Scalar
    label: Label


class Choice(_Model):
    """One of the options: the decision is the chosen option's `value` (a string, number or
    boolean)."""

    kind: Literal["choice"] = "choice"
    options: Annotated[list[Option], Field(min_length=2, max_length=MAX_OPTIONS)]
    label: Label = "Your choice"

    @model_validator(mode="after")
    def _distinct(self) -> Choice:
        keys = [_key(o.value) for o in self.options]
        if len(set(keys)) != len(keys):
            raise ValueError("a Choice's option values must differ")
        return self

    def check(self, value: Any) -> str | None:
        if isinstance(value, Scalar) and _key(value) in {_key(o.value) for o in self.options}:
            return None
        return "one of " + ", ".join(f"{o.value!r} ({o.label})" for o in self.options)

    def grid(self, points: int = GRID_POINTS) -> list[Any]:
        return [o.value for o in self.options]

    def sample(self, rng: random.Random) -> Any:
        return rng.choice(self.options).value


def _key(value: Any) -> tuple[str, Any]:
    """Equal JSON values compare equal (1 and 1.0), but `true` is not 1."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    return ("string", value)


class Mix(_Model):
    """A mixed strategy over labelled actions: the decision is the list of their probabilities
    (each ≥ 0, summing to 1), or with `form="first"` (two actions only) the probability of the
    first one, a number in [0, 1]."""

    kind: Literal["mix"] = "mix"
    actions: Annotated[list[Label], Field(min_length=2, max_length=MAX_OPTIONS)]
    form: Literal["list", "first"] = "list"
    label: Label = "Your mix"

    @model_validator(mode="after")
    def _first_needs_two(self) -> Mix:
        if self.form == "first" and len(self.actions) != 2:
            raise ValueError('a Mix of form "first" has exactly two actions')
        return self

    def check(self, value: Any) -> str | None:
        if self.form == "first":
            if _is_number(value) and 0 <= value <= 1:
                return None
            return f"the probability of {self.actions[0]}, a number from 0 to 1"
        wanted = f"{len(self.actions)} probabilities ({', '.join(self.actions)}) summing to 1"
        if not isinstance(value, list) or len(value) != len(self.actions):
            return wanted
        if not all(_is_number(p) and 0 <= p <= 1 for p in value):
            return wanted
        if abs(sum(value) - 1) > MIX_TOLERANCE:
            return wanted
        return None

    def grid(self, points: int = GRID_POINTS) -> list[Any]:
        """The pure actions (a best response can always be pure), and for two actions every
        hundredth mix between them."""
        if self.form == "first":
            return [k / (points - 1) for k in range(points)]
        n = len(self.actions)
        return [[1.0 if i == j else 0.0 for i in range(n)] for j in range(n)]

    def sample(self, rng: random.Random) -> Any:
        if self.form == "first":
            return round(rng.random(), 4)
        weights = [rng.expovariate(1.0) for _ in self.actions]  # uniform over the simplex
        total = sum(weights)
        mix = [round(w / total, 6) for w in weights]
        mix[-1] = round(1 - sum(mix[:-1]), 6)
        return mix if mix[-1] >= 0 else [*mix[:-1], 0.0]


Part = Annotated[Number | Choice | Mix, Field(discriminator="kind")]


class Compound(_Model):
    """Several decisions at once: the decision is an object with one value per field (a price
    and a quantity), each checked by its own declaration."""

    kind: Literal["compound"] = "compound"
    fields: Annotated[dict[str, Part], Field(min_length=1, max_length=MAX_OPTIONS)]
    label: Label = "Your decision"

    def check(self, value: Any) -> str | None:
        if not isinstance(value, dict) or set(value) != set(self.fields):
            return "an object with " + ", ".join(self.fields)
        for name, part in self.fields.items():
            problem = part.check(value[name])
            if problem is not None:
                return f"{name}: {problem}"
        return None

    def grid(self, points: int = GRID_POINTS) -> list[Any]:
        """Every combination of the fields' grids, each cut down so that there are at most
        GRID_LIMIT combinations in all."""
        per_field = max(2, int(GRID_LIMIT ** (1 / len(self.fields))))
        grids = [part.grid(min(points, per_field))[:per_field] for part in self.fields.values()]
        names = list(self.fields)
        combos = itertools.islice(itertools.product(*grids), GRID_LIMIT)
        return [dict(zip(names, combo, strict=True)) for combo in combos]

    def sample(self, rng: random.Random) -> Any:
        return {name: part.sample(rng) for name, part in self.fields.items()}


Input = Annotated[Number | Choice | Mix | Compound, Field(discriminator="kind")]


class Shown(_Model):
    """One value the page shows live (the experiment's `shown` hook computes it): `name` is
    its key in what the hook returns."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")]
    label: Label
    unit: Label = ""
    digits: Annotated[int, Field(ge=0, le=10)] = 2


class Decision(_Model):
    """What a member decides (`input`), what they read first (`instructions`) and the values
    the page shows them live (`shows`, computed by the experiment's `shown` hook)."""

    input: Input
    instructions: Annotated[str, Field(max_length=5_000)] = ""
    shows: Annotated[list[Shown], Field(max_length=MAX_SHOWN)] = []

    def check(self, value: Any) -> str | None:
        """None when `value` is a decision of this kind, else the message of the refusal."""
        problem = self.input.check(value)
        return None if problem is None else f"a decision is {problem}"

    def grid(self, points: int = GRID_POINTS) -> list[Any]:
        return self.input.grid(points)

    def sample(self, rng: random.Random) -> Any:
        return self.input.sample(rng)
