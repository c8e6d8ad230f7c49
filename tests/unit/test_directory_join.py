"""The gateway's Directory keeps the seat a study-link join gave (services/common/directory.py):
the person's socket opens right after the 303, and asking the store `/internal/seats` again
for a seat it has just described cost the gateway a sixth of its CPU in a launch
(docs/performance.md, "Study-link launch"). A small stand-in store counts what it is asked."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.common.directory import Directory, NotFound

SEAT_INFO = {
    "participant": "p1",
    "session": "s1",
    "group": "g1",
    "id_in_group": 2,
    "experiment": "decisions",
}


def store(answer: dict[str, Any]) -> tuple[FastAPI, list[str]]:
    asked: list[str] = []
    app = FastAPI()

    @app.post("/internal/join/{join_key}")
    async def join(join_key: str) -> dict[str, Any]:
        asked.append("join")
        return answer

    @app.get("/internal/seats/{key}")
    async def seat(key: str) -> dict[str, Any]:
        asked.append("seat")
        return SEAT_INFO

    return app, asked


async def directory_for(app: FastAPI) -> Directory:
    directory = Directory("http://store", "token")
    await directory.close()
    directory._client = httpx.AsyncClient(  # the same client, on the stand-in store
        transport=httpx.ASGITransport(app=app), base_url="http://store"
    )
    return directory


async def test_the_seat_a_join_gives_is_known_without_asking_again() -> None:
    app, asked = store({"key": "K1", "finished": False, "label": "P1", "seat": SEAT_INFO})
    directory = await directory_for(app)
    try:
        await directory.join("J", {"PROLIFIC_PID": "P1"}, None)
        info = await directory.seat("K1")
    finally:
        await directory.close()
    assert info.model_dump() == SEAT_INFO
    assert asked == ["join"]


@pytest.mark.parametrize(
    "answer",
    [
        {"key": "K1", "finished": False, "label": "P1"},  # a store from before `seat`
        {"key": "K1", "finished": False, "label": "P1", "seat": {"participant": "p1"}},
        {"full": True, "redirect": None, "code": "FULL"},
    ],
)
async def test_without_a_whole_seat_in_the_answer_the_socket_asks(answer: dict[str, Any]) -> None:
    app, asked = store(answer)
    directory = await directory_for(app)
    try:
        assert await directory.join("J", {}, None) == answer
        info = await directory.seat("K1")
    finally:
        await directory.close()
    assert info.model_dump() == SEAT_INFO
    assert asked == ["join", "seat"]


async def test_a_key_remembered_as_unknown_is_known_once_a_join_gives_it() -> None:
    app, asked = store({"key": "K1", "finished": False, "label": None, "seat": SEAT_INFO})
    directory = await directory_for(app)
    directory._unknown_seats["K1"] = None
    try:
        with pytest.raises(NotFound):
            await directory.seat("K1")
        await directory.join("J", {}, None)
        assert (await directory.seat("K1")).participant == "p1"
    finally:
        await directory.close()
    assert asked == ["join"]
