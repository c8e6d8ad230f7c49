"""Experiments: the plug-in API, the registry, and the four built-ins written on that API.

    api             the plug-in API as typed Protocols (`Plugin`, the optional hooks,
                    `Experiment` as the services call it), `Base`, `Outcome`, `params_error`
    registry        `Registry` (built-ins and plug-ins by name, with their sources and the
                    plug-ins that failed to load) and `Registered`, the wrapper that gives
                    every plug-in the whole API
    decisions, bimatrix, public_goods, double_auction
                    the built-ins, one module each, plug-ins like any other

An experiment says which inbound channels it accepts, its `params` (a pydantic model: a session
with bad params is refused with 422 when it is created), what a group must be like
(`check_group`), a member's initial decision, whether a decision is valid, and the payoffs of a
set of group decisions (oTree / otree_redwood's `initial_decision`, validation and payoff
functions); it may declare what a decision is (`decision`): the generic page, the bots and the
check of inputs of an experiment without `validate` are built from it. docs/experiments.md is
the contract, written out.

A registry is an object (`Registry`), made by whoever needs one and handed to what takes one;
nothing is registered at import. Each service's composition root (its `create_app`) makes
one, with the built-ins, and loads the plug-ins into it in its lifespan (once logging is set
up, so the log says what it serves), and hands it to what needs it: decisions' worker, the
gateway's participants and pages, the store's API, live monitor, replay and bots; `canopy
bots` makes its own. No service module reaches a registry of the process.

The functions below are the module-level default for what is not handed one: the bots'
library API called from researchers' scripts without a registry (`start_bots`,
`fill_session`, `make_strategy` by name: docs/cli.md), a module named alone in
CANOPY_EXPERIMENT_MODULES that calls `register()` while it loads (docs/experiments.md), and
tests. `default()` is made (built-ins and plug-ins, logged) on first use unless `install()`
set it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.common.decision import Decision
from services.common.experiments.api import (
    Base,
    Experiment,
    HookParams,
    Hooks,
    NoParams,
    Number,
    Outcome,
    Params,
    Plugin,
    params_error,
)
from services.common.experiments.bimatrix import (
    ACTION_NAMES,
    GAMES,
    Bimatrix,
    BimatrixParams,
)
from services.common.experiments.decisions import PlainDecisions
from services.common.experiments.double_auction import (
    DoubleAuction,
    DoubleAuctionParams,
    book_view,
)
from services.common.experiments.public_goods import PublicGoods, PublicGoodsParams
from services.common.experiments.registry import (
    ENTRY_POINT_GROUP,
    MODULES_ENV,
    PluginError,
    Registered,
    Registry,
    register_while_loading,
    wrap,
)

__all__ = [
    "ACTION_NAMES",
    "ENTRY_POINT_GROUP",
    "GAMES",
    "MODULES_ENV",
    "Base",
    "Bimatrix",
    "BimatrixParams",
    "DoubleAuction",
    "DoubleAuctionParams",
    "Experiment",
    "HookParams",
    "Hooks",
    "NoParams",
    "Number",
    "Outcome",
    "Params",
    "PlainDecisions",
    "Plugin",
    "PluginError",
    "PublicGoods",
    "PublicGoodsParams",
    "Registered",
    "Registry",
    "book_view",
    "check_input",
    "declared",
    "declared_json",
    "default",
    "failures",
    "get",
    "install",
    "load",
    "names",
    "params_error",
    "register",
    "shown_values",
    "source",
    "wrap",
]

_default: Registry | None = None


def default() -> Registry:
    """The process's registry: the one `install()` set, else the built-ins and the plug-ins,
    loaded (and logged) on first use."""
    global _default
    if _default is None:
        _default = Registry.standard()
    return _default


def install(registry: Registry) -> Registry:
    """Make `registry` the process's default (a composition root that made its own)."""
    global _default
    _default = registry
    return registry


def load() -> list[str]:
    """Make the process's registry now (the services call this at start, so that the log says
    at once which experiments they serve); the registered names."""
    return default().names()


def get(name: str) -> Registered:
    return default().get(name)


def names() -> list[str]:
    return default().names()


def source(name: str) -> str:
    return default().source(name)


def failures() -> dict[str, str]:
    return default().failures()


def register(plugin: Any) -> Registered:
    """Add an experiment: to the registry loading plug-ins when a module named alone in
    CANOPY_EXPERIMENT_MODULES calls this while it loads, else to the process's default."""
    return register_while_loading(plugin) or default().register(plugin)


def declared(experiment: Any, params: Params) -> Decision | None:
    """What `experiment` declares a decision to be for these params (`Registered.declared`)."""
    return wrap(experiment).declared(params)


def declared_json(experiment: Any, params: Params) -> dict[str, Any] | None:
    """The declaration as JSON, None when none or the hook failed (`Registered.declared_json`)."""
    return wrap(experiment).declared_json(params)


def check_input(experiment: Any, decision: Any, params: Params) -> str | None:
    """Whether an input on `decisions` is acceptable (`Registered.validate`)."""
    return wrap(experiment).validate(decision, params)


def shown_values(
    experiment: Any, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Params
) -> dict[str, float | dict[str, float]]:
    """The `shown` values, checked (`Registered.shown`)."""
    return wrap(experiment).shown(decisions, roles, params)
