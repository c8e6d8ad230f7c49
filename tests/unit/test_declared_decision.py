"""A declared decision (issue 21): the vocabulary of services/common/decision.py, what the
built-ins declare, the check of inputs of an experiment without `validate` (in the group's
state, as the decisions service runs it), the `shown` values, a plug-in that leaves out
`validate`, and what the gateway gives the generic page (its config, POST /p/{key}/view)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from pydantic import ValidationError

from services.common import experiments
from services.common.decision import Choice, Compound, Decision, Mix, Number, Option, Shown
from services.common.directory import GroupConfig, NotFound, ParticipantInfo
from services.common.group import Broadcast, GroupState
from services.common.messages import lobby_group
from services.common.seats import new_key
from services.gateway.pages import declared_decision, page_router
from services.gateway.view import Buckets, view_of
from services.store.api import experiment_info
from tests.unit.cournot_plugin import cournot

COURNOT = {"a": 60.0, "cost": 6.0, "max_quantity": 50.0}


# ---- the vocabulary ---------------------------------------------------------------------


def test_a_number_checks_range_and_step_and_bots_get_its_grid() -> None:
    quantity = Number(min=0, max=10, step=0.5, unit="units", label="Your quantity")
    decision = Decision(input=quantity)
    assert decision.check(2.5) is None and decision.check(10) is None
    assert decision.check(11) == "a decision is a number from 0 to 10 units"
    assert decision.check(2.3) == "a decision is a number from 0 to 10 units, in steps of 0.5"
    for bad in ("3", True, None, float("nan"), [1]):
        assert decision.check(bad) is not None
    assert quantity.grid() == [k / 2 for k in range(21)]
    assert len(Number(min=0, max=1000).grid()) == 101
    assert quantity.snap(3.26) == 3.5 and quantity.snap(-4) == 0 and quantity.snap(99) == 10
    rng = random.Random(1)
    assert all(quantity.check(quantity.sample(rng)) is None for _ in range(200))


def test_choices_mixes_and_compounds() -> None:
    choice = Choice(options=[Option(value="a", label="A"), Option(value=1, label="one")])
    assert choice.check("a") is None and choice.check(1.0) is None
    assert choice.check(True) is not None and choice.check("b") is not None
    mix = Mix(actions=["Rock", "Paper", "Scissors"])
    assert mix.check([0.2, 0.3, 0.5]) is None
    assert mix.check([0.5, 0.5, 0.1]) == "3 probabilities (Rock, Paper, Scissors) summing to 1"
    assert mix.check([1.5, -0.5, 0]) is not None and mix.check(0.5) is not None
    first = Mix(actions=["Stag", "Hare"], form="first")
    assert first.check(0.3) is None and first.check(1.2) is not None
    order = Compound(fields={"price": Number(min=1, max=9), "side": choice})
    assert order.check({"price": 2, "side": "a"}) is None
    assert order.check({"price": 0, "side": "a"}) == "price: a number from 1 to 9"
    assert order.check({"price": 2}) == "an object with price, side"
    assert 0 < len(order.grid()) <= 2_000
    rng = random.Random(2)
    for kind in (choice, mix, first, order):
        assert all(kind.check(kind.sample(rng)) is None for _ in range(100)), kind
        assert all(kind.check(value) is None for value in kind.grid()), kind


@pytest.mark.parametrize(
    "bad",
    [
        {"input": {"kind": "number", "min": 5, "max": 5}},
        {"input": {"kind": "number", "min": 0, "max": 1, "step": 0}},
        {"input": {"kind": "choice", "options": [{"value": 1, "label": "a"}]}},
        {"input": {"kind": "choice", "options": [{"value": 1, "label": "a"}] * 2}},
        {"input": {"kind": "mix", "actions": ["a", "b", "c"], "form": "first"}},
        {"input": {"kind": "slider"}},
        {"input": {"kind": "number", "min": 0, "max": 1}, "shows": [{"name": "a b", "label": "x"}]},
    ],
)
def test_a_declaration_that_cannot_work_is_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Decision.model_validate(bad)


def test_a_declaration_is_json_and_back() -> None:
    decision = Decision(
        input=Compound(fields={"m": Mix(actions=["x", "y"]), "n": Number(min=0, max=2)}),
        instructions="Choose.",
        shows=[Shown(name="price", label="Price", unit="€")],
    )
    dumped = decision.model_dump(mode="json")
    assert Decision.model_validate(json.loads(json.dumps(dumped))) == decision


# ---- what the built-ins declare ---------------------------------------------------------


def test_the_built_ins_declare_their_decisions_on_the_same_surface() -> None:
    plain = experiments.declared(experiments.get("decisions"), {})
    assert plain is not None and isinstance(plain.input, Number)
    assert (plain.input.min, plain.input.max, plain.input.step) == (0, 1, 0.01)
    hunt = experiments.declared(experiments.get("bimatrix"), {"game": "stag_hunt"})
    assert hunt is not None and hunt.input == Mix(
        actions=["Stag", "Hare"], form="first", label="How often you play Stag"
    )
    matrix = {"payoff_matrix": [[[1, 1], [0, 0]], [[0, 0], [1, 1]]]}
    own = experiments.declared(experiments.get("bimatrix"), matrix)
    assert own is not None and isinstance(own.input, Mix) and own.input.actions == ["A", "B"]
    goods = experiments.declared(experiments.get("public_goods"), {"endowment": 30, "mpcr": 0.5})
    assert goods is not None and isinstance(goods.input, Number)
    assert (goods.input.max, goods.input.step, goods.input.unit) == (30, 0.1, "points")
    assert [s.name for s in goods.shows] == ["total", "kept"]
    assert experiments.declared(experiments.get("double_auction"), {}) is None  # its channels
    # `GET /api/experiments` gives each one's, for its default params.
    builtin = experiments.Registry.builtin()
    assert experiment_info("public_goods", builtin)["decision"]["input"]["max"] == 20.0
    assert experiment_info("double_auction", builtin)["decision"] is None


def test_public_goods_shows_the_total_and_what_each_keeps() -> None:
    goods = experiments.get("public_goods")
    shown = experiments.shown_values(
        goods, {"a": 5, "b": 10}, {"a": 1, "b": 2}, {"endowment": 20, "mpcr": 0.4}
    )
    assert shown == {"total": 15.0, "kept": {"a": 15.0, "b": 10.0}}


# ---- inputs checked against the declaration -----------------------------------------------


def group(experiment: Any, params: dict[str, Any]) -> GroupState:
    config = GroupConfig(
        session="s",
        group="g",
        experiment=experiment.name,
        members=["a", "b"],
        num_periods=1,
        period_length=10.0,
        num_subperiods=0,
        rate_limit=0.0,
        params=params,
    )
    state = GroupState(config, experiment)
    for code in ("a", "b"):
        state.on_presence(code, f"c-{code}", connected=True)
    state.on_timer("period_start", 1, 0, ends_at=110.0, now=100.0)
    return state


def test_an_experiment_without_validate_has_its_inputs_checked_against_its_declaration() -> None:
    game = cournot()
    assert not hasattr(game, "validate")
    state = group(game, COURNOT)
    (refused,) = state.on_frame("a", 1, "decisions", 70, now=101.0)
    assert refused == Broadcast(
        "error",
        {
            "code": "invalid_decision",
            "message": "a decision is a number from 0 to 50 units",
            "seq": 1,
        },
        participant="a",
        seq=1,
    )
    assert state.decisions["a"] == 0.0  # nothing changed
    assert state.on_frame("a", 2, "decisions", 12.5, now=101.5) == [
        Broadcast("group_decisions", {"a": 12.5, "b": 0.0})
    ]
    # An experiment's own `validate` still decides where it has one: the plain relay takes
    # any number, though its page offers 0 to 1.
    plain = group(experiments.get("decisions"), {})
    assert plain.on_frame("a", 1, "decisions", 7, now=101.0) == [
        Broadcast("group_decisions", {"a": 7, "b": None})
    ]


def test_shown_values_are_the_declared_ones_and_finite() -> None:
    game = cournot()
    roles = {"a": 1, "b": 2}
    shown = experiments.shown_values(game, {"a": 10.0, "b": 20.0}, roles, COURNOT)
    assert shown == {"price": 30.0, "total": 30.0}

    class Odd:
        name = "odd"
        decision = Decision(input=Number(min=0, max=1), shows=[Shown(name="x", label="X")])

        def shown(self, *args: Any) -> dict[str, Any]:
            return {"x": float("inf"), "undeclared": 1}

    with pytest.raises(ValueError, match="not a finite number"):
        experiments.shown_values(Odd(), {"a": 0.5}, {"a": 1}, {})


MODULE_WITHOUT_VALIDATE = """
from pydantic import BaseModel, ConfigDict
from services.common.decision import Decision, Number

class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

class Declared:
    name = "declared"
    channels = frozenset({"decisions"})
    params_model = Params
    decision = Decision(input=Number(min=0, max=3, step=1))
    def check_group(self, params, size): return None
    def initial_decision(self, i, params): return 0
    def payoffs(self, decisions, roles, params): return {c: float(v) for c, v in decisions.items()}

class Undeclared(Declared):
    name = "undeclared"
    decision = None
"""


def test_a_plug_in_may_leave_out_validate_only_when_it_declares_its_decision(
    tmp_path: Path,
) -> None:
    (tmp_path / "declared_mod.py").write_text(MODULE_WITHOUT_VALIDATE)
    probe = (
        "import json; from services.common import experiments as e; e.load(); "
        "print(json.dumps({'names': e.names(), 'failures': e.failures(), "
        "'check': e.check_input(e.get('declared'), 1.5, {})}))"
    )
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")} | {
        "PYTHONPATH": f"{tmp_path}{os.pathsep}{root}",
        "CANOPY_EXPERIMENT_MODULES": "declared_mod:Declared,declared_mod:Undeclared",
    }
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert "declared" in found["names"]
    # `decision = None` declares nothing, so it still needs `validate`.
    assert "undeclared" not in found["names"]
    assert "has no 'validate'" in found["failures"]["declared_mod:Undeclared"]
    assert found["check"] == "a decision is a number from 0 to 3, in steps of 1"


# ---- what the gateway gives the generic page ----------------------------------------------


def test_the_page_config_carries_the_declaration() -> None:
    builtin = experiments.Registry.builtin()
    decision = declared_decision(builtin, "public_goods", {"endowment": 30.0, "mpcr": 0.4})
    assert decision is not None and decision["input"]["max"] == 30.0
    assert declared_decision(builtin, "double_auction", {}) is None
    assert declared_decision(builtin, "no_such_experiment", {}) is None


def cournot_group() -> GroupConfig:
    return GroupConfig(
        session="s",
        group="g1",
        experiment="cournot",
        members=["a", "b"],
        num_periods=1,
        period_length=60.0,
        num_subperiods=0,
        rate_limit=0.0,
        params=COURNOT,
    )


def test_the_view_is_what_the_experiments_hooks_make_of_the_decisions() -> None:
    game = experiments.wrap(cournot())
    status, body = view_of(game, cournot_group(), COURNOT, {"decisions": {"a": 12, "b": 20}})
    assert status == 200
    assert body == {"payoffs": {"a": 264.0, "b": 440.0}, "shown": {"price": 28.0, "total": 32.0}}
    status, body = view_of(game, cournot_group(), COURNOT, {"decisions": {"a": 70, "b": 20}})
    assert status == 422 and body["error"]["code"] == "invalid_decision"
    assert view_of(game, cournot_group(), COURNOT, {"nope": 1})[0] == 422


def test_each_key_asks_for_views_at_a_bounded_rate() -> None:
    buckets = Buckets(rate=10, burst=3)
    assert [buckets.take("k", now=0.0) for _ in range(4)] == [True, True, True, False]
    assert buckets.take("other", now=0.0)
    assert not buckets.take("k", now=0.05) and buckets.take("k", now=0.2)


class Seats:
    """The gateway's directory, answered from memory (the store's answers, as data)."""

    def __init__(self, seats: dict[str, ParticipantInfo], groups: dict[str, GroupConfig]) -> None:
        self.seats, self.groups = seats, groups

    async def seat(self, key: str) -> ParticipantInfo:
        if key not in self.seats:
            raise NotFound("unknown seat")
        return self.seats[key]

    async def group(self, group: str) -> GroupConfig:
        return self.groups[group]


async def test_the_view_route_answers_a_seat_of_a_group_and_refuses_the_rest() -> None:
    registry = experiments.Registry.builtin().extended(cournot())  # the gateway's
    secret = b"s" * 32
    key, lobby_key, stranger = new_key(secret), new_key(secret), new_key(secret)
    info = ParticipantInfo(
        participant="a", session="s", group="g1", id_in_group=1, experiment="cournot"
    )
    waiting = info.model_copy(update={"group": lobby_group("s"), "id_in_group": 0})
    directory = Seats({key: info, lobby_key: waiting}, {"g1": cournot_group()})
    app = FastAPI()
    app.include_router(page_router(directory, secret, registry))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
        ok = await http.post(f"/p/{key}/view", json={"decisions": {"a": 12, "b": 20}})
        assert ok.status_code == 200, ok.text
        assert ok.json()["payoffs"] == {"a": 264.0, "b": 440.0}
        assert (await http.post(f"/p/{stranger}/view", json={})).status_code == 404
        assert (await http.post("/p/not-a-key/view", json={})).status_code == 404
        assert (await http.post(f"/p/{lobby_key}/view", json={})).status_code == 409
        big = {"decisions": {"a": "x" * 70_000}}
        assert (await http.post(f"/p/{key}/view", json=big)).status_code == 413
        codes = [
            (await http.post(f"/p/{key}/view", json={"decisions": {}})).status_code
            for _ in range(25)
        ]
        assert 429 in codes  # a burst of 20, then 10 a second
