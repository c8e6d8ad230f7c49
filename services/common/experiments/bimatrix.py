"""The built-in `bimatrix` experiment: a continuous-time 2×2 game, a plug-in on `api`.

Its params name one of four games or give a payoff matrix; its hooks get `BimatrixParams`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from services.common.decision import Decision, Mix
from services.common.experiments.api import Base, Number, is_number

GAMES: dict[str, list[list[list[float]]]] = {
    "prisoners_dilemma": [[[3, 3], [0, 5]], [[5, 0], [1, 1]]],
    "stag_hunt": [[[4, 4], [0, 3]], [[3, 0], [3, 3]]],
    "hawk_dove": [[[0, 0], [3, 1]], [[1, 3], [2, 2]]],
    "matching_pennies": [[[1, -1], [-1, 1]], [[-1, 1], [1, -1]]],
}


def _not_nullable(schema: dict[str, Any]) -> None:
    """The JSON schema of a field whose `None` only means "not given" (see `_not_null`): no
    null among its types, and no default to show."""
    schema.pop("default", None)
    branches = [b for b in schema.pop("anyOf", []) if b != {"type": "null"}]
    if len(branches) == 1:
        schema.update(branches[0])
    elif branches:
        schema["anyOf"] = branches


def _not_null(value: Any) -> Any:
    """`null` is not a value of these params: leave the key out to get its default."""
    if value is None:
        raise ValueError("must not be null (leave it out for the default)")
    return value


# Bounds that keep every flow payoff, and so every period's integral, finite (PROTOCOL v2).
MAX_PAYOFF_ENTRY = 1e9
PayoffEntry = Annotated[Number, Field(ge=-MAX_PAYOFF_ENTRY, le=MAX_PAYOFF_ENTRY)]
PayoffMatrix = Annotated[
    list[
        Annotated[
            list[Annotated[list[PayoffEntry], Field(min_length=2, max_length=2)]],
            Field(min_length=2, max_length=2),
        ]
    ],
    Field(min_length=2, max_length=2),
]
GameName = Literal["prisoners_dilemma", "stag_hunt", "hawk_dove", "matching_pennies"]
DEFAULT_GAME = "prisoners_dilemma"


class BimatrixParams(BaseModel):
    """`payoff_matrix[r][c] = [row player's, column player's]` (entries within ±1e9), or a
    named `game`; not both. Neither: `game` is `prisoners_dilemma`.

    Neither key takes `null` (its schema has no null): absence means the default. The dump
    (what the store keeps) names the one that was chosen, so validating a dump again gives the
    same params."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # `None` only inside the model, meaning "the other one was chosen"; refused as input.
    payoff_matrix: Annotated[PayoffMatrix | None, BeforeValidator(_not_null)] = Field(
        default=None, json_schema_extra=_not_nullable
    )
    game: Annotated[GameName | None, BeforeValidator(_not_null)] = Field(
        default=None, json_schema_extra=_not_nullable
    )
    initial_decision: Annotated[Number, Field(ge=0, le=1)] = 0.5

    @model_validator(mode="before")
    @classmethod
    def _default_game(cls, data: Any) -> Any:
        if isinstance(data, dict) and "payoff_matrix" not in data and "game" not in data:
            return {**data, "game": DEFAULT_GAME}
        return data

    @model_validator(mode="after")
    def _one_game(self) -> BimatrixParams:
        if self.payoff_matrix is not None and self.game is not None:
            raise ValueError("give either payoff_matrix or game, not both")
        return self

    @model_serializer(mode="wrap")
    def _chosen_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped: dict[str, Any] = handler(self)
        return {k: v for k, v in dumped.items() if v is not None}

    def matrix(self) -> list[list[list[float]]]:
        if self.payoff_matrix is not None:
            return self.payoff_matrix
        return GAMES[self.game or DEFAULT_GAME]


# The two actions of each named game, first action first (as the bimatrix page names them).
ACTION_NAMES: dict[str, list[str]] = {
    "prisoners_dilemma": ["Cooperate", "Defect"],
    "stag_hunt": ["Stag", "Hare"],
    "hawk_dove": ["Hawk", "Dove"],
    "matching_pennies": ["Heads", "Tails"],
}


class Bimatrix(Base[BimatrixParams]):
    """Continuous-time 2×2 game: a decision is the probability of playing the first action.

    Payoffs (`params.payoff_matrix`, default a prisoner's dilemma [[[3,3],[0,5]],[[5,0],[1,1]]])
    are the expected flow payoffs of each player against the mean of the other members' mixes.
    """

    name = "bimatrix"
    params_model = BimatrixParams

    def check_group(self, params: BimatrixParams, group_size: int) -> tuple[str, str] | None:
        if group_size < 2:
            return "group_size", "bimatrix needs groups of at least 2"
        if params.game == "matching_pennies" and group_size != 2:
            return "params.game", "matching_pennies is for groups of 2 only"
        matrix = params.matrix()
        symmetric = all(matrix[r][c][0] == matrix[c][r][1] for r in range(2) for c in range(2))
        if group_size > 2 and not symmetric:
            field = "params.payoff_matrix" if params.payoff_matrix is not None else "params.game"
            return field, (
                "groups larger than 2 need a symmetric game "
                "(payoff_matrix[r][c][0] == payoff_matrix[c][r][1])"
            )
        return None

    def initial_decision(self, id_in_group: int, params: BimatrixParams) -> Any:
        value = params.initial_decision
        return float(value) if is_number(value) else 0.5

    def validate(self, decision: Any, params: BimatrixParams) -> str | None:
        if is_number(decision) and 0.0 <= decision <= 1.0:
            return None
        return "a bimatrix decision must be a number in [0, 1]"

    def decision(self, params: BimatrixParams) -> Decision:
        """A mix of the two actions, sent as the probability of the first (named for the
        named games, as its page names them)."""
        actions = ACTION_NAMES.get(str(params.game), ["A", "B"])
        if params.game is None and params.payoff_matrix == GAMES[DEFAULT_GAME]:
            actions = ACTION_NAMES[DEFAULT_GAME]
        return Decision(
            input=Mix(actions=actions, form="first", label=f"How often you play {actions[0]}"),
            instructions=f"Choose how likely you are to play {actions[0]} rather than "
            f"{actions[1]}. Your payoff each moment is what that mix earns on average against "
            "the others' mixes. You can change it at any time while the period is running.",
        )

    def payoffs(
        self, decisions: Mapping[str, Any], roles: Mapping[str, int], params: BimatrixParams
    ) -> dict[str, float]:
        """Expected flow payoffs. Two members: member 1 is the row player, member 2 the column
        player (`matrix[r][c] = [row's, column's]`). More: each plays as the row player against
        the mean mix of the others (the matrix is symmetric then)."""
        matrix = params.matrix()
        if len(decisions) == 2 and sorted(roles.get(c, 0) for c in decisions) == [1, 2]:
            row, column = sorted(decisions, key=lambda c: roles[c])
            if not (is_number(decisions[row]) and is_number(decisions[column])):
                return dict.fromkeys(decisions, 0.0)
            p, q = float(decisions[row]), float(decisions[column])
            return {row: expected(matrix, p, q, 0), column: expected(matrix, p, q, 1)}
        # O(N): the others' total is everyone's total less one's own (not a list per member,
        # which made every input O(N²)); the mean is clamped to [0, 1] against rounding.
        mixes = {code: float(v) for code, v in decisions.items() if is_number(v)}
        total, count = sum(mixes.values()), len(mixes)
        result: dict[str, float] = {}
        for me in decisions:
            mine = mixes.get(me)
            if mine is None or count < 2:
                result[me] = 0.0
                continue
            q = min(1.0, max(0.0, (total - mine) / (count - 1)))
            result[me] = expected(matrix, mine, q, 0)
        return result


def expected(matrix: Any, p: float, q: float, player: int) -> float:
    """The expected payoff of `player` (0 row, 1 column) when the row player plays action 0
    with probability p and the column player with probability q."""
    return float(
        p * q * matrix[0][0][player]
        + p * (1 - q) * matrix[0][1][player]
        + (1 - p) * q * matrix[1][0][player]
        + (1 - p) * (1 - q) * matrix[1][1][player]
    )
