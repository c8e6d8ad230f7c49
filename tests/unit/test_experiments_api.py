"""The typed plug-in API (issue 22, services/common/experiments/): hooks get the params in the
form the plug-in asks for (the model instance for `hook_params = "model"`, as `Base` and the
built-ins say; the dict, with defaults filled in, for a plug-in that does not say, as every
plug-in written before); the registry's wrapper gives every plug-in every hook, so no caller
asks whether a hook exists; and the registry is an object, made by whoever needs one, not a
global filled at import."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, cast

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel, ConfigDict, Field

from services.common import experiments
from services.common.decision import Decision, Number, Shown
from services.common.directory import GroupConfig
from services.common.experiments import Base, Outcome, PluginError, Registry, wrap
from services.common.group import Broadcast, GroupState
from services.store.api import api_router, install_error_handlers
from services.store.metrics import StoreMetrics
from tests.conftest import PLUGINS_SITE

ROOT = Path(__file__).resolve().parents[2]


class GameParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    top: Annotated[float, Field(gt=0)] = 10.0
    bonus: float = 1.0


class Recorder:
    """Writes down what `params` each hook got."""

    def __init__(self) -> None:
        self.got: dict[str, Any] = {}

    def saw(self, hook: str, params: Any, name: str) -> float:
        """Note `params`, and give its `name` field (from the model or the dict)."""
        self.got[hook] = params
        return float(getattr(params, name) if isinstance(params, BaseModel) else params[name])


class TypedGame(Base[GameParams]):
    """A typed plug-in: its hooks get `GameParams`."""

    name = "typed_game"
    channels = frozenset({"decisions", "notes"})
    params_model = GameParams

    def __init__(self) -> None:
        self.recorder = Recorder()

    def check_group(self, params: GameParams, group_size: int) -> tuple[str, str] | None:
        self.recorder.saw("check_group", params, "top")
        return None

    def initial_decision(self, id_in_group: int, params: GameParams) -> Any:
        return self.recorder.saw("initial_decision", params, "top") / 2

    def validate(self, decision: Any, params: GameParams) -> str | None:
        top = self.recorder.saw("validate", params, "top")
        return None if isinstance(decision, int | float) and 0 <= decision <= top else "no"

    def decision(self, params: GameParams) -> Decision:
        top = self.recorder.saw("decision", params, "top")
        return Decision(input=Number(min=0, max=top), shows=[Shown(name="sum", label="Sum")])

    def shown(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: GameParams
    ) -> dict[str, Any]:
        self.recorder.saw("shown", params, "top")
        return {"sum": float(sum(decisions.values()))}

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: GameParams
    ) -> dict[str, float]:
        bonus = self.recorder.saw("payoffs", params, "bonus")
        return {code: float(value) + bonus for code, value in decisions.items()}

    def initial_state(self, params: GameParams) -> Any:
        self.recorder.saw("initial_state", params, "top")
        return []

    def on_input(
        self,
        state: Any,
        participant: str,
        id_in_group: int,
        seq: int,
        channel: str,
        payload: Any,
        params: GameParams,
    ) -> Outcome:
        self.recorder.saw("on_input", params, "top")
        return Outcome([*state, payload], [("notes", payload)])


class DictGame(TypedGame):
    """The same hooks asking for the dict (what a plug-in that does not say gets, as every
    plug-in written before typed hooks): every hook but `check_group` gets the dumped dict."""

    name = "dict_game"
    hook_params = "dict"  # what a plug-in that does not inherit `Base` gets by default


def config(game: Any, params: dict[str, Any]) -> GroupConfig:
    return GroupConfig(
        session="s",
        group="g",
        experiment=game.name,
        members=["a", "b"],
        num_periods=1,
        period_length=10.0,
        num_subperiods=0,
        rate_limit=0.0,
        params=params,
    )


def play(game: Any) -> GroupState:
    """A group of `game` (params: only `top` given) through a period's start, a decision and
    an input on its own channel."""
    state = GroupState(config(game, {"top": 4}), game)
    for code in ("a", "b"):
        state.on_presence(code, f"c-{code}", connected=True)
    state.on_timer("period_start", 1, 0, ends_at=110.0, now=100.0)
    assert state.on_frame("a", 1, "decisions", 3, now=101.0) == [
        Broadcast("group_decisions", {"a": 3, "b": 2.0})
    ]
    assert state.on_frame("b", 1, "notes", "hi", now=102.0) == [Broadcast("notes", "hi")]
    assert state.market == ["hi"]
    assert state.flow == {"a": 4.0, "b": 3.0}  # the default bonus, filled in
    return state


def test_a_plug_in_that_asks_for_the_model_gets_the_instance_in_every_hook() -> None:
    game = TypedGame()
    state = play(game)
    wrapped = state.experiment
    assert wrapped.shown({"a": 1, "b": 2}, {"a": 1, "b": 2}, {"top": 4}) == {"sum": 3.0}
    assert wrapped.check_group({"top": 4}, 2) is None
    want = GameParams(top=4)
    assert set(game.recorder.got) == {
        "check_group",
        "initial_decision",
        "validate",
        "decision",
        "shown",
        "payoffs",
        "initial_state",
        "on_input",
    }
    for hook, params in game.recorder.got.items():
        assert params == want, hook  # the model, defaults filled in
        assert type(params) is GameParams, hook


def test_a_plug_in_that_does_not_say_keeps_getting_the_dict() -> None:
    game = DictGame()
    play(game)
    wrap(game).shown({"a": 1}, {"a": 1}, GameParams(top=4))  # a caller's model: dumped for it
    wrap(game).check_group({"top": 4}, 2)
    for hook, params in game.recorder.got.items():
        if hook == "check_group":
            assert params == GameParams(top=4), hook  # the one hook that always gets the model
        else:
            assert params == {"top": 4.0, "bonus": 1.0}, hook  # defaults filled in
            assert type(params) is dict, hook


def test_a_plug_in_without_hook_params_is_a_dict_plug_in() -> None:
    class Old:
        name = "old"
        channels = frozenset({"decisions"})
        params_model = GameParams

        def check_group(self, params: BaseModel, group_size: int) -> None:
            return None

        def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
            return params["top"]  # indexes the dict, as plug-ins do

        def validate(self, decision: Any, params: Mapping[str, Any]) -> None:
            return None

        def payoffs(
            self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
        ) -> dict[str, float]:
            return {code: params["bonus"] for code in decisions}

    old: Any = Old()  # a plug-in handed in as is: the group wraps it
    state = GroupState(config(old, {}), old)
    assert state.decisions == {"a": 10.0, "b": 10.0}
    assert state.hook_params == {"top": 10.0, "bonus": 1.0}
    assert wrap(Old()).payoffs({"a": 1}, {"a": 1}, GameParams(bonus=3)) == {"a": 3.0}


def test_the_example_plug_in_of_the_docs_plays_as_before() -> None:
    """tests/plugins/site/canopy_min_effort, unchanged: `MinEffortParams(**params)` in its
    hooks needs the dict."""
    path = PLUGINS_SITE / "canopy_min_effort" / "__init__.py"
    spec = importlib.util.spec_from_file_location("canopy_min_effort_under_test", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    game = module.MinEffort()
    state = GroupState(config(game, {"max_effort": 5}), game)
    state.on_presence("a", "c-a", connected=True)
    state.on_presence("b", "c-b", connected=True)
    state.on_timer("period_start", 1, 0, ends_at=110.0, now=100.0)
    assert state.flow == {"a": 2 * 1 - 1 + 6.0, "b": 7.0}
    state.on_frame("a", 1, "decisions", 3, now=101.0)
    assert state.flow == {"a": 2 * 1 - 3 + 6.0, "b": 7.0}
    (refused,) = state.on_frame("b", 1, "decisions", 6, now=102.0)
    assert isinstance(refused, Broadcast)
    assert refused.payload["message"] == "an effort is a whole number from 1 to 5"


def test_the_built_ins_get_their_models_and_take_either_form_from_callers() -> None:
    bimatrix = experiments.get("bimatrix")
    roles = {"r": 1, "c": 2}
    for params in ({"game": "stag_hunt"}, experiments.BimatrixParams(game="stag_hunt")):
        assert bimatrix.payoffs({"r": 1.0, "c": 1.0}, roles, params) == {"r": 4.0, "c": 4.0}
    assert bimatrix.hook_params({"game": "stag_hunt"}) == experiments.BimatrixParams(
        game="stag_hunt"
    )
    goods = experiments.get("public_goods")
    assert goods.validate(25, {"endowment": 30.0, "mpcr": 0.4}) is None
    assert goods.validate(25, {}) == "a contribution must be a number in [0, 20]"


def test_params_the_model_refuses_still_reach_a_typed_plug_in_as_stored() -> None:
    """A session stored before the plug-in's model changed: the group runs on the model built
    without validation, as a dict plug-in gets the stored dict (group.validated_params)."""
    game: Any = TypedGame()
    state = GroupState(config(game, {"top": -1, "bonus": 2}), game)
    assert state.hook_params.top == -1 and state.hook_params.bonus == 2


def test_every_hook_is_there_for_a_plug_in_with_only_the_required_ones() -> None:
    class Minimal:
        """A game with only what every plug-in has."""

        name = "minimal"
        channels = frozenset({"decisions", "chat"})
        params_model = GameParams

        def check_group(self, params: BaseModel, group_size: int) -> None:
            return None

        def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
            return None

        def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
            return None

        def payoffs(
            self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
        ) -> dict[str, float]:
            return {}

    game = wrap(Minimal())
    assert game.own_channels == frozenset()  # "chat" without `on_input`: not its own
    assert game.initial_state({}) is None and game.hello(None) == {}
    assert game.declared({}) is None and game.declared_json({}) is None
    assert game.shown({"a": 1}, {"a": 1}, {}) == {}
    assert game.on_input([1], "a", 1, 1, "chat", "x", {}) == Outcome([1])
    assert not game.event_payoffs and game.page is None
    assert game.description == "A game with only what every plug-in has."
    assert wrap(game) is game
    # In a group: a frame on "chat" changes nothing and gets no answer, as before.
    minimal: Any = Minimal()
    state = GroupState(config(minimal, {}), minimal)
    state.on_timer("period_start", 1, 0, ends_at=110.0, now=100.0)
    assert state.on_frame("a", 1, "chat", "hello", now=101.0) == []
    assert "book" not in state.hello("a") and state.market is None


def test_a_group_calls_the_plug_ins_own_per_input_hooks_with_nothing_between() -> None:
    """The hooks a group calls per input are the plug-in's own, bound when it is registered
    (`Registered.hooks`): no wrapper's call between the state machine and the plug-in."""
    callers: dict[str, str] = {}

    class Watched(TypedGame):
        def validate(self, decision: Any, params: GameParams) -> str | None:
            callers["validate"] = sys._getframe(1).f_code.co_qualname
            return super().validate(decision, params)

        def payoffs(
            self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: GameParams
        ) -> dict[str, float]:
            callers["payoffs"] = sys._getframe(1).f_code.co_qualname
            return super().payoffs(decisions, roles, params)

        def on_input(self, state: Any, *args: Any) -> Outcome:
            callers["on_input"] = sys._getframe(1).f_code.co_qualname
            return super().on_input(state, *args)

    game = Watched()
    hooks = wrap(game).hooks
    assert (hooks.validate, hooks.payoffs, hooks.on_input) == (
        game.validate,
        game.payoffs,
        game.on_input,
    )
    play(game)
    assert callers == {
        "validate": "GroupState._apply_frame",
        "payoffs": "GroupState._payoffs",
        "on_input": "GroupState._on_own_channel",
    }
    # Called as the services call them otherwise (either form of params), the same hooks.
    registered = wrap(game)
    assert registered.validate(5, {"top": 4}) == "no"
    assert registered.validate(3, GameParams()) is None
    assert callers["validate"] == "Registered.validate"


def test_the_hooks_a_plug_in_left_out_answer_as_their_absence_means() -> None:
    class Declaring(DictGame):
        validate = None  # type: ignore[assignment]  # its declared decision checks inputs
        on_input = None  # type: ignore[assignment]

    hooks = wrap(Declaring()).hooks
    assert hooks.validate(3, {"top": 4}) is None
    assert hooks.validate(5, {"top": 4}) == "a decision is a number from 0 to 4"
    assert hooks.on_input(["kept"], "a", 1, 1, "notes", "x", {}) == Outcome(["kept"])


def test_hook_params_is_dict_or_model() -> None:
    class Odd(DictGame):
        hook_params = "json"  # type: ignore[assignment]

    with pytest.raises(PluginError, match="hook_params is 'json'"):
        Registry().register(Odd())


def test_a_registry_is_an_object_of_its_own() -> None:
    one, two = Registry.builtin(), Registry.builtin()
    assert one.names() == ["bimatrix", "decisions", "double_auction", "public_goods"]
    one.register(TypedGame())
    assert "typed_game" in one and "typed_game" not in two
    assert "typed_game" not in experiments.names()
    assert one.source("typed_game") == f"module {__name__}"
    extended = two.extended(DictGame())
    assert "dict_game" in extended and "dict_game" not in two

    class Taken(DictGame):
        name = "bimatrix"

    with pytest.raises(PluginError, match="registered already"):
        one.register(Taken())


def test_nothing_is_registered_at_import_and_a_later_registry_finds_self_registered_ones() -> None:
    probe = (
        "import json; from services.common import experiments as e; "
        "empty = e._default is None; first = e.default(); "
        "second = e.Registry.standard(); "
        "print(json.dumps({'empty_at_import': empty, 'first': first.names(), "
        "'second': second.names(), 'source': second.source('self_registered')}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")} | {
        "PYTHONPATH": os.pathsep.join(
            [str(PLUGINS_SITE), str(PLUGINS_SITE.parent / "selfreg"), str(ROOT)]
        ),
        "CANOPY_EXPERIMENT_MODULES": "selfreg",
    }
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["empty_at_import"]
    assert "self_registered" in found["first"] and found["first"] == found["second"]
    assert found["source"] == "CANOPY_EXPERIMENT_MODULES selfreg"


def test_no_service_asks_whether_an_experiment_has_a_hook() -> None:
    """The wrapper answers for what a plug-in left out: `hasattr` / `getattr(..., None)` on an
    experiment stays inside the registry (which looks the optional hooks up once)."""
    asked = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        if path.parent.name == "experiments":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if re.search(r"(hasattr|getattr)\([^)]*experiment", line):
                asked.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert asked == []


def test_no_service_module_reaches_a_registry_of_the_process() -> None:
    """Each composition root makes its service's registry and hands it down: no module of
    services/ imports the module-level default (`experiments.get`, `names`, `default`, …),
    but the bots' library API for scripts (services/bots/strategies.py: `make_strategy` by
    name without a registry). A name `experiments` elsewhere is a registry handed in."""
    default = re.compile(
        r"from services\.common import (\w+, )*experiments\b|import services\.common\."
        r"experiments\b|from services\.common\.experiments import [^\n]*\b(get|names|source|"
        r"failures|default|install|load|declared|declared_json|check_input|shown_values)\b"
    )
    reached = []
    for path in sorted((ROOT / "services").rglob("*.py")):
        if path.parent.name == "experiments":
            continue
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if default.search(line):
                reached.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert [r.split(":")[0] for r in reached] == ["services/bots/strategies.py"], reached


async def test_the_store_api_serves_the_registry_it_is_handed() -> None:
    registry = Registry.builtin().extended(TypedGame())
    app = FastAPI()
    install_error_handlers(app)  # the API's 422: {"error": {"code", "message", "field"}}
    created: list[dict[str, Any]] = []

    class Sessions:
        async def create_session(self, layout: dict[str, Any]) -> None:
            created.append(layout)

    router = api_router(
        cast(Any, Sessions()),  # what POST /api/sessions writes; GET /api/experiments reads none
        StoreMetrics(),
        "http://gateway.test",
        "t" * 32,
        b"k" * 32,
        max_sessions_per_minute=3,
        registry=registry,
    )
    app.include_router(router)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://store.test") as http:
        answer = await http.get("/api/experiments", headers={"Authorization": "Bearer " + "t" * 32})
    assert answer.status_code == 200
    listed = {e["name"]: e for e in answer.json()["experiments"]}
    assert sorted(listed) == [*registry.names()]
    typed = listed["typed_game"]
    assert typed["description"] == "A typed plug-in: its hooks get `GameParams`."
    assert typed["source"] == f"module {__name__}"
    assert typed["decision"]["input"]["max"] == 10.0  # its hook got the default model
    assert typed["min_group_size"] == 1 and answer.json()["failures"] == []
    schema = answer.json()["session_schema"]
    assert schema["properties"]["experiment"]["enum"] == registry.names()
    # A session of it is one this store makes (its params checked by its model), and the
    # refusal of an unknown one names it among the known.
    body = {"experiment": "typed_game", "num_participants": 2, "group_size": 2}
    async with httpx.AsyncClient(transport=transport, base_url="http://store.test") as http:
        auth = {"Authorization": "Bearer " + "t" * 32}
        made = await http.post("/api/sessions", json=body | {"period_length": 5}, headers=auth)
        bad = await http.post(
            "/api/sessions",
            json=body | {"period_length": 5, "params": {"top": -1}},
            headers=auth,
        )
        unknown = await http.post(
            "/api/sessions", json=body | {"experiment": "nope", "period_length": 5}, headers=auth
        )
    assert made.status_code == 201, made.text
    assert created[0]["session"]["params"] == {"top": 10.0, "bonus": 1.0}
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "params.top"
    assert unknown.status_code == 422 and "typed_game" in unknown.json()["error"]["message"]
