"""What the decisions handler logs of a state machine's effects, for tests that drive
`GroupState` by hand and fold its log back (rebuild, replay, outcomes, failing hooks)."""

from __future__ import annotations

from typing import Any

from services.common.group import Broadcast, Effect, GroupState


def out_rows(state: GroupState, effects: list[Effect], now: float) -> list[dict[str, Any]]:
    """The `out` rows of `effects`, each stamped as the worker stamps it: the broadcast's own
    `ts` (ticks), else the group's next one at `now`."""
    rows = []
    for effect in effects:
        if isinstance(effect, Broadcast):
            ts = effect.ts if effect.ts is not None else state.stamp(now)
            rows.append(
                {
                    "ts": ts,
                    "participant": effect.participant,
                    "direction": "out",
                    "channel": effect.channel,
                    "seq": effect.seq,
                    "value": effect.payload,
                }
            )
    return rows
