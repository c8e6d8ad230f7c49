"""An example experiment plug-in, outside Canopy's tree: the minimum-effort coordination game
(Van Huyck, Battalio and Beil 1990), in continuous time.

Each member chooses an effort, an integer from 1 to `params.max_effort` (default 7), initially
1; the flow payoff is `a · min(efforts) − b · own effort + c` (defaults a = 2, b = 1, c = 6).
This folder is laid out as pip installs a package (the package and its `.dist-info` with
`entry_points.txt`), so putting it on the services' path is installing it; docs/experiments.md
walks through writing it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class MinEffortParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    max_effort: Annotated[int, Field(ge=2, le=100)] = 7
    a: float = 2.0
    b: float = 1.0
    c: float = 6.0


class MinEffort:
    name = "min_effort"
    channels = frozenset({"decisions"})
    params_model = MinEffortParams
    page = "page.js"  # its participant page (docs/pages.md), next to this file

    def check_group(self, params: BaseModel, group_size: int) -> tuple[str, str] | None:
        if group_size < 2:
            return "group_size", "a coordination game needs at least 2 members"
        return None

    def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
        return 1

    def validate(self, decision: Any, params: Mapping[str, Any]) -> str | None:
        top = MinEffortParams(**params).max_effort
        if isinstance(decision, int) and not isinstance(decision, bool) and 1 <= decision <= top:
            return None
        return f"an effort is a whole number from 1 to {top}"

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        p = MinEffortParams(**params)
        lowest = min(decisions.values())
        return {code: p.a * lowest - p.b * effort + p.c for code, effort in decisions.items()}
