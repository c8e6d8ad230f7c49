"""Bimatrix payoffs in groups larger than two are O(N) per input (PROTOCOL v2 "Work per input
grows at most linearly with group_size"): the same numbers as the plain formula (each member
against the mean of the others' mixes), with work counted, not timed."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.experiments import GAMES, Bimatrix, wrap
from services.common.experiments.api import is_number as _is_number
from services.common.experiments.bimatrix import expected as _expected

BIMATRIX = wrap(Bimatrix())  # the registry's wrapper: hooks take the params as a dict too
SYMMETRIC = [GAMES["prisoners_dilemma"], GAMES["stag_hunt"], GAMES["hawk_dove"]]


def plain_payoffs(decisions: Mapping[str, Any], matrix: Any) -> dict[str, float]:
    """The formula as it was written before (a list of the others per member: O(N²))."""
    result: dict[str, float] = {}
    for me, mine in decisions.items():
        others = [v for code, v in decisions.items() if code != me and _is_number(v)]
        if not _is_number(mine) or not others:
            result[me] = 0.0
            continue
        q = sum(float(v) for v in others) / len(others)
        result[me] = _expected(matrix, float(mine), q, 0)
    return result


mix = st.one_of(
    st.floats(0, 1),
    st.sampled_from([0.0, 1.0, 0.5, 1 / 3]),
    st.none(),  # a member whose decision is not known (counts for nobody)
)


@settings(max_examples=300, deadline=None)
@given(
    mixes=st.lists(mix, min_size=3, max_size=60),
    game=st.sampled_from(SYMMETRIC),
)
def test_payoffs_equal_the_plain_formula(mixes: list[float | None], game: Any) -> None:
    decisions = {f"p{i}": m for i, m in enumerate(mixes)}
    roles = {code: i + 1 for i, code in enumerate(decisions)}
    got = BIMATRIX.payoffs(decisions, roles, {"payoff_matrix": game})
    want = plain_payoffs(decisions, game)
    assert got.keys() == want.keys()
    for code in want:
        assert math.isclose(got[code], want[code], rel_tol=1e-9, abs_tol=1e-9), code


class CountingDecisions(Mapping[str, Any]):
    """Decisions that count how often a member's decision is read."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values
        self.reads = 0

    def __getitem__(self, code: str) -> Any:
        self.reads += 1
        return self._values[code]

    def __iter__(self) -> Iterator[str]:
        for code in self._values:
            self.reads += 1
            yield code

    def __len__(self) -> int:
        return len(self._values)


def test_a_group_of_n_reads_each_decision_a_few_times_not_n_times() -> None:
    for n in (50, 500):
        decisions = CountingDecisions({f"p{i}": (i % 11) / 10 for i in range(n)})
        roles = {f"p{i}": i + 1 for i in range(n)}
        BIMATRIX.payoffs(decisions, roles, {"game": "stag_hunt"})
        assert decisions.reads <= 4 * n, (n, decisions.reads)
