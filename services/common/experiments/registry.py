"""The registry of experiments, and the wrapper that gives every plug-in the whole API.

A `Registry` is an object: `Registry.standard()` makes what a service serves (the built-ins,
then the plug-ins), `Registry.builtin()` the built-ins alone; nothing is registered when a
module is imported. Plug-ins come from every entry point of the `canopy.experiments` group
(an installed package's `[project.entry-points."canopy.experiments"]`, naming a class or an
instance) and from each `module:attribute` of CANOPY_EXPERIMENT_MODULES (comma-separated; a
module named alone calls `services.common.experiments.register()` itself while it loads).

Loading is logged once per registry: one line naming every experiment and where it came
from, and an error with its traceback for each plug-in that failed to load or to register.
Such a plug-in is left out and listed in `failures()` (the 422 of a session of it, `GET
/api/experiments` and `canopy experiments` name it), and the others are served: a service that
stopped instead would take down every study on it for one broken package.

`Registered` wraps each plug-in: it fills in the optional hooks the plug-in left out (each
answering as its absence always meant) and hands the plug-in `params` in the form it asked
for (`api.HookParams`), so the services call every hook of `api.Experiment` unconditionally.
The hooks a group calls per input are also bound as the plug-in takes them (`hooks`,
`api.Hooks`), for a caller that holds the params in the plug-in's form already.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import os
import types
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from importlib.metadata import entry_points
from typing import Any

from pydantic import BaseModel

from services.common.decision import Decision
from services.common.experiments.api import Base, Hooks, Outcome, Params, is_number

log = logging.getLogger("services.common.experiments")

ENTRY_POINT_GROUP = "canopy.experiments"
MODULES_ENV = "CANOPY_EXPERIMENT_MODULES"
# What every experiment has (`api.Plugin`); `validate` may be left out by one that declares
# its `decision`. The rest is optional: `Registered` answers for what a plug-in left out.
REQUIRED = (
    "name",
    "channels",
    "params_model",
    "check_group",
    "initial_decision",
    "validate",
    "payoffs",
)


class PluginError(RuntimeError):
    """A plug-in experiment could not be loaded (the message says which and why)."""


class Registered:
    """One plug-in as the services call it (`api.Experiment`): the plug-in's own hooks where
    it has them, and where it has not what their absence always meant: `validate` checks the
    declared decision (or takes anything), `decision` and `shown` give nothing, `on_input`
    takes no channel (`own_channels` is empty), `initial_state` is `None`, `hello` adds nothing.

    The optional hooks are looked up once, here; every hook takes `params` as a dict or as the
    params model instance and hands the plug-in the form its `hook_params` asks for."""

    def __init__(self, plugin: Any) -> None:
        self.plugin: Any = plugin
        form = getattr(plugin, "hook_params", "dict")
        if form not in ("dict", "model"):
            raise PluginError(f"its hook_params is {form!r}, not 'dict' or 'model'")
        self._as_model = form == "model"
        self._validate: Callable[..., Any] | None = getattr(plugin, "validate", None)
        self._decision: Any = getattr(plugin, "decision", None)
        self._shown: Callable[..., Any] | None = getattr(plugin, "shown", None)
        self._initial_state: Callable[..., Any] | None = getattr(plugin, "initial_state", None)
        self._on_input: Callable[..., Outcome] | None = getattr(plugin, "on_input", None)
        self._hello: Callable[..., Any] | None = getattr(plugin, "hello", None)
        # The per-input hooks bound now, the plug-in's own where it has them: a group calls
        # them with params already in its form, with no call of this wrapper between (two
        # calls less per frame: about 0.25 µs of the 4-5 µs a plain decision costs).
        self.hooks = Hooks(
            validate=self._validate or self._declared_check,
            # Required (the loader refuses a plug-in without it); wrapped by hand, one
            # without it fails where its payoffs are asked for, as it always did.
            payoffs=getattr(plugin, "payoffs", None) or partial(_lacks, "payoffs"),
            on_input=self._on_input or _no_input,
        )
        self.event_payoffs = bool(getattr(plugin, "event_payoffs", False))
        page = getattr(plugin, "page", None)
        self.page: str | None = page if isinstance(page, str) and page else None

    def __repr__(self) -> str:
        return f"Registered({self.plugin!r})"

    # -- what it is ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return str(self.plugin.name)

    @property
    def channels(self) -> frozenset[str]:
        return frozenset(self.plugin.channels)

    @property
    def params_model(self) -> type[BaseModel]:
        model: type[BaseModel] = self.plugin.params_model
        return model

    @property
    def own_channels(self) -> frozenset[str]:
        if self._on_input is None:
            return frozenset()
        return self.channels - {"decisions"}

    @property
    def description(self) -> str:
        """Its `description` (a string), else its class docstring; "" for a dataclass's
        generated signature or the docstring of `api.Base` (nothing the researcher wrote)."""
        described = getattr(self.plugin, "description", None)
        if isinstance(described, str):
            return inspect.cleandoc(described)
        cls = type(self.plugin)
        doc = inspect.getdoc(cls) or ""
        if doc.startswith(f"{cls.__name__}(") or doc == inspect.getdoc(Base):
            return ""
        return doc

    # -- params ----------------------------------------------------------------------------

    def hook_params(self, params: Mapping[str, Any]) -> Params:
        """`params` (as the store keeps them: validated and dumped) in the form the plug-in's
        hooks get: the dict itself, or the model instance. Params the model refuses (a plug-in
        whose model changed since the session was made) are the model built without
        validation: the group still runs, and a hook that fails on them fails safely."""
        if not self._as_model:
            return params
        try:
            return self.params_model.model_validate(params)
        except Exception:  # a pydantic ValidationError, or a plug-in validator's own exception
            return self.params_model.model_construct(**params)

    def _params(self, params: Params) -> Any:
        if self._as_model:
            return params if isinstance(params, BaseModel) else self.hook_params(params)
        return params.model_dump(mode="json") if isinstance(params, BaseModel) else params

    # -- hooks -----------------------------------------------------------------------------

    def check_group(self, params: Params, group_size: int) -> tuple[str, str] | None:
        """The plug-in's answer for the params model instance (whatever its `hook_params`)."""
        if not isinstance(params, BaseModel):
            params = self.params_model.model_validate(params)
        problem: tuple[str, str] | None = self.plugin.check_group(params, group_size)
        return problem

    def initial_decision(self, id_in_group: int, params: Params) -> Any:
        return self.plugin.initial_decision(id_in_group, self._params(params))

    def validate(self, decision: Any, params: Params) -> str | None:
        """Whether an input on `decisions` is acceptable: the plug-in's own `validate` when it
        has one (it knows best), else its declared decision's check; an experiment with
        neither takes any JSON value. Raises what the hooks raise."""
        return self.hooks.validate(decision, self._params(params))

    def _declared_check(self, decision: Any, params: Any) -> str | None:
        """`validate` of a plug-in without one: its declared decision's check, or None."""
        declaration = self.declared(params)
        return None if declaration is None else declaration.check(decision)

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Params
    ) -> dict[str, float]:
        paid: dict[str, float] = self.plugin.payoffs(decisions, roles, self._params(params))
        return paid

    def declared(self, params: Params) -> Decision | None:
        """What it declares a decision to be for these params (its `decision` attribute, or
        the hook's answer), None when it declares nothing. Raises when the hook raises or
        gives something else than a `Decision` (or its JSON)."""
        found = self._decision
        if callable(found):
            found = found(self._params(params))
        if found is None or isinstance(found, Decision):
            return found
        if isinstance(found, Mapping):
            return Decision.model_validate(found)
        raise TypeError(f"decision is {type(found).__name__}, not a Decision")

    def declared_json(self, params: Params) -> dict[str, Any] | None:
        """The declaration as the page and `GET /api/experiments` get it; None when there is
        none or the hook failed (logged: the generic page then falls back to a text box)."""
        try:
            decision = self.declared(params)
        except Exception as exc:
            log.error("experiment %r: its decision hook failed: %r", self.name, exc, exc_info=exc)
            return None
        return None if decision is None else decision.model_dump(mode="json")

    def shown(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Params
    ) -> dict[str, float | dict[str, float]]:
        """What the plug-in's `shown` hook gives for these decisions, checked: each name of
        its declared `shows` maps to a finite number (the same for everyone) or code →
        number; names it does not declare are left out. {} without the hook. Raises when the
        hook fails."""
        if self._shown is None:
            return {}
        declaration = self.declared(params)
        names = {s.name for s in declaration.shows} if declaration is not None else set()
        result = self._shown(decisions, roles, self._params(params))
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

    def initial_state(self, params: Params) -> Any:
        if self._initial_state is None:
            return None
        return self._initial_state(self._params(params))

    def on_input(
        self,
        state: Any,
        participant: str,
        id_in_group: int,
        seq: int,
        channel: str,
        payload: Any,
        params: Params,
    ) -> Outcome:
        """One input on one of `own_channels`; without the hook there are none (and an input
        it is handed anyway changes nothing)."""
        return self.hooks.on_input(
            state, participant, id_in_group, seq, channel, payload, self._params(params)
        )

    def hello(self, state: Any) -> dict[str, Any]:
        return {} if self._hello is None else dict(self._hello(state))


def _lacks(hook: str, *_: Any) -> Any:
    raise AttributeError(f"the experiment has no {hook!r}")


def _no_input(state: Any, *_: Any) -> Outcome:
    """`on_input` of a plug-in without channels of its own: the input changes nothing."""
    return Outcome(state)


def _finite_value(value: Any, name: str) -> float:
    if not is_number(value):
        raise ValueError(f"shown {name!r}: {value!r} is not a finite number")
    return float(value)


def wrap(experiment: Any) -> Registered:
    """`experiment` as the services call it: itself when registered already, else wrapped
    (a plug-in handed straight to what takes an experiment, as tests and bots do)."""
    return experiment if isinstance(experiment, Registered) else Registered(experiment)


# The registry whose plug-ins are loading, and the source of the one loading now: a module
# named alone in CANOPY_EXPERIMENT_MODULES registers its experiments itself, into it. What such
# a module registered is kept by source: a module is imported once per process, so a registry
# made later gets its experiments from here.
_loading: list[tuple[Registry, str]] = []
_self_registered: dict[str, list[Any]] = {}


def register_while_loading(plugin: Any) -> Registered | None:
    """Register `plugin` into the registry loading the module that calls this (a module named
    alone); None when no registry is loading one."""
    if not _loading:
        return None
    registry, where = _loading[-1]
    _self_registered.setdefault(where, []).append(plugin)
    return registry.register(plugin, source=where)


class Registry:
    """Experiments by name, each with its source, and the plug-ins that failed to load."""

    def __init__(self) -> None:
        self._experiments: dict[str, Registered] = {}
        self._sources: dict[str, str] = {}  # name → "built-in", "entry point …", …
        self._failures: dict[str, str] = {}  # plug-in spec → why it is not registered

    @classmethod
    def builtin(cls) -> Registry:
        """The built-in experiments only (on the plug-ins' surface, nothing more)."""
        from services.common.experiments.bimatrix import Bimatrix
        from services.common.experiments.decisions import PlainDecisions
        from services.common.experiments.double_auction import DoubleAuction
        from services.common.experiments.public_goods import PublicGoods

        registry = cls()
        for plugin in (PlainDecisions(), Bimatrix(), PublicGoods(), DoubleAuction()):
            registry.register(plugin, source="built-in")
        return registry

    @classmethod
    def standard(cls) -> Registry:
        """What a service serves: the built-ins, then the plug-ins (logged)."""
        registry = cls.builtin()
        registry.load_plugins()
        return registry

    def extended(self, *plugins: Any) -> Registry:
        """A copy of this registry with `plugins` registered too (a test's own experiments)."""
        copy = Registry()
        copy._experiments, copy._sources = dict(self._experiments), dict(self._sources)
        copy._failures = dict(self._failures)
        for plugin in plugins:
            copy.register(plugin)
        return copy

    def register(self, plugin: Any, source: str | None = None) -> Registered:
        """Add an experiment. A name may be registered once: a plug-in cannot replace another
        (the same plug-in named twice, by entry point and setting, is registered once)."""
        experiment = wrap(plugin)
        known = self._experiments.get(experiment.name)
        if known is not None and type(known.plugin) is type(experiment.plugin):
            return known
        if known is not None:
            raise PluginError(f"an experiment named {experiment.name!r} is registered already")
        self._experiments[experiment.name] = experiment
        self._sources[experiment.name] = source or f"module {type(experiment.plugin).__module__}"
        return experiment

    def get(self, name: str) -> Registered:
        """The experiment `name`; KeyError when none is registered under it."""
        return self._experiments[name]

    def __contains__(self, name: object) -> bool:
        return name in self._experiments

    def names(self) -> list[str]:
        return sorted(self._experiments)

    def source(self, name: str) -> str:
        """Where experiment `name` came from: "built-in", "entry point <module:attr>,
        <distribution> <version>", "CANOPY_EXPERIMENT_MODULES <module:attr>", or "module
        <name>" (a module that called `register()` itself, outside a load)."""
        return self._sources[name]

    def failures(self) -> dict[str, str]:
        """The plug-ins that failed to load (spec → error): they are left out, and logged."""
        return dict(self._failures)

    def load_plugins(self) -> None:
        """Load the plug-ins (see the module's docstring) and log what this registry holds."""
        targets = [
            (f"entry point {ep.value}{_distribution(ep)}", ep.value, ep.load)
            for ep in entry_points(group=ENTRY_POINT_GROUP)
        ]
        for spec in filter(None, (s.strip() for s in os.environ.get(MODULES_ENV, "").split(","))):
            targets.append((f"{MODULES_ENV} {spec}", spec, partial(_import, spec)))
        for where, spec, load_target in targets:
            try:
                with self._loading_from(where):
                    found = load_target()
                    if isinstance(found, types.ModuleType):
                        # A module named alone registered its experiments itself as it was
                        # imported (for an earlier registry, if it was imported before).
                        for plugin in _self_registered.get(where, []):
                            self.register(plugin, source=where)
                        continue
                    plugin = found() if isinstance(found, type) else found
                    _check_required(plugin)
                    self.register(plugin, source=where)
            except Exception as exc:
                self._failures[spec] = repr(exc)
                log.error(
                    "experiment plug-in %r failed to load, left out (%s): %r",
                    spec,
                    where,
                    exc,
                    exc_info=exc,
                )
        log.info(
            "experiments: %s",
            ", ".join(f"{name} ({self._sources[name]})" for name in self.names()),
        )

    @contextmanager
    def _loading_from(self, where: str) -> Iterator[None]:
        _loading.append((self, where))
        try:
            yield
        finally:
            _loading.pop()


_ABSENT = object()


def _check_required(plugin: Any) -> None:
    """Refuse a plug-in without one of `REQUIRED` (present, even as `None`, is enough)."""
    for attribute in REQUIRED:
        if attribute == "validate" and getattr(plugin, "decision", None) is not None:
            continue  # inputs are checked against the declared decision
        if getattr(plugin, attribute, _ABSENT) is _ABSENT:
            raise PluginError(f"it has no {attribute!r}")


def _distribution(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    return f", {dist.name} {dist.version}" if dist is not None else ""


def _import(spec: str) -> Any:
    module, _, attribute = spec.partition(":")
    loaded = importlib.import_module(module)
    return getattr(loaded, attribute) if attribute else loaded
