"""A test plug-in whose code fails on purpose (PROTOCOL v2 "The ack holds through
everything"): its `payoffs` hook raises whenever a member's decision is `params.fail_on`.

A decision is a whole number from 0 to 100; the flow payoff is one's own decision. The hook
reads `params["fail_on"]` by indexing, so it also fails if Canopy ever hands it params without
their defaults filled in. Laid out as pip installs a package, like canopy_min_effort.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class FragileParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    fail_on: Annotated[int, Field(ge=0, le=100)] = 13


class FragileError(RuntimeError):
    """What the experiment raises: a bug in a plug-in, as far as Canopy knows."""


class Fragile:
    name = "fragile"
    channels = frozenset({"decisions"})
    params_model = FragileParams

    def check_group(self, params: BaseModel, group_size: int) -> tuple[str, str] | None:
        return None

    def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
        return 0

    def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
        if isinstance(decision, int) and not isinstance(decision, bool) and 0 <= decision <= 100:
            return None
        return "a decision is a whole number from 0 to 100"

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        if params["fail_on"] in decisions.values():
            raise FragileError(f"no payoffs when someone chooses {params['fail_on']}")
        return {code: float(value) for code, value in decisions.items()}
