"""The live monitor and the lobby (PROTOCOL v2 "The lobby", services/store/monitor.py): the
lobby's rows (group "") make a seat `lobby` with its `lobby_since` and whether it is connected,
`group_formed` gives its members their group and the group's view its members, over the group's
rows that came before the view knew them. No broker, no database."""

from __future__ import annotations

from typing import Any

from services.common import experiments
from services.common.directory import GroupConfig
from services.common.group import GroupState
from services.store.monitor import LiveSession, group_view, seat_view

ARRIVED = 1_800_000_000.25


def seat(code: str) -> dict[str, Any]:
    """A seat of an arrival session before anyone arrived: no group."""
    return {"_id": code, "group": None, "id_in_group": None, "url": f"http://gw/p/{code}"}


def row(
    n: int, group: str, channel: str, value: Any, participant: str | None = None
) -> dict[str, Any]:
    return {
        "id": f"r{n}",
        "ts": ARRIVED + n,
        "session": "s",
        "group": group,
        "participant": participant,
        "direction": "out",
        "channel": channel,
        "seq": None,
        "value": value,
    }


def live_session() -> LiveSession:
    live = LiveSession("s")
    live.participants = [seat_view(seat(code)) for code in ("a", "b", "c")]
    config = GroupConfig(
        session="s",
        group="g1",
        experiment="decisions",
        members=[],  # not formed when the view was built
        num_periods=1,
        period_length=30,
        num_subperiods=0,
        rate_limit=0,
        params={},
    )
    live.groups = {"g1": GroupState(config, experiments.get("decisions"))}
    return live


def seats(live: LiveSession) -> dict[str, dict[str, Any]]:
    return {p["code"]: p for p in live.participants_view()}


def test_people_wait_in_the_lobby_then_their_group_forms() -> None:
    live = live_session()
    assert seats(live)["a"]["status"] == "unassigned"

    live.fold(row(0, "", "lobby_join", {"participant": "b", "arrived": ARRIVED}, "b"))
    assert live.changed_seats
    b = seats(live)["b"]
    assert (b["status"], b["connected"], b["group"]) == ("lobby", True, None)
    assert b["lobby_since"] == "2027-01-15T08:00:00.250000Z"

    live.changed_seats = False
    live.fold(row(1, "", "lobby_leave", {"participant": "b"}, "b"))
    assert live.changed_seats
    assert (seats(live)["b"]["status"], seats(live)["b"]["connected"]) == ("lobby", False)
    # Back: the same place, the same `lobby_since` (the row carries the first arrival).
    live.fold(row(2, "", "lobby_join", {"participant": "b", "arrived": ARRIVED}, "b"))
    live.fold(row(3, "", "lobby_join", {"participant": "a", "arrived": ARRIVED + 3}, "a"))
    assert seats(live)["b"]["lobby_since"] == "2027-01-15T08:00:00.250000Z"

    # The group's own rows may reach the monitor before the lobby's group_formed.
    live.fold(row(4, "g1", "presence", {"participant": "b", "connected": True}))
    assert group_view(live.groups["g1"], ARRIVED + 4)["members"] == []
    formed = {"group": "g1", "members": ["b", "a"]}
    assert live.fold(row(5, "", "group_formed", formed))
    assert "g1" in live.dirty
    view = group_view(live.groups["g1"], ARRIVED + 5)
    assert view["members"] == ["b", "a"]
    assert view["connected"] == ["b"]  # the presence that came first is kept
    assert [(p["code"], p["status"], p["group"], p["id_in_group"]) for p in live.participants] == [
        ("a", "playing", "g1", 2),
        ("b", "playing", "g1", 1),
        ("c", "unassigned", None, None),
    ]
    # A repeated group_formed (a redelivery) changes nothing.
    live.dirty.clear()
    assert not live.fold(row(5, "", "group_formed", formed))
    assert not live.dirty


def test_released_from_the_lobby() -> None:
    live = live_session()
    live.fold(row(0, "", "lobby_join", {"participant": "c", "arrived": ARRIVED}, "c"))
    live.fold(row(1, "", "lobby_timeout", {"participant": "c"}, "c"))
    finished = {"outcome": "lobby_timeout", "total_payoff": 0.0, "redirect": None, "code": None}
    live.fold(row(2, "", "finished", finished, "c"))
    c = seats(live)["c"]
    assert (c["status"], c["outcome"]) == ("finished", "lobby_timeout")


def test_a_snapshots_seat_has_its_lobby_since() -> None:
    document = {**seat("a"), "connected": True, "seen": True, "lobby_since": ARRIVED}
    view = seat_view(document)
    assert (view["status"], view["connected"]) == ("lobby", True)
    assert view["lobby_since"] == "2027-01-15T08:00:00.250000Z"
