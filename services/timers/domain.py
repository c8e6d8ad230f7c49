"""A period's tick schedule on absolute deadlines (pure).

Deadlines are computed from the period's start, never by adding intervals to the previous tick,
so the schedule does not drift however late a tick fires. Sub-period k of n fires at
`starts_at + k * length / n`; the last sub-period shares the period end's deadline and is
emitted first.

A schedule is a sequence computed on demand: tick k follows from (starts_at, length,
num_subperiods, k) alone, so a period of 100,000 sub-periods costs as little memory as one of
three, and resuming it at tick `fired` reads nothing before that tick.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import overload


@dataclass(frozen=True, slots=True)
class Tick:
    at: float
    event: str  # "period_start" | "subperiod" | "period_end"
    period: int
    index: int
    starts_at: float
    ends_at: float


class Schedule(Sequence[Tick]):
    """The ticks of one period, in firing order: `period_start`, sub-periods 1..n, `period_end`.

    Position 0 is `period_start`, position k (1 ≤ k ≤ n) sub-period k, position n + 1
    `period_end`; each is built when asked for, so holding a schedule costs O(1)."""

    __slots__ = ("ends_at", "length", "num_subperiods", "period", "starts_at")

    def __init__(self, period: int, starts_at: float, length: float, num_subperiods: int) -> None:
        self.period = period
        self.starts_at = starts_at
        self.length = length
        self.num_subperiods = max(0, num_subperiods)  # as before: fewer than none is none
        self.ends_at = starts_at + length

    def __len__(self) -> int:
        return self.num_subperiods + 2

    @overload
    def __getitem__(self, position: int) -> Tick: ...

    @overload
    def __getitem__(self, position: slice) -> Sequence[Tick]: ...

    def __getitem__(self, position: int | slice) -> Tick | Sequence[Tick]:
        if isinstance(position, slice):
            return [self.tick(k) for k in range(*position.indices(len(self)))]
        k = position + len(self) if position < 0 else position
        if not 0 <= k < len(self):
            raise IndexError(position)
        return self.tick(k)

    def tick(self, k: int) -> Tick:
        """The tick at position `k` (0 ≤ k < len(self))."""
        n, starts_at, ends_at = self.num_subperiods, self.starts_at, self.ends_at
        if k == 0:
            return Tick(starts_at, "period_start", self.period, 0, starts_at, ends_at)
        if k <= n:
            # The same expression as ever, so that deadlines stay bit-for-bit what they were.
            at = ends_at if k == n else starts_at + k * self.length / n
            return Tick(at, "subperiod", self.period, k, starts_at, ends_at)
        return Tick(ends_at, "period_end", self.period, 0, starts_at, ends_at)

    def ticks(self, start: int = 0) -> Iterator[tuple[int, Tick]]:
        """(position, tick) from position `start` on, without building the ticks before it."""
        for k in range(max(0, start), len(self)):
            yield k, self.tick(k)

    def __iter__(self) -> Iterator[Tick]:
        for _, tick in self.ticks():
            yield tick


def schedule(period: int, starts_at: float, length: float, num_subperiods: int) -> Schedule:
    return Schedule(period, starts_at, length, num_subperiods)
