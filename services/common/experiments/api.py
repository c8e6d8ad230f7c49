"""The plug-in API: what an experiment is, as typed Protocols (docs/experiments.md writes this
contract out for researchers; the built-ins in this package are plug-ins on it, nothing more).

    Plugin[P]        what every experiment has: `name`, `channels`, `params_model`,
                     `check_group`, `initial_decision`, `payoffs` (the loader checks them)
    Validates[P]     `validate(decision, params)`: required unless the decision is declared
    Declares[P]      `decision`: a `Decision`, or `decision(params) -> Decision | None`
    Shows[P]         `shown(decisions, roles, params)`: the values the declaration shows
    OwnChannels[P]   `initial_state`, `on_input`, `hello`: channels of its own (a market)
    Described, HasPage, EventPayoffs
                     `description`, `page`, `event_payoffs`: plain attributes
    Experiment       what the services call: every hook above, always there. The registry
                     wraps each plug-in in `registry.Registered`, which fills in the optional
                     hooks a plug-in left out (so no caller asks whether a hook exists)
    Base[P]          a base class for a plug-in whose hooks get its params model instance

`P`, what a plug-in's hooks get as `params`, is chosen by the plug-in's `hook_params`:
"model" (what `Base` sets, and every built-in) gives the validated `params_model` instance;
"dict", the default for a plug-in that does not say, gives the dict that instance dumps to
(`model_dump(mode="json")`, defaults filled in), as every plug-in written before typed hooks
expects. `check_group` always gets the model instance. A caller may hand any hook either form:
the wrapper converts to the plug-in's. A group converts once (`Registered.hook_params`) and
calls the per-input hooks as the plug-in takes them (`Hooks`: no wrapper between).

Every hook is pure and deterministic: no I/O, no clock, no randomness, and no change to its
arguments (they are the group's state). A hook that raises changes nothing (see
`services.common.group`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Generic, Literal, Protocol, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from services.common.decision import Decision

HookParams = Literal["dict", "model"]
# What a caller may hand a hook as `params`: the dumped dict or the model instance.
Params = Mapping[str, Any] | BaseModel
P = TypeVar("P", contravariant=True)
M = TypeVar("M", bound=BaseModel)


def is_number(value: Any) -> bool:
    """A JSON number: int or float, finite, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> Any:
    """A JSON number (int or float, finite); "3" and true are not numbers."""
    if not is_number(value):
        raise ValueError("must be a finite number")
    return float(value)


# A params field that takes a JSON number only (pydantic's float also takes "3" and true).
Number = Annotated[float, BeforeValidator(_number)]


class NoParams(BaseModel):
    """An experiment without params: any key is refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


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


# ---- what a plug-in has ------------------------------------------------------------------


class Plugin(Protocol[P]):
    """What every experiment has. `P` is what its hooks get as `params` (see the module)."""

    @property
    def name(self) -> str:
        """The value of `experiment` in `POST /api/sessions`; one experiment per name."""

    @property
    def channels(self) -> frozenset[str]:
        """Inbound channels participants may send on."""

    @property
    def params_model(self) -> type[BaseModel]:
        """The session's `params`: unknown keys and bad values are refused (422)."""

    def check_group(self, params: Any, group_size: int) -> tuple[str, str] | None:
        """(field, message) if a group of `group_size` cannot play with these params. Gets
        the validated `params_model` instance, whatever the plug-in's `hook_params`."""

    def initial_decision(self, id_in_group: int, params: P) -> Any:
        """A member's decision before it sends one (plain JSON); raises: `None`."""

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: P
    ) -> Mapping[str, float]:
        """Flow payoffs, code → finite number; raises on a tick: no payoffs (`{}`)."""


class Validates(Protocol[P]):
    def validate(self, decision: Any, params: P) -> str | None:
        """None if the decision is acceptable, else a message for `invalid_decision`. May be
        left out by an experiment that declares its `decision` (then checked against it)."""


class Declares(Protocol[P]):
    """`decision`: a `Decision`, or this hook (the generic page, the bots, the check)."""

    def decision(self, params: P) -> Decision | None: ...


class Shows(Protocol[P]):
    def shown(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: P
    ) -> Mapping[str, Any]:
        """The values its declared `shows` names: name → number, or name → {code: number}."""


class OwnChannels(Protocol[P]):
    """An experiment with channels of its own (the double auction): its state, its inputs."""

    def initial_state(self, params: P) -> Any:
        """Its state when a period starts (and again when it ends)."""

    def on_input(
        self,
        state: Any,
        participant: str,
        id_in_group: int,
        seq: int,
        channel: str,
        payload: Any,
        params: P,
    ) -> Outcome:
        """One accepted frame on one of its channels, in the group's order."""

    def hello(self, state: Any) -> Mapping[str, Any]:
        """Extra keys of every `hello` (the auction's `{"book": ...}`)."""


class Described(Protocol):
    @property
    def description(self) -> str:
        """For `GET /api/experiments` and the console (else the class docstring)."""


class HasPage(Protocol):
    @property
    def page(self) -> str:
        """The file name of its participant page, an ES module next to its module."""


class EventPayoffs(Protocol):
    @property
    def event_payoffs(self) -> bool:
        """The period payoff is the sum of `earned` events, not a time average."""


# ---- what the services call --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hooks:
    """The hooks a group calls on every input, as the plug-in takes them: bound once, when it
    is registered (`Experiment.hooks`), and given `params` in the plug-in's own form (what
    `Experiment.hook_params` made of them), so an input costs one call into the plug-in and
    nothing between. A hook the plug-in left out is a function that answers as its absence
    means. The `Experiment` methods of the same names take either form of `params`, at the
    cost of a call more: for callers that do not hold the plug-in's form."""

    # validate(decision, params): a problem, or None (its declaration's check without it)
    validate: Callable[[Any, Any], str | None]
    # payoffs(decisions, roles, params): code → flow payoff (checked by the caller)
    payoffs: Callable[[Mapping[str, Any], Mapping[str, int], Any], Mapping[str, float]]
    # on_input(state, participant, id_in_group, seq, channel, payload, params)
    on_input: Callable[[Any, str, int, int, str, Any, Any], Outcome]


class Experiment(Protocol):
    """A registered experiment as the services call it (`registry.Registered`): every hook
    is there, the ones a plug-in left out answering as its absence always meant, and every
    hook takes `params` in either form (`Params`)."""

    @property
    def name(self) -> str: ...

    @property
    def channels(self) -> frozenset[str]: ...

    @property
    def params_model(self) -> type[BaseModel]: ...

    @property
    def own_channels(self) -> frozenset[str]:
        """The channels `on_input` takes: its channels but `decisions`, if it has `on_input`."""

    @property
    def event_payoffs(self) -> bool: ...

    @property
    def description(self) -> str: ...

    @property
    def page(self) -> str | None: ...

    @property
    def plugin(self) -> object:
        """The plug-in itself (its class says where its page lives)."""

    @property
    def hooks(self) -> Hooks:
        """The per-input hooks as the plug-in takes them (params from `hook_params`)."""

    def hook_params(self, params: Mapping[str, Any]) -> Params:
        """Validated params in the form this plug-in's hooks get: a group computes it once."""

    def check_group(self, params: Params, group_size: int) -> tuple[str, str] | None: ...

    def initial_decision(self, id_in_group: int, params: Params) -> Any: ...

    def validate(self, decision: Any, params: Params) -> str | None:
        """Its `validate`, or its declaration's check; None (anything goes) without either."""

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Params
    ) -> dict[str, float]: ...

    def declared(self, params: Params) -> Decision | None:
        """Its declared decision for these params; raises when the hook does."""

    def shown(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Params
    ) -> dict[str, float | dict[str, float]]:
        """Its `shown` values, checked (finite, declared names only); {} without the hook."""

    def initial_state(self, params: Params) -> Any: ...

    def on_input(
        self,
        state: Any,
        participant: str,
        id_in_group: int,
        seq: int,
        channel: str,
        payload: Any,
        params: Params,
    ) -> Outcome: ...

    def hello(self, state: Any) -> dict[str, Any]: ...


class Base(Generic[M]):
    """A base for a plug-in whose hooks get the validated params model instance (`M`, its
    `params_model`) instead of the dumped dict: `class Game(Base[GameParams])`. Subclasses set
    `name` and `params_model` and write `initial_decision`, `payoffs` and `validate` (or
    declare `decision`); the optional hooks of the Protocols above may be added as methods."""

    hook_params: HookParams = "model"
    name: str
    channels: frozenset[str] = frozenset({"decisions"})
    params_model: type[BaseModel] = NoParams

    def check_group(self, params: M, group_size: int) -> tuple[str, str] | None:
        return None
