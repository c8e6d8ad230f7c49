"""The built-in `public_goods` experiment: a continuous public goods game, a plug-in on `api`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from services.common.decision import Decision, Shown
from services.common.decision import Number as NumberInput
from services.common.experiments.api import Base, Number, is_number


class PublicGoodsParams(BaseModel):
    """Bounded so that payoffs stay finite: |u_i| ≤ endowment · (1 + mpcr · group_size)
    ≤ 1e9 · (1 + 1e3 · 1e3) ≈ 1e15."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endowment: Annotated[Number, Field(gt=0, le=1e9)] = 20.0
    mpcr: Annotated[Number, Field(ge=0, le=1e3)] = 0.4


class PublicGoods(Base[PublicGoodsParams]):
    """Continuous public goods game: a decision is a contribution in [0, endowment], initial 0;
    `u_i = endowment − c_i + mpcr · Σ_j c_j` (`params.endowment` 20, `params.mpcr` 0.4)."""

    name = "public_goods"
    params_model = PublicGoodsParams

    def initial_decision(self, id_in_group: int, params: PublicGoodsParams) -> Any:
        return 0

    def validate(self, decision: Any, params: PublicGoodsParams) -> str | None:
        endowment = float(params.endowment)
        if is_number(decision) and 0 <= decision <= endowment:
            return None
        return f"a contribution must be a number in [0, {endowment:g}]"

    def decision(self, params: PublicGoodsParams) -> Decision:
        """A contribution from 0 to the endowment, in steps of about 1/100 of it (the page's
        slider; `validate` takes any number in the range)."""
        endowment = float(params.endowment)
        mpcr = float(params.mpcr)
        return Decision(
            input=NumberInput(
                min=0,
                max=endowment,
                step=10 ** (math.floor(math.log10(endowment)) - 2),
                unit="points",
                label=f"Your contribution to the group account, from 0 to {endowment:g}",
            ),
            instructions=f"You have {endowment:g} points. What you put in the group account "
            f"is multiplied by {mpcr:g} and paid to every member; what you keep is yours. You "
            "can change your contribution at any time while the period is running.",
            shows=[
                Shown(name="total", label="Group total", unit="points"),
                Shown(name="kept", label="You keep", unit="points"),
            ],
        )

    def shown(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: PublicGoodsParams
    ) -> dict[str, Any]:
        endowment = float(params.endowment)
        given = {c: float(v) if is_number(v) else 0.0 for c, v in decisions.items()}
        return {
            "total": sum(given.values()),
            "kept": {code: endowment - c for code, c in given.items()},
        }

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: PublicGoodsParams
    ) -> dict[str, float]:
        endowment = float(params.endowment)
        mpcr = float(params.mpcr)
        given = {c: float(v) if is_number(v) else 0.0 for c, v in decisions.items()}
        pot = mpcr * sum(given.values())
        return {code: endowment - c + pot for code, c in given.items()}
