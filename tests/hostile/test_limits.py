"""Property tests of PROTOCOL v2's limits, without any service: session settings, params that
keep payoffs finite, `null` params, and the 256 KiB cap on every broadcast and log row.

Hostile inputs a researcher (`POST /api/sessions` bodies, through `CreateSession`) or a
participant (decisions of any size, through `GroupState`) may send; Hypothesis draws them
with this folder's settings (`fuzz`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, ValidationError

from services.common import experiments
from services.common.directory import GroupConfig
from services.common.group import Broadcast, GroupState
from services.store.api import session_summary
from services.store.domain import CreateSession
from tests.hostile.conftest import fuzz

CAP = 262_144  # PROTOCOL v2 "Size": 256 KiB of JSON
BUILT_IN = ("decisions", "bimatrix", "public_goods", "double_auction")


def refused_at(body: dict[str, Any]) -> str | None:
    """The dotted field of the first error, or None if the session is accepted."""
    try:
        CreateSession.model_validate(body)
    except ValidationError as exc:
        return ".".join(str(p) for p in exc.errors()[0]["loc"])
    return None


@fuzz(max_examples=300)
@given(
    period_length=st.floats(min_value=0.001, max_value=86_400),
    num_subperiods=st.integers(min_value=0, max_value=100_000),
    num_periods=st.integers(min_value=1, max_value=1_000),
    group_size=st.integers(min_value=1, max_value=1_000),
)
@example(period_length=0.3, num_subperiods=6, num_periods=1, group_size=1)  # exactly 0.05 s
@example(period_length=5000, num_subperiods=100_000, num_periods=1, group_size=1)
@example(period_length=5000, num_subperiods=100, num_periods=1_000, group_size=1_000)
@example(period_length=5000, num_subperiods=101, num_periods=1_000, group_size=1)
def test_session_settings_are_bounded(
    period_length: float, num_subperiods: int, num_periods: int, group_size: int
) -> None:
    field = refused_at(
        {
            "experiment": "decisions",
            "num_participants": group_size,
            "group_size": group_size,
            "num_periods": num_periods,
            "period_length": period_length,
            "num_subperiods": num_subperiods,
        }
    )
    short = num_subperiods > 0 and period_length / num_subperiods < 0.05 * (1 - 1e-9)
    many = num_periods * max(1, num_subperiods) > 100_000
    if short or many:
        assert field == "num_subperiods"
    else:
        assert field is None


def test_a_group_holds_at_most_1000_members() -> None:
    body = {"experiment": "decisions", "period_length": 10}
    assert refused_at(body | {"num_participants": 1_000, "group_size": 1_000}) is None
    assert refused_at(body | {"num_participants": 1_001, "group_size": 1_001}) == "group_size"


def params_fields() -> list[tuple[str, str]]:
    return [
        (name, key)
        for name in BUILT_IN
        for key in experiments.get(name).params_model.model_json_schema().get("properties", {})
    ]


@pytest.mark.parametrize(("experiment", "key"), params_fields())
def test_null_is_refused_for_every_built_in_param(experiment: str, key: str) -> None:
    schema = experiments.get(experiment).params_model.model_json_schema()["properties"][key]
    assert "null" not in orjson.dumps(schema).decode()  # no built-in param allows null
    body = {
        "experiment": experiment,
        "num_participants": 2,
        "group_size": 2,
        "period_length": 10,
        "params": {key: None},
    }
    assert refused_at(body) == f"params.{key}"


def test_params_are_stored_with_their_defaults() -> None:
    for name in BUILT_IN:
        body = {"experiment": name, "num_participants": 2, "group_size": 2, "period_length": 1}
        stored = CreateSession.model_validate(body).params
        assert stored == experiments.get(name).params_model().model_dump(mode="json")
        again = CreateSession.model_validate(body | {"params": stored}).params
        assert again == stored  # a fixed point


entries = st.floats(allow_nan=False, allow_infinity=False, width=64)


@fuzz(max_examples=200)
@given(
    matrix=st.lists(
        st.lists(st.lists(entries, min_size=2, max_size=2), min_size=2, max_size=2),
        min_size=2,
        max_size=2,
    ),
    decisions=st.lists(st.floats(min_value=0, max_value=1), min_size=2, max_size=2),
)
@example(matrix=[[[1e9, -1e9], [1e9, 1e9]], [[-1e9, 1e9], [1e9, -1e9]]], decisions=[1.0, 0.0])
@example(matrix=[[[1e300, 0], [0, 0]], [[0, 0], [0, 0]]], decisions=[1.0, 1.0])
def test_an_accepted_payoff_matrix_keeps_every_payoff_finite(
    matrix: list[list[list[float]]], decisions: list[float]
) -> None:
    body = {
        "experiment": "bimatrix",
        "num_participants": 2,
        "group_size": 2,
        "period_length": 86_400,
        "num_periods": 1_000,
        "params": {"payoff_matrix": matrix},
    }
    within = all(abs(x) <= 1e9 for row in matrix for cell in row for x in cell)
    field = refused_at(body)
    if not within:
        assert field is not None and field.startswith("params.payoff_matrix")
        return
    assert field is None
    stored = CreateSession.model_validate(body).params
    flows = experiments.get("bimatrix").payoffs(
        {"r": decisions[0], "c": decisions[1]}, {"r": 1, "c": 2}, stored
    )
    for flow in flows.values():
        # A whole session's worth of the largest flow: still a number JSON can hold.
        assert math.isfinite(flow * 86_400 * 1_000)


@fuzz(max_examples=100)
@given(
    endowment=st.floats(min_value=1e-9, max_value=1e9),
    mpcr=st.floats(min_value=0, max_value=1e3),
    size=st.integers(min_value=1, max_value=1_000),
    share=st.floats(min_value=0, max_value=1),
)
def test_public_goods_payoffs_stay_finite(
    endowment: float, mpcr: float, size: int, share: float
) -> None:
    params = {"endowment": endowment, "mpcr": mpcr}
    body = {
        "experiment": "public_goods",
        "num_participants": size,
        "group_size": size,
        "period_length": 86_400,
        "params": params,
    }
    stored = CreateSession.model_validate(body).params
    contributions = {str(i): endowment * share for i in range(size)}
    flows = experiments.get("public_goods").payoffs(contributions, {}, stored)
    assert all(math.isfinite(v * 86_400 * 1_000) for v in flows.values())


class AnyParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AnyDecision:
    """Takes any JSON as a decision (a plug-in may): the cap alone bounds what goes out."""

    name = "any"
    channels = frozenset({"decisions"})
    params_model = AnyParams

    def check_group(self, params: BaseModel, group_size: int) -> None:
        return None

    def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
        return None

    def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
        return None

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        return {code: float(len(str(v))) for code, v in decisions.items()}


MEMBERS = ["m1", "m2", "m3", "m4"]


@fuzz(max_examples=40)
@given(
    inputs=st.lists(
        st.tuples(st.sampled_from(MEMBERS), st.integers(min_value=0, max_value=300_000)),
        min_size=1,
        max_size=12,
    ),
    subperiod_after=st.integers(min_value=0, max_value=12),
)
@example(inputs=[("m1", 100_000), ("m2", 100_000), ("m3", 100_000), ("m4", 10)], subperiod_after=3)
def test_no_broadcast_passes_the_cap(inputs: list[tuple[str, int]], subperiod_after: int) -> None:
    config = GroupConfig(
        session="s",
        group="g",
        experiment="any",
        members=MEMBERS,
        num_periods=1,
        period_length=10.0,
        num_subperiods=2,
        rate_limit=0.0,
        params={},
    )
    state = GroupState(config, experiments.wrap(AnyDecision()))
    out: list[Broadcast] = []

    def carry(effects: list[Any]) -> None:
        out.extend(e for e in effects if isinstance(e, Broadcast))

    for code in MEMBERS:
        carry(state.on_presence(code, f"{code}-c", True, now=0.0))
    carry(state.on_timer("period_start", 1, 0, 10.0, now=0.0))
    now = 0.0
    for number, (code, size) in enumerate(inputs, start=1):
        now += 0.1
        before = dict(state.decisions)
        effects = state.on_frame(code, number, "decisions", "x" * size, now)
        carry(effects)
        refused = [e for e in effects if isinstance(e, Broadcast) and e.channel == "error"]
        if refused:
            assert refused[0].payload["code"] == "invalid_decision"
            assert state.decisions == before
        else:
            assert state.decisions[code] == "x" * size
        if number == subperiod_after:
            carry(state.on_timer("subperiod", 1, 1, 10.0, now=now))
    carry(state.on_timer("period_end", 1, 0, 10.0, now=now + 1))
    assert [b.channel for b in out[-5:]] == ["period_end"] + ["finished"] * len(MEMBERS)
    for broadcast in out:
        assert len(orjson.dumps(broadcast.payload)) <= CAP


def test_a_payoff_that_is_not_finite_never_breaks_the_session_list() -> None:
    """v1 let payoffs overflow to infinity, logged as `null`: `GET /api/sessions` then failed
    with 500 for every session. The summary's JSON stays valid whatever was stored."""
    session = {"_id": "s", "created_at": datetime.now(UTC), "groups": ["g"], "params": {}}
    groups = [{"_id": "g", "members": ["a", "b", "c"]}]
    participants = [
        {"_id": code, "group": "g", "id_in_group": i, "url": "u", "payoffs": payoffs}
        for i, (code, payoffs) in enumerate(
            [
                ("a", {"1": None, "2": 3.0}),
                ("b", {"1": float("inf"), "2": float("nan")}),
                ("c", {"1": 1.5, "2": 2}),
            ],
            start=1,
        )
    ]
    summary = session_summary(session, groups, participants)
    totals = {p["code"]: p["total_payoff"] for p in summary["participants"]}
    assert totals == {"a": None, "b": None, "c": 3.5}
    assert summary["participants"][1]["payoffs"] == {"1": None, "2": None}
    json.dumps(summary, allow_nan=False)  # as strict as the HTTP answer's encoder
