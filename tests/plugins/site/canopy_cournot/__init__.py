"""An example experiment plug-in, outside Canopy's tree: a Cournot duopoly in continuous time
(the study of issue 21, as a researcher new to Canopy wrote it).

Each of the two members chooses a quantity in [0, `max_quantity`] (default 50), initially 0;
the price is `a − q1 − q2` (default a = 60) and a member's flow payoff is its profit
`(price − cost) · q` (default cost = 6). A cost of `a` or more is refused when the session is
created, at `params.cost` (`params_error`). It declares its decision (a number of units from 0
to `max_quantity`) and what the page shows live (the price and the total quantity), and has no
`validate`: Canopy checks each input against the declaration. Laid out as pip installs a
package, like canopy_min_effort; docs/experiments.md walks through it line by line.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common.decision import Decision, Number, Shown
from services.common.experiments import params_error


class CournotParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    a: Annotated[float, Field(gt=0, le=1e6)] = 60.0
    cost: Annotated[float, Field(ge=0, le=1e6)] = 6.0
    max_quantity: Annotated[float, Field(gt=0, le=1e6)] = 50.0

    @model_validator(mode="after")
    def _cost_below_a(self) -> CournotParams:
        if self.cost >= self.a:
            raise params_error("cost", f"cost must be below a ({self.a:g})", self.cost)
        return self


class Cournot:
    name = "cournot"
    description = (
        "A Cournot duopoly in continuous time: each firm sets a quantity, the price is "
        "a − q1 − q2, and each earns (price − cost) · its quantity."
    )
    channels = frozenset({"decisions"})
    params_model = CournotParams

    def check_group(self, params: BaseModel, group_size: int) -> tuple[str, str] | None:
        if group_size != 2:
            return "group_size", "a duopoly has exactly 2 members"
        return None

    def initial_decision(self, id_in_group: int, params: Mapping[str, Any]) -> Any:
        return 0.0

    def decision(self, params: Mapping[str, Any]) -> Decision:
        return Decision(
            input=Number(min=0, max=params["max_quantity"], unit="units", label="Your quantity"),
            instructions=(
                "You run a firm. Choose how many units to produce; the other firm does the "
                "same. The more you both produce, the lower the price. You earn (price − "
                f"{params['cost']:g}) for each unit you produce, every second."
            ),
            shows=[
                Shown(name="price", label="Price now", unit="per unit"),
                Shown(name="total", label="Both firms together", unit="units"),
            ],
        )

    def shown(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        total = sum(decisions.values())
        return {"price": params["a"] - total, "total": total}

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: Mapping[str, Any]
    ) -> dict[str, float]:
        price = params["a"] - sum(decisions.values())
        return {code: (price - params["cost"]) * q for code, q in decisions.items()}
