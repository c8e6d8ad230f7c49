"""The end for everyone (PROTOCOL v2 "Online studies"): each seat's `finished` when the group's
last period ends, decided by `GroupState`, carried out by the decisions worker.

The state machine is driven without broker or clock; the worker runs with the fake bus and
store of tests/unit/test_decisions_eviction.py, whose store's labels change after the group was
first read (labels arrive with people through the study link); the bots' client reads scripted
sockets (tests/unit/test_bot_client.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, cast

import pytest

from services.bots.client import Bot
from services.common import experiments
from services.common.bus import Bus
from services.common.directory import Directory, GroupConfig, NotFound
from services.common.group import UNKNOWN, Broadcast, Control, Effect, GroupState, rebuild
from services.common.messages import Channel, Envelope, MessageType, now
from services.decisions.handlers import DecisionsWorker
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from tests.memory_bus import FakeDirectory, FakeStore, MemoryBus
from tests.unit.recording import out_rows
from tests.unit.test_bot_client import ScriptedSocket, hello, read
from tests.unit.test_decisions_eviction import presence

TIMEOUT = 5.0
COMPLETION = {
    "completed": {"url": "https://example.org/done?pid={label}&c={code}&s={session}"},
    "dropout": {"code": "DROP"},
}


def config(**overrides: Any) -> GroupConfig:
    fields: dict[str, Any] = {
        "session": "s 1",
        "group": "g",
        "experiment": "public_goods",
        "members": ["a", "b"],
        "num_periods": 2,
        "period_length": 10.0,
        "num_subperiods": 0,
        "rate_limit": 0.0,
        "params": {},
        "labels": {"a": "P 1/ä", "b": "x&y"},
        "completion": COMPLETION,
    }
    return GroupConfig(**(fields | overrides))


class Recorder:
    """The handler's part: logs each broadcast as an `out` row with its stamp (as the worker
    does), each new frame as an `in` row, and keeps the effects of the latest input."""

    def __init__(self, cfg: GroupConfig) -> None:
        self.state = GroupState(cfg, experiments.get(cfg.experiment))
        self.rows: list[dict[str, Any]] = []
        self.effects: list[Effect] = []
        self.now = 100.0

    def _log(self, effects: list[Effect]) -> list[Effect]:
        self.rows.extend(out_rows(self.state, effects, self.now))
        self.effects = effects
        return effects

    def presence(self, code: str, connection: str, connected: bool) -> list[Effect]:
        return self._log(self.state.on_presence(code, connection, connected, now=self.now))

    def frame(self, code: str, seq: int, value: Any) -> list[Effect]:
        ts = self.state.stamp(self.now)
        self.rows.append(
            {
                "ts": ts,
                "participant": code,
                "direction": "in",
                "channel": "decisions",
                "seq": seq,
                "value": value,
            }
        )
        return self._log(self.state.on_frame(code, seq, "decisions", value, ts))

    def tick(self, event: str) -> list[Effect]:
        ends_at = self.now + self.state.config.period_length
        period = self.state.period
        return self._log(self.state.on_timer(event, period, 0, ends_at, now=self.now))


def channels(effects: list[Effect]) -> list[str]:
    return [e.channel for e in effects if isinstance(e, Broadcast | Control)]


def play_two_periods(cfg: GroupConfig, *, b_leaves: bool = True) -> Recorder:
    """a contributes 10 from the start of period 1 (u_a = 14, u_b = 24 each period); b leaves
    during period 2 (on_disconnect continue: the period runs on) unless told otherwise."""
    rec = Recorder(cfg)
    rec.presence("a", "ca", True)
    rec.presence("b", "cb", True)
    rec.tick("period_start")
    rec.frame("a", 1, 10)
    rec.now += 10
    assert channels(rec.tick("period_end")) == ["period_end"]  # not the last: no outcome yet
    assert rec.state.finished == {}
    rec.tick("period_start")
    rec.now += 5
    if b_leaves:
        rec.presence("b", "cb", False)
    rec.now += 5
    return rec


FINISHED_A = {
    "outcome": "completed",
    "total_payoff": pytest.approx(28.0, abs=1e-3),  # a's first µs held 20
    "redirect": "https://example.org/done?pid=P%201%2F%C3%A4&c=a&s=s%201",
    "code": None,
}
FINISHED_B = {
    "outcome": "dropout",
    "total_payoff": pytest.approx(48.0, abs=1e-3),
    "redirect": None,
    "code": "DROP",
}


def test_the_last_period_end_gives_every_member_its_outcome_in_member_order() -> None:
    rec = play_two_periods(config())
    effects = rec.tick("period_end")
    assert channels(effects) == ["period_end", "finished", "finished"]
    end, to_a, to_b = effects
    assert isinstance(end, Broadcast)
    assert isinstance(to_a, Broadcast) and isinstance(to_b, Broadcast)
    assert (to_a.participant, to_a.payload) == ("a", FINISHED_A)  # connected at the end
    assert (to_b.participant, to_b.payload) == ("b", FINISHED_B)  # away at the end
    # Logged right after period_end, in the group's order.
    assert end.ts is not None and to_a.ts is not None and to_b.ts is not None
    assert end.ts < to_a.ts < to_b.ts
    assert [row["channel"] for row in rec.rows[-3:]] == ["period_end", "finished", "finished"]
    assert rec.state.finished == {"a": FINISHED_A, "b": FINISHED_B}
    # The total: exactly the sum of the member's payoffs in the periods' `period_end` rows.
    ends = [row["value"]["payoffs"] for row in rec.rows if row["channel"] == "period_end"]
    for code in ("a", "b"):
        assert rec.state.finished[code]["total_payoff"] == sum(end[code] for end in ends)


def test_the_labels_the_adapter_refreshed_fill_the_redirect() -> None:
    rec = play_two_periods(config(labels={}), b_leaves=False)
    rec.state.labels = {"a": "PID-9", "b": "late one"}  # given after the group was read
    rec.tick("period_end")
    assert rec.state.finished["a"]["redirect"] == "https://example.org/done?pid=PID-9&c=a&s=s%201"
    assert rec.state.finished["b"]["redirect"] == (
        "https://example.org/done?pid=late%20one&c=b&s=s%201"
    )


def test_no_label_and_no_completion_give_nulls() -> None:
    rec = play_two_periods(config(labels={}, completion={}))
    rec.tick("period_end")
    assert rec.state.finished["a"] == {
        "outcome": "completed",
        "total_payoff": pytest.approx(28.0, abs=1e-3),
        "redirect": None,
        "code": None,
    }
    rec = play_two_periods(config(labels={"b": "only b"}))
    rec.tick("period_end")
    assert rec.state.finished["a"]["redirect"] == "https://example.org/done?pid=&c=a&s=s%201"


def test_a_member_back_after_the_end_gets_hello_then_finished_unlogged() -> None:
    rec = play_two_periods(config())
    rec.tick("period_end")
    logged = len(rec.rows)
    effects = rec.presence("b", "cb2", True)
    assert channels(effects) == ["hello", "finished", "presence"]
    hello, finished = effects[0], effects[1]
    assert isinstance(hello, Control) and isinstance(finished, Control)
    assert (finished.participant, finished.connection) == ("b", "cb2")
    assert finished.payload == FINISHED_B  # the outcome stays: away at the end
    assert [row["channel"] for row in rec.rows[logged:]] == ["presence"]
    # a opens a second tab: its new connection gets both, the old one is told it was replaced.
    effects = rec.presence("a", "ca2", True)
    assert channels(effects) == ["hello", "finished", "replaced"]
    assert effects[1] == Control(Channel.FINISHED, FINISHED_A, "a", "ca2")


def test_before_the_end_a_connection_gets_no_finished() -> None:
    rec = play_two_periods(config())
    assert channels(rec.presence("b", "cb2", True)) == ["hello", "presence"]


def test_rebuild_from_the_log_restores_what_was_sent() -> None:
    cfg = config()
    rec = play_two_periods(cfg)
    rec.tick("period_end")
    # The labels changed in the store since: the fold keeps what was sent, from its rows.
    later = config(labels={"a": "other", "b": "other too"})
    rebuilt = rebuild(later, experiments.get(cfg.experiment), rec.rows)
    assert rebuilt.finished == rec.state.finished == {"a": FINISHED_A, "b": FINISHED_B}
    assert rebuilt.state == "ended" and rebuilt.clock == rec.rows[-1]["ts"]
    effects = rebuilt.on_presence("b", "cb3", connected=True)
    assert channels(effects) == ["hello", "finished", "presence"]
    assert effects[1].payload == FINISHED_B  # type: ignore[union-attr]


def test_a_fold_never_decides_outcomes_itself() -> None:
    """A log written before outcomes existed has `period_end` but no `finished` rows: the fold
    gives none: it would have to guess them (who was on an announced socket then is not in
    the log), and a later label could rewrite a redirect that was never sent."""
    rec = play_two_periods(config())
    rec.tick("period_end")
    old_log = [row for row in rec.rows if row["channel"] != Channel.FINISHED]
    cfg = config()
    rebuilt = rebuild(cfg, experiments.get(cfg.experiment), old_log)
    assert rebuilt.state == "ended" and rebuilt.finished == {}
    assert channels(rebuilt.on_presence("b", "cb9", connected=True)) == ["hello", "presence"]


def test_a_drop_that_ends_the_last_period_decides_the_outcomes_too() -> None:
    rec = play_two_periods(config(on_disconnect="end_period"), b_leaves=False)
    assert rec.state.may_finish("disconnect") and rec.state.may_finish("period_end")
    effects = rec.presence("b", "cb", False)
    assert channels(effects) == ["presence", "period_end", "finished", "finished"]
    # Period 2 ended 5 s in: the payoffs so far are its time average, the same flows.
    assert rec.state.finished == {"a": FINISHED_A, "b": FINISHED_B}
    assert not rec.state.may_finish("period_end")  # over: nothing to refresh for any more


def test_a_drop_that_ends_an_earlier_period_decides_nothing() -> None:
    rec = Recorder(config(on_disconnect="end_period"))
    rec.presence("a", "ca", True)
    rec.presence("b", "cb", True)
    rec.tick("period_start")
    assert not rec.state.may_finish("disconnect")  # period 1 of 2
    assert channels(rec.presence("b", "cb", False)) == ["presence", "period_end"]
    assert rec.state.finished == {}


def test_may_finish_only_in_the_running_last_period() -> None:
    rec = play_two_periods(config(), b_leaves=False)
    assert rec.state.may_finish("period_end")
    assert not rec.state.may_finish("disconnect")  # on_disconnect continue: no end
    rec.presence("b", "cb", False)
    rec.tick("period_end")
    assert not rec.state.may_finish("period_end")


def test_a_member_not_announced_again_yet_after_a_restart_counts_as_connected() -> None:
    """After a rebuild, a member the log says is connected is UNKNOWN until its gateway
    announces it again; the `period_end` tick that fired while the worker was down comes
    before every announcement (tests/faults/test_outcomes.py), so UNKNOWN at the end counts
    as connected: `completed`. A member whose disconnection came before the tick, in the
    group's order, is a dropout."""
    cfg = config(num_periods=1)
    rec = Recorder(cfg)
    rec.presence("a", "ca", True)
    rec.presence("b", "cb", True)
    rec.tick("period_start")
    rebuilt = rebuild(cfg, experiments.get(cfg.experiment), rec.rows)
    assert rebuilt.connections == {"a": UNKNOWN, "b": UNKNOWN}
    rebuilt.on_presence("b", "cb", connected=False)  # b's gateway saw it go before the end
    effects = rebuilt.on_timer("period_end", 1, 0, None, now=rec.now + 10)
    outcome = {
        e.participant: e.payload["outcome"]
        for e in effects
        if isinstance(e, Broadcast) and e.channel == Channel.FINISHED
    }
    assert outcome == {"a": "completed", "b": "dropout"}
    # Its gateway announces a afterwards: hello, then the same finished again.
    again = rebuilt.on_presence("a", "ca2", connected=True)
    assert channels(again) == ["hello", "finished"]


# -- the worker ------------------------------------------------------------------------------


class StudyLinkDirectory(FakeDirectory):
    """A store whose labels grow after the group was first read: `group` answers what was
    read first (a cache), `group_fresh` what the store holds now (`self.config`)."""

    def __init__(self, store: FakeStore, cfg: GroupConfig) -> None:
        super().__init__(store, cfg)
        self.first = cfg
        self.fresh_reads = 0

    async def group(self, group: str) -> GroupConfig:
        if group != self.first.group:
            raise NotFound(group)
        return self.first

    async def group_fresh(self, group: str) -> GroupConfig:
        self.fresh_reads += 1
        return self.config


def tick(event: str, period: int, starts_at: float) -> Envelope:
    payload = {"event": event, "period": period, "index": 0, "starts_at": starts_at}
    payload["ends_at"] = starts_at + 10.0
    return Envelope(
        type=MessageType.TIMER_FIRED, session="s 1", group="g", channel=event, payload=payload
    )


def frame(participant: str, connection: str, seq: int, value: float) -> Envelope:
    return Envelope(
        type=MessageType.FRAME_ACCEPTED,
        session="s 1",
        group="g",
        participant=participant,
        seq=seq,
        channel="decisions",
        connection=connection,
        gateway="gw",
        payload=value,
    )


async def run_worker(
    cfg: GroupConfig, script: Any, *, evict_after: float = 0.05
) -> tuple[FakeStore, MemoryBus, StudyLinkDirectory]:
    store = FakeStore()
    bus = MemoryBus(store)
    directory = StudyLinkDirectory(store, cfg)
    metrics = DecisionsMetrics()
    log_writer = LogWriter(cast(Bus, bus), interval=0.01, max_records=100)
    worker = DecisionsWorker(
        cast(Bus, bus), cast(Directory, directory), metrics, log_writer, evict_after=evict_after
    )

    async def handle(envelope: Envelope) -> None:
        confirmed: Awaitable[None] = await worker.handle(envelope)
        await confirmed

    try:
        await script(handle, worker, store, bus, directory)
    finally:
        await worker.close()
        await log_writer.close()
    return store, bus, directory


def finished_rows(store: FakeStore) -> list[dict[str, Any]]:
    return [row for row in store.rows if row["channel"] == Channel.FINISHED]


async def test_the_worker_reads_the_labels_afresh_as_the_last_period_ends() -> None:
    unlabelled = config(session="s 1", num_periods=1, labels={})

    async def script(handle: Any, worker: DecisionsWorker, store: Any, bus: Any, dr: Any) -> None:
        starts_at = now()
        for envelope in (
            presence("a", "ca", connected=True),
            presence("b", "cb", connected=True),
            tick("period_start", 1, starts_at),
            frame("a", "ca", 1, 10.0),
            presence("b", "cb", connected=False),
        ):
            await handle(envelope)
        assert dr.fresh_reads == 0  # nothing could end the group yet
        # People gave their labels through the study link after the group was first read.
        dr.config = config(session="s 1", num_periods=1, labels={"a": "PID 7", "b": "PID/8"})
        await handle(tick("period_end", 1, starts_at))
        assert dr.fresh_reads == 1
        # Out to a's gateway: period_end, then a's finished (b's has no gateway: b left).
        out = [e.channel for e in bus.sent if e.type is MessageType.BROADCAST]
        assert out[-2:] == ["period_end", "finished"]
        to_a = bus.sent[-1]
        assert to_a.participant == "a"
        assert to_a.payload["redirect"] == "https://example.org/done?pid=PID%207&c=a&s=s%201"
        assert to_a.payload["outcome"] == "completed"

        # a leaves: the group is evicted once logged; a comes back: rebuilt, hello + finished.
        await handle(presence("a", "ca", connected=False))
        await asyncio.wait_for(dr.forgot.wait(), TIMEOUT)
        assert "g" not in worker.groups
        bus.sent.clear()
        await handle(presence("a", "ca2", connected=True))
        controls = [e for e in bus.sent if e.type is MessageType.CONTROL]
        assert [e.channel for e in controls] == ["hello", "finished"]
        assert controls[1].payload == to_a.payload and controls[1].connection == "ca2"
        assert dr.fresh_reads == 1

    store, _, _ = await run_worker(unlabelled, script)
    rows = finished_rows(store)
    assert [(row["participant"], row["value"]["outcome"]) for row in rows] == [
        ("a", "completed"),
        ("b", "dropout"),
    ]
    assert rows[1]["value"]["code"] == "DROP"
    ordered = sorted(store.rows, key=lambda row: float(row["ts"]))
    end = [row["channel"] for row in ordered].index("period_end")
    assert [row["channel"] for row in ordered[end : end + 3]] == [
        "period_end",
        "finished",
        "finished",
    ]


async def test_a_drop_that_ends_the_group_reads_the_labels_afresh_too() -> None:
    cfg = config(session="s 1", num_periods=1, labels={}, on_disconnect="end_period")

    async def script(handle: Any, worker: DecisionsWorker, store: Any, bus: Any, dr: Any) -> None:
        for envelope in (
            presence("a", "ca", connected=True),
            presence("b", "cb", connected=True),
            tick("period_start", 1, now()),
        ):
            await handle(envelope)
        dr.config = config(session="s 1", num_periods=1, labels={"a": "late"})
        await handle(presence("b", "cb", connected=False))
        assert dr.fresh_reads == 1
        to_a = bus.sent[-1]
        assert (to_a.channel, to_a.participant) == ("finished", "a")
        assert to_a.payload["redirect"] == "https://example.org/done?pid=late&c=a&s=s%201"

    store, _, _ = await run_worker(cfg, script)
    assert [row["value"]["outcome"] for row in finished_rows(store)] == ["completed", "dropout"]


# -- the bots' client --------------------------------------------------------------------------


async def test_a_bot_records_finished_and_stops_playing() -> None:
    """`finished` ends the bot's play even when it was not told how many periods there are
    (`num_periods` None), and `outcome` holds what the seat was told; again after a reconnect."""
    bot = Bot("ws://canopy.test/ws/a-seat-key")
    await read(bot, ScriptedSocket(hello(0), ("period_end", {"period": 2})))
    assert not bot.finished and bot.outcome is None
    end = {"outcome": "dropout", "total_payoff": 48.0, "redirect": None, "code": "DROP"}
    await read(bot, ScriptedSocket(("finished", end)))
    assert bot.finished and bot.outcome == end
    again = {**end, "total_payoff": 47.5}
    await read(bot, ScriptedSocket(hello(0), ("finished", again)))
    assert bot.outcome == again and bot.payloads("finished") == [end, again]
