"""Decisions' outputs (services.decisions.outputs) on their own: the rate limit's flushes.

A flush whose broadcast fails (the bus is reconnecting) must not lose the change: the state
holds it pending again (`GroupState.flush_failed`) and the next flush, half a second later,
sends the decisions with the receipt time of the oldest decision it carries. While a flush is
due the group is `busy`, so an eviction sweep leaves it alone. Driven on the in-memory bus,
with the worker's `_apply_now` replaced by a recorder whose first call fails.
"""

from __future__ import annotations

import asyncio

from services.common import experiments
from services.common.directory import GroupConfig
from services.common.group import Broadcast, Effect, FlushAt, GroupState
from services.common.messages import Channel, now
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from services.decisions.outputs import Outputs
from services.decisions.routes import Routes
from tests.memory_bus import FakeStore, MemoryBus

TIMEOUT = 5.0

CONFIG = GroupConfig(
    session="s",
    group="g",
    experiment="decisions",
    members=["a", "b"],
    num_periods=1,
    period_length=10.0,
    num_subperiods=0,
    rate_limit=1.0,
    params={},
)


class Apply:
    """The worker's `_apply_now`, recorded; its first call fails as a lost connection does."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[Effect], float | None]] = []
        self.failures = 1
        self.succeeded = asyncio.Event()

    async def __call__(
        self, state: GroupState, effects: list[Effect], origin: float | None
    ) -> None:
        self.calls.append((effects, origin))
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the broker is away")
        self.succeeded.set()


def running() -> GroupState:
    state = GroupState(CONFIG, experiments.get("decisions"))
    for code in CONFIG.members:
        state.on_presence(code, f"c-{code}", connected=True)
    state.on_timer("period_start", 1, 0, ends_at=now() + 10.0, now=now())
    return state


async def test_a_failed_flush_is_sent_by_the_next_one_with_its_origin() -> None:
    bus = MemoryBus(FakeStore())
    apply = Apply()
    outputs = Outputs(
        bus, DecisionsMetrics(), LogWriter(bus, interval=0.01, max_records=100), Routes(), apply
    )
    state = running()
    state.on_frame("a", 1, "decisions", 0.1, now=now())  # out at once: the limit starts
    (flush_at,) = state.on_frame("a", 2, "decisions", 0.2, now=now())  # held back
    assert isinstance(flush_at, FlushAt)
    outputs.coalesced("g", 5.0)
    outputs.schedule_flush(state, now())
    assert outputs.busy("g")  # an eviction sweep must not take it now

    await asyncio.wait_for(apply.succeeded.wait(), TIMEOUT)

    (failed, failed_origin), (sent, sent_origin) = apply.calls
    decisions = Broadcast(Channel.GROUP_DECISIONS, {"a": 0.2, "b": None})
    assert failed == [decisions] and failed_origin == 5.0
    assert sent == [decisions] and sent_origin == 5.0  # sent again, not dropped
    assert not state.flush_pending
    outputs.stop()
    await outputs.close()


async def test_a_forgotten_group_has_no_flush_due() -> None:
    bus = MemoryBus(FakeStore())
    apply = Apply()
    outputs = Outputs(
        bus, DecisionsMetrics(), LogWriter(bus, interval=0.01, max_records=100), Routes(), apply
    )
    state = running()
    outputs.schedule_flush(state, now() + 60.0)
    assert outputs.busy("g")
    outputs.forget("g")
    assert not outputs.busy("g")
    with outputs.carrying("g"):
        assert outputs.busy("g")  # effects on their way: rows not logged yet
    assert not outputs.busy("g") and apply.calls == []
    outputs.stop()
    await outputs.close()


def test_labels_learnt_late_add_to_those_known() -> None:
    state = GroupState(
        CONFIG.model_copy(update={"labels": {"a": "old-a", "b": "b"}}),
        experiments.get("decisions"),
    )
    state.learn_labels({"a": "new-a", "c": "c"})
    assert state.labels == {"a": "new-a", "b": "b", "c": "c"}
