"""The live monitor's seats (PROTOCOL v2 "Online studies"): each participant's label, status
and outcome in the view, changed by logged `presence` and `finished` rows, and a label the
study link gave read from the store when its seat is first seen. No broker, no database: the
repository is a fake holding participant documents."""

from __future__ import annotations

from typing import Any, cast

from services.store.monitor import LiveHub, LiveSession, seat_view


def document(code: str, **fields: Any) -> dict[str, Any]:
    return {"_id": code, "group": "g", "id_in_group": 1, "url": f"http://gw/p/{code}", **fields}


def out(channel: str, value: Any, participant: str | None = None) -> dict[str, Any]:
    return {
        "id": f"{channel}-{participant}",
        "ts": 1.0,
        "session": "s",
        "group": "g",
        "participant": participant,
        "direction": "out",
        "channel": channel,
        "seq": None,
        "value": value,
    }


class Participants:
    """The repository's `session_participants`, from documents the test changes."""

    def __init__(self, documents: list[dict[str, Any]]) -> None:
        self.documents = documents
        self.reads = 0

    async def session_participants(self, session_id: str) -> list[dict[str, Any]]:
        self.reads += 1
        return self.documents


def test_a_seats_view_has_its_label_status_and_outcome() -> None:
    assert seat_view(document("a")) == {
        "code": "a",
        "group": "g",
        "id_in_group": 1,
        "url": "http://gw/p/a",
        "label": None,
        "status": "unassigned",
        "outcome": None,
        "connected": False,
        "lobby_since": None,
        "seen": False,
        "bot": False,
    }
    done = seat_view(document("b", label="P2", seen=True, outcome="dropout"))
    assert (done["label"], done["status"], done["outcome"]) == ("P2", "finished", "dropout")
    assert seat_view(document("c", taken=True))["status"] == "playing"


async def test_presence_and_finished_rows_change_seats_and_a_new_label_is_read() -> None:
    documents = [document("a"), document("b", label="P2")]
    repository = Participants(documents)
    hub = LiveHub(cast(Any, None), cast(Any, repository), instance="test")
    live = LiveSession("s")
    live.participants = [seat_view(d) for d in documents]
    assert "seen" not in live.participants_view()[0]

    live.fold(out("presence", {"participant": "b", "connected": True}))
    assert live.changed_seats and not live.unread_labels  # b's label was known already
    assert [p["status"] for p in live.participants_view()] == ["unassigned", "playing"]

    # a came through the study link with a label: the log says only that a is connected.
    documents[0] = document("a", label="P1", taken=True)
    live.changed_seats = False
    live.fold(out("presence", {"participant": "a", "connected": True}))
    assert live.unread_labels
    await hub._read_labels(live)
    assert repository.reads == 1
    assert [(p["label"], p["status"]) for p in live.participants_view()] == [
        ("P1", "playing"),
        ("P2", "playing"),
    ]

    live.changed_seats = False
    value = {"outcome": "completed", "total_payoff": 3.0, "redirect": None, "code": None}
    live.fold(out("finished", value, participant="a"))
    live.fold(out("presence", {"participant": "b", "connected": False}))
    assert live.changed_seats
    assert [(p["status"], p["outcome"]) for p in live.participants_view()] == [
        ("finished", "completed"),
        ("playing", None),
    ]


def test_a_bot_s_presence_marks_the_seat_without_connecting_it() -> None:
    live = LiveSession("s")
    live.participants = [seat_view(document("a", seen=True, connected=False))]
    live.fold(out("presence", {"participant": "a", "connected": True, "bot": True}))
    (seat,) = live.participants_view()
    assert (seat["bot"], seat["connected"], seat["status"]) == (True, False, "playing")
    assert seat_view(document("b", bot_played=True))["bot"] is True
