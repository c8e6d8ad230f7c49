"""The arrival lobby after a worker died between the store's forming a group and the log's
holding it (found by tests/faults/test_lobby_faults.py): the rebuilt lobby logs the arrival the
log lost, before the group (services/common/lobby.py `form`), and a fold of the log arrives at
the same state; a group formed with bots is logged with them, and no arrival for a bot's seat
(the worker asks the store again: services/decisions/handlers.py `_lobby`)."""

from __future__ import annotations

from typing import Any, cast

from services.common.bus import Bus
from services.common.directory import Directory
from services.common.lobby import GROUP_FORMED, LOBBY_JOIN, LobbyConfig, LobbyState, rebuild
from services.decisions.handlers import DecisionsWorker
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from tests.memory_bus import FakeStore, MemoryBus
from tests.unit.test_lobby import config, rows_of
from tests.unit.test_lobby_worker import LobbyDirectory, arrival, moved


def lobby_rows(
    live: LobbyState, steps: list[tuple[str, str, float]]
) -> list[dict[str, Any]]:  # fmt: skip
    rows: list[dict[str, Any]] = []
    for participant, connection, now in steps:
        rows += rows_of(live.on_presence(participant, connection, True, now=now))
    return rows


def test_an_arrival_the_log_lost_is_logged_before_the_group_the_store_formed() -> None:
    # a waits (logged); b arrives, the store forms g1 with a and b, the worker dies before the
    # log holds b's lobby_join and the group_formed of that input.
    live = LobbyState(config())
    log = lobby_rows(live, [("a", "c1", 1.0)])
    cfg: LobbyConfig = config(formed={"g1": ["a", "b"]})

    rebuilt = rebuild(cfg, log)
    rows = rows_of(rebuilt.form("g1", cfg.formed["g1"], now=5.0))
    assert [(r["channel"], r["participant"]) for r in rows] == [
        (LOBBY_JOIN, "b"),
        (GROUP_FORMED, None),
    ]
    assert rows[0]["value"] == {"participant": "b", "arrived": rows[0]["ts"]}
    assert rows[0]["ts"] < rows[1]["ts"]
    # b's presence comes again (never acknowledged): sent to the group, nothing logged.
    assert rows_of(rebuilt.on_presence("b", "c2", True, now=5.5)) == []

    again = rebuild(cfg, log + rows)
    assert again.formed == rebuilt.formed == {"g1": ["a", "b"]}
    assert again.grouped == rebuilt.grouped and not again.waiting
    assert rows_of(again.form("g1", ["a", "b"], now=6.0)) == []  # formed once


def test_a_group_formed_live_logs_no_arrival_twice() -> None:
    live = LobbyState(config())
    lobby_rows(live, [("a", "c1", 1.0), ("b", "c2", 2.0)])
    rows = rows_of(live.form("g1", ["a", "b"], now=3.0))
    assert [r["channel"] for r in rows] == [GROUP_FORMED]


class BotsDirectory(LobbyDirectory):
    """The store's side of a lobby whose groups may hold seats bots play."""

    def __init__(self, store: FakeStore, groups: list[str]) -> None:
        super().__init__(store, groups)
        self.bots: dict[str, list[str]] = {}

    async def form_group(
        self, session: str, group: str, members: list[str], bots: int = 0
    ) -> tuple[list[str], list[str]]:
        return self.formed.setdefault(group, members), self.bots.get(group, [])


async def test_a_group_formed_with_a_bot_before_a_crash_is_logged_with_its_bot() -> None:
    """`on_lobby_timeout: bots`: the store formed g1 with a and a bot's seat x; the worker died
    before logging it. The next worker logs g1 with its bot, and no arrival for the bot."""
    store = FakeStore()
    bus = MemoryBus(store)
    directory = BotsDirectory(store, ["g1", "g2"])
    log_writer = LogWriter(cast(Bus, bus), interval=0.01, max_records=100)

    def worker() -> DecisionsWorker:
        return DecisionsWorker(
            cast(Bus, bus), cast(Directory, directory), DecisionsMetrics(), log_writer
        )

    first, second = worker(), worker()
    try:
        await (await first.handle(arrival("a", "ca")))  # a waits: logged
        directory.formed["g1"], directory.bots["g1"] = ["a", "x"], ["x"]
        await (await second.handle(arrival("a", "ca")))  # the input again, on a new worker
        rows = [(r["channel"], r["participant"]) for r in store.rows]
        assert rows == [(LOBBY_JOIN, "a"), (GROUP_FORMED, None)], rows
        formed = [r["value"] for r in store.rows if r["channel"] == GROUP_FORMED]
        assert formed == [{"group": "g1", "members": ["a", "x"], "bots": ["x"]}]
        assert moved(bus) == [("a", {"group": "g1", "members": ["a", "x"]})]
    finally:
        for each in (first, second):
            await each.close()
        await log_writer.close()
