"""A period's tick schedule on absolute deadlines (pure).

Deadlines are computed from the period's start, never by adding intervals to the previous tick,
so the schedule does not drift however late a tick fires. Sub-period k of n fires at
`starts_at + k * length / n`; the last sub-period shares the period end's deadline and is
emitted first.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Tick:
    at: float
    event: str  # "period_start" | "subperiod" | "period_end"
    period: int
    index: int
    starts_at: float
    ends_at: float

    def payload(self) -> dict[str, object]:
        return {
            "event": self.event,
            "period": self.period,
            "index": self.index,
            "starts_at": self.starts_at,
            "ends_at": self.ends_at,
        }


def schedule(period: int, starts_at: float, length: float, num_subperiods: int) -> list[Tick]:
    ends_at = starts_at + length
    ticks = [Tick(starts_at, "period_start", period, 0, starts_at, ends_at)]
    for k in range(1, num_subperiods + 1):
        at = ends_at if k == num_subperiods else starts_at + k * length / num_subperiods
        ticks.append(Tick(at, "subperiod", period, k, starts_at, ends_at))
    ticks.append(Tick(ends_at, "period_end", period, 0, starts_at, ends_at))
    return ticks
