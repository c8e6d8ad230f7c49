"""The built-in `decisions` experiment: a relay of numbers, a plug-in on `api` like any other."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.common.decision import Decision
from services.common.decision import Number as NumberInput
from services.common.experiments.api import Base, NoParams, is_number


class PlainDecisions(Base[NoParams]):
    """Relays numbers: every member's decision is any finite number; no payoffs."""

    name = "decisions"
    params_model = NoParams

    def initial_decision(self, id_in_group: int, params: NoParams) -> Any:
        return None

    def validate(self, decision: Any, params: NoParams) -> str | None:
        return None if is_number(decision) else "a decision must be a finite number"

    def decision(self, params: NoParams) -> Decision:
        """What its page offers (and bots play): a number from 0 to 1. The relay itself takes
        any finite number (its own `validate`)."""
        return Decision(
            input=NumberInput(min=0, max=1, step=0.01, label="Your decision, from 0 to 1"),
            instructions="Move the slider to choose a number between 0 and 1. You can change "
            "it at any time while the period is running.",
        )

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: NoParams
    ) -> dict[str, float]:
        return {}
