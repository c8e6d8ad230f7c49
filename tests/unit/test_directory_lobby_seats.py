"""The gateway's seat cache and the lobby: a seat in the lobby is cached (every socket of a
launch would otherwise ask the store again), and follows its seat into the group the lobby
gives it, so the seat's next socket goes straight there."""

from __future__ import annotations

from services.common.directory import Directory, ParticipantInfo
from services.common.messages import lobby_group


async def test_a_lobby_seat_is_cached_and_follows_its_group() -> None:
    directory = Directory("http://store.invalid", "token")
    try:
        directory._remember_seat(
            {
                "key": "k1",
                "seat": {
                    "participant": "a",
                    "session": "s",
                    "group": None,
                    "id_in_group": None,
                    "experiment": "decisions",
                },
            }
        )
        assert await directory.seat("k1") == ParticipantInfo(
            participant="a", session="s", group=lobby_group("s"), id_in_group=0,
            experiment="decisions",
        )  # fmt: skip
        directory.regrouped("a", "g1", 2)
        moved = await directory.seat("k1")  # no store: from the cache
        assert (moved.group, moved.id_in_group) == ("g1", 2)
        directory.regrouped("a", "g9", 1)  # a repeated notice changes nothing
        assert (await directory.seat("k1")).group == "g1"
    finally:
        await directory.close()
