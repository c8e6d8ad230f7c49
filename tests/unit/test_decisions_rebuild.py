"""Rebuilding a group from its log: the fold of the log equals the live state.

A `Recorder` plays the decisions handler's part: it stamps each input, logs what the handler
logs (an `in` row per new frame, an `out` row per broadcast, with the handler's stamps), and
keeps the live state. Random input sequences, then `rebuild` from the rows, then compare.
"""

from __future__ import annotations

import itertools
import random
from typing import Any

import pytest

from services.common import experiments
from services.common.directory import GroupConfig
from services.common.group import (
    TICK,
    UNKNOWN,
    Broadcast,
    Control,
    Effect,
    GroupState,
    StartPeriod,
    rebuild,
)
from services.store.domain import iso_ts
from tests.unit.recording import out_rows


def config(**overrides: Any) -> GroupConfig:
    fields: dict[str, Any] = {
        "session": "s",
        "group": "g",
        "experiment": "bimatrix",
        "members": ["a", "b", "c"],
        "num_periods": 3,
        "period_length": 10.0,
        "num_subperiods": 0,
        "rate_limit": 0.0,
        "params": {},
    }
    fields.update(overrides)
    return GroupConfig(**fields)


class Recorder:
    def __init__(self, cfg: GroupConfig) -> None:
        self.state = GroupState(cfg, experiments.get(cfg.experiment))
        self.rows: list[dict[str, Any]] = []
        self.now = 1000.0
        self.started: list[StartPeriod] = []

    def _log(self, effects: list[Effect]) -> list[Effect]:
        self.rows.extend(out_rows(self.state, effects, self.now))
        self.started.extend(e for e in effects if isinstance(e, StartPeriod))
        return effects

    def frame(self, participant: str, seq: int, value: Any, channel: str = "decisions") -> None:
        ts = self.now
        if not self.state.seen(participant, seq):
            ts = self.state.stamp(self.now)
            self.rows.append(
                {
                    "ts": ts,
                    "participant": participant,
                    "direction": "in",
                    "channel": channel,
                    "seq": seq,
                    "value": value,
                }
            )
        self._log(self.state.on_frame(participant, seq, channel, value, ts))

    def presence(self, participant: str, connection: str, connected: bool) -> None:
        self._log(self.state.on_presence(participant, connection, connected, now=self.now))

    def tick(self, event: str, index: int = 0) -> None:
        period = self.state.period
        ends_at = self.now + self.state.config.period_length
        self._log(self.state.on_timer(event, period, index, ends_at, now=self.now))

    def flush(self) -> None:
        self._log(self.state.flush(self.now))


def comparable(state: GroupState) -> dict[str, Any]:
    return {
        "decisions": state.decisions,
        "last_seq": state.last_seq,
        "period": state.period,
        "state": "waiting" if state.state == "starting" else state.state,
        "ends_at": state.ends_at,
        "subperiod": state.subperiod,
        "connected": sorted(state.connections),
        "flush_pending": state.flush_pending,
        "area": state.area,
        "flow": state.flow,
        "snapshots": state.snapshots,
        "period_started_at": state.period_started_at,
    }


def random_run(seed: int, cfg: GroupConfig) -> Recorder:
    rng = random.Random(seed)
    rec = Recorder(cfg)
    seqs = dict.fromkeys(cfg.members, 0)
    connection = {m: 0 for m in cfg.members}
    for _ in range(400):
        rec.now += rng.choice([0.0, 0.001, 0.05, 0.3])
        roll = rng.random()
        member = rng.choice(cfg.members)
        if roll < 0.55:
            if rng.random() < 0.1 and seqs[member]:
                seq = rng.randint(1, seqs[member])  # a resent duplicate
            else:
                seqs[member] += 1
                seq = seqs[member]
            value = rng.choice([rng.random(), 2.0, "x", None])
            rec.frame(member, seq, value, channel=rng.choice(["decisions"] * 9 + ["chat"]))
        elif roll < 0.7:
            up = rng.random() < 0.6
            if up and rng.random() < 0.3:
                connection[member] += 1  # a replacement connection
            rec.presence(member, f"{member}{connection[member]}", up)
        elif roll < 0.8 and rec.started:
            rec.started.pop()
            rec.tick("period_start")
        elif roll < 0.9:
            rec.tick("subperiod", rec.state.subperiod + rng.choice([0, 1]))
        elif roll < 0.95:
            rec.tick("period_end")
        else:
            rec.flush()
    return rec


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("rate_limit", [0.0, 0.5])
def test_rebuild_from_the_log_equals_the_live_state(seed: int, rate_limit: float) -> None:
    cfg = config(rate_limit=rate_limit, num_subperiods=4)
    rec = random_run(seed, cfg)
    rebuilt = rebuild(cfg, experiments.get(cfg.experiment), rec.rows)
    live = comparable(rec.state)
    again = comparable(rebuilt)
    assert again == live
    # Connections are not in the log (their gateways announce them again), and the clock
    # resumes after the last row (inputs that logged nothing moved only the live one).
    assert set(rebuilt.connections.values()) <= {UNKNOWN}
    assert rebuilt.clock == (rec.rows[-1]["ts"] if rec.rows else float("-inf"))


def test_rows_are_strictly_ordered_by_ts() -> None:
    rec = random_run(7, config())
    stamps = [row["ts"] for row in rec.rows]
    assert all(b >= a + TICK * 0.999 for a, b in itertools.pairwise(stamps))


def test_a_redelivered_input_after_a_rebuild_is_applied_once() -> None:
    cfg = config(members=["a", "b"])
    rec = Recorder(cfg)
    rec.presence("a", "a0", True)
    rec.presence("b", "b0", True)
    rec.tick("period_start")
    rec.frame("a", 1, 0.2)
    state = rebuild(cfg, experiments.get(cfg.experiment), rec.rows)
    assert state.seen("a", 1)
    assert state.on_frame("a", 1, "decisions", 0.9, now=rec.now + 1) == []
    assert state.decisions["a"] == 0.2


def test_announced_members_get_a_hello_and_no_presence_change() -> None:
    cfg = config(members=["a", "b"])
    rec = Recorder(cfg)
    rec.presence("a", "a0", True)
    rec.presence("b", "b0", True)
    rec.tick("period_start")
    state = rebuild(cfg, experiments.get(cfg.experiment), rec.rows)
    assert state.connections == {"a": UNKNOWN, "b": UNKNOWN}
    effects = state.on_presence("a", "a7", connected=True)
    assert [e.channel for e in effects if isinstance(e, Control | Broadcast)] == ["hello"]
    # b was not announced again: its gateway is gone, so it is disconnected.
    expired = state.expire_unknown()
    assert [e.payload for e in expired if isinstance(e, Broadcast)] == [
        {"participant": "b", "connected": False}
    ]
    assert state.connections == {"a": "a7"}


def test_a_complete_group_that_was_starting_asks_for_its_period_again() -> None:
    cfg = config(members=["a", "b"])
    rec = Recorder(cfg)
    rec.presence("a", "a0", True)
    rec.presence("b", "b0", True)
    assert rec.started  # StartPeriod went out; period_start not yet in the log
    state = rebuild(cfg, experiments.get(cfg.experiment), rec.rows)
    assert state.state == "waiting"
    state.on_presence("a", "a1", connected=True)
    effects = state.on_presence("b", "b1", connected=True)
    assert StartPeriod(1, 10.0, 0) in effects


def test_late_ticks_say_so_and_ticks_apply_once() -> None:
    cfg = config(members=["a"], num_subperiods=2)
    state = GroupState(cfg, experiments.get(cfg.experiment))
    state.on_presence("a", "a0", connected=True)
    (start,) = state.on_timer("period_start", 1, 0, 110.0, now=100.0, late=True)
    assert isinstance(start, Broadcast) and start.payload["late"] is True
    (sub,) = state.on_timer("subperiod", 1, 1, None, now=105.0)
    assert isinstance(sub, Broadcast) and "late" not in sub.payload
    assert state.on_timer("subperiod", 1, 1, None, now=105.1, late=True) == []
    assert state.on_timer("period_start", 1, 0, 110.0, now=105.2) == []


def test_rows_stamped_at_once_stay_apart_at_the_exports_microseconds() -> None:
    """A burst of rows stamped at one moment: every row's ISO `ts` in the export differs
    from the previous one's (today's epoch: a float's step is about 0.24 µs there)."""
    state = GroupState(config(), experiments.get("decisions"))
    now = 1_796_600_000.123_456_4
    stamps = [state.stamp(now) for _ in range(20_000)]
    shown = [iso_ts(ts) for ts in stamps]
    assert all(a < b for a, b in itertools.pairwise(shown))
