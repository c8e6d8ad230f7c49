"""The decisions worker's lobby, with a fake bus and store (as in test_decisions_eviction.py):
people waiting form a group through the store, whose word wins; a lobby that is done is evicted
once the log holds it, and someone back on an old link is sent to their group after a rebuild.
The real stack plays the same story in tests/e2e/test_lobby.py and tests/faults."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from services.common.bus import Bus
from services.common.directory import Directory, NotFound
from services.common.lobby import GROUP_FORMED, LobbyConfig
from services.common.messages import Envelope, MessageType, lobby_group
from services.decisions.handlers import DecisionsWorker
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from tests.memory_bus import FakeStore, MemoryBus
from tests.unit.test_decisions_eviction import TIMEOUT

LOBBY = lobby_group("s")


class LobbyDirectory:
    """The store's side of a lobby: its config, its log (rows of the group ""), and groups
    formed once (`formed` may hold one formed before, as after a crash)."""

    def __init__(self, store: FakeStore, groups: list[str]) -> None:
        self.store = store
        self.groups = groups
        self.formed: dict[str, list[str]] = {}

    async def lobby(self, session: str) -> LobbyConfig:
        if session != "s":
            raise NotFound(session)
        return LobbyConfig(
            session="s",
            experiment="decisions",
            group_size=2,
            lobby_timeout=300.0,
            groups=self.groups,
            formed=dict(self.formed),
        )

    async def lobby_log(self, session: str) -> list[dict[str, Any]]:
        return sorted(self.store.rows, key=lambda row: float(row["ts"]))

    async def form_group(
        self, session: str, group: str, members: list[str], bots: int = 0
    ) -> tuple[list[str], list[str]]:
        return self.formed.setdefault(group, members), []

    async def barrier_passed(self, barrier: str) -> bool:
        return barrier in self.store.barriers


def arrival(participant: str, connection: str, *, connected: bool = True) -> Envelope:
    return Envelope(
        type=MessageType.PRESENCE_CHANGED,
        session="s",
        group=LOBBY,
        participant=participant,
        connection=connection,
        gateway="gw",
        payload={"connected": connected},
    )


def moved(bus: MemoryBus) -> list[tuple[str | None, Any]]:
    return [(e.participant, e.payload) for e in bus.sent if e.channel == GROUP_FORMED]


async def test_a_lobby_forms_groups_through_the_store_and_goes_when_done() -> None:
    store = FakeStore()
    bus = MemoryBus(store)
    directory = LobbyDirectory(store, ["g1"])
    directory.formed["g1"] = ["b", "a"]  # formed before (a worker died before logging it)
    log_writer = LogWriter(cast(Bus, bus), interval=0.01, max_records=100)
    worker = DecisionsWorker(
        cast(Bus, bus), cast(Directory, directory), DecisionsMetrics(), log_writer, evict_after=0.05
    )

    async def handle(envelope: Envelope) -> None:
        await (await worker.handle(envelope))

    try:
        await handle(arrival("a", "ca"))
        await handle(arrival("c", "cc"))
        # The store's g1 stands: a goes to it (with b), c waits; nobody forms g1 again.
        assert moved(bus) == [("a", {"group": "g1", "members": ["b", "a"]})]
        assert list(worker.lobbies[LOBBY].waiting) == ["c"]
        assert directory.formed == {"g1": ["b", "a"]}
        formed = [r["value"] for r in store.rows if r["channel"] == GROUP_FORMED]
        assert formed == [{"group": "g1", "members": ["b", "a"]}]

        # No group left: once c leaves nobody waits, and the lobby goes once logged.
        await handle(arrival("c", "cc", connected=False))
        assert LOBBY in worker.lobbies  # c keeps their place until their deadline
        await worker._evict_ended()
        assert LOBBY in worker.lobbies  # someone waits: the lobby stays
        worker.lobbies[LOBBY].release("c", now=0.0)
        await asyncio.wait_for(worker._evict_ended(), TIMEOUT)  # after a log barrier
        assert LOBBY not in worker.lobbies

        # b, on an old page, opens the lobby's socket: rebuilt, and sent to their group.
        bus.sent.clear()
        await handle(arrival("b", "cb"))
        assert moved(bus) == [("b", {"group": "g1", "members": ["b", "a"]})]
        assert [r["channel"] for r in store.rows].count(GROUP_FORMED) == 1
    finally:
        await worker.close()
        await log_writer.close()
