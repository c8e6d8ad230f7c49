"""The decisions worker waits for the store (services/decisions/handlers.py on
services/common/retry.py): a group's rebuild, a lobby's rebuild and a lobby's group formed in
the store are retried while the store cannot be reached, and end at once on what the store
answers (NotFound: the session was deleted; NoFreeSeats)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from services.common.directory import GroupConfig, NoFreeSeats, NotFound
from services.decisions import handlers
from services.decisions.handlers import DecisionsWorker
from services.decisions.log import LogWriter
from services.decisions.metrics import DecisionsMetrics
from tests.memory_bus import FakeDirectory, FakeStore, MemoryBus

CONFIG = GroupConfig(
    session="s",
    group="g",
    experiment="decisions",
    members=["a", "b"],
    num_periods=1,
    period_length=10.0,
    num_subperiods=0,
    rate_limit=0.0,
    params={},
)


class AwayStore(FakeDirectory):
    """The store's internal API, unreachable for its first `away` calls of each kind."""

    def __init__(self, store: FakeStore, away: int) -> None:
        super().__init__(store, CONFIG)
        self.away = away
        self.calls: dict[str, int] = {}

    def _call(self, kind: str) -> None:
        self.calls[kind] = self.calls.get(kind, 0) + 1
        if self.calls[kind] <= self.away:
            raise httpx.ConnectError("store away")

    async def group(self, group: str) -> GroupConfig:
        self._call("group")
        return await super().group(group)

    async def lobby(self, session: str) -> Any:
        self._call("lobby")
        return await super().lobby(session)


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(handlers, "STORE_RETRY_DELAY", 0.001)
    monkeypatch.setattr(handlers, "STORE_RETRY_MAX_DELAY", 0.002)


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


def worker_on(directory: FakeDirectory, store: FakeStore) -> tuple[DecisionsWorker, LogWriter]:
    bus = MemoryBus(store)
    log_writer = LogWriter(bus, interval=0.01, max_records=100)
    return DecisionsWorker(bus, directory, DecisionsMetrics(), log_writer), log_writer


async def test_a_rebuild_waits_for_the_store_and_a_deleted_group_ends_the_wait(
    store: FakeStore,
) -> None:
    directory = AwayStore(store, away=3)
    worker, log_writer = worker_on(directory, store)
    try:
        state = await worker._state("g")
        assert state is not None and state.config == CONFIG
        assert directory.calls["group"] == 4  # three refusals, then the answer
        assert worker.groups["g"] is state
        assert await worker._state("gone") is None  # NotFound: no retry
        assert directory.calls["group"] == 5
    finally:
        await worker.close()
        await log_writer.close()


async def test_a_lobby_waits_for_the_store_and_its_calls_end_on_the_stores_answer(
    store: FakeStore,
) -> None:
    directory = AwayStore(store, away=2)
    worker, log_writer = worker_on(directory, store)
    try:
        assert await worker._lobby("s") is None  # no lobby (NotFound), after the store is back
        assert directory.calls["lobby"] == 3
        failures = iter([httpx.ConnectError("away"), httpx.ReadTimeout("slow")])
        calls = 0

        async def form() -> str:
            nonlocal calls
            calls += 1
            failure = next(failures, None)
            if failure is not None:
                raise failure
            return "formed"

        assert await worker._store_call(form, "g1") == "formed"
        assert calls == 3
        for answer in (NotFound("g1"), NoFreeSeats("s")):
            tried = 0

            async def refused(answer: Exception = answer) -> str:
                nonlocal tried
                tried += 1
                raise answer

            with pytest.raises(type(answer)):
                await worker._store_call(refused, "g1")
            assert tried == 1
    finally:
        await worker.close()
        await log_writer.close()
