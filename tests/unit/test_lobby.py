"""The arrival lobby's state machine (services/common/lobby.py), without I/O: who waits, the
groups it proposes, timeouts, and that a rebuild from its log arrives at the live state."""

from __future__ import annotations

from typing import Any

from services.common.group import UNKNOWN, Broadcast, Control
from services.common.lobby import (
    GROUP_FORMED,
    LOBBY,
    LOBBY_JOIN,
    LOBBY_LEAVE,
    LOBBY_TIMEOUT,
    LobbyConfig,
    LobbyEffect,
    LobbyState,
    Record,
    WakeAt,
    rebuild,
)

GROUPS = ["g1", "g2"]


def config(**overrides: Any) -> LobbyConfig:
    body: dict[str, Any] = {
        "session": "s1",
        "experiment": "decisions",
        "group_size": 2,
        "lobby_timeout": 60.0,
        "groups": GROUPS,
        "completion": {"lobby_timeout": {"code": "WAITED"}},
    }
    return LobbyConfig(**(body | overrides))


def rows_of(effects: list[LobbyEffect]) -> list[dict[str, Any]]:
    """The log rows the adapter would write for these effects."""
    rows = []
    for effect in effects:
        if isinstance(effect, Record | Broadcast):
            rows.append(
                {
                    "ts": effect.ts,
                    "participant": effect.participant,
                    "direction": "out",
                    "channel": effect.channel,
                    "seq": None,
                    "value": effect.payload,
                }
            )
    return rows


def controls(effects: list[LobbyEffect], channel: str) -> list[Control]:
    return [e for e in effects if isinstance(e, Control) and e.channel == channel]


def test_a_first_arrival_waits_with_a_lobby_hello_a_count_and_a_wake_up() -> None:
    lobby = LobbyState(config())
    effects = lobby.on_presence("a", "c1", True, now=100.0)
    (hello,) = controls(effects, "hello")
    assert hello.payload["group"] is None and hello.payload["period"]["state"] == "lobby"
    (count,) = controls(effects, LOBBY)
    assert count.payload == {"waiting": 1, "group_size": 2, "timeout_at": 160.0}
    assert [e for e in effects if isinstance(e, WakeAt)] == [WakeAt("a", 160.0)]
    assert [r["channel"] for r in rows_of(effects)] == [LOBBY_JOIN]
    assert lobby.proposal() is None  # one waits, two are needed


def test_the_longest_waiting_connected_people_form_the_next_group() -> None:
    lobby = LobbyState(config(group_size=2))
    lobby.on_presence("a", "c1", True, now=1.0)
    lobby.on_presence("b", "c2", True, now=2.0)
    lobby.on_presence("b", "c2", False, now=3.0)  # b leaves: keeps their place, not present
    lobby.on_presence("c", "c3", True, now=4.0)
    assert lobby.proposal() == ("g1", ["a", "c"])
    effects = lobby.form("g1", ["a", "c"], now=5.0)
    assert [r["value"] for r in rows_of(effects)] == [{"group": "g1", "members": ["a", "c"]}]
    moved = controls(effects, GROUP_FORMED)
    assert [(c.participant, c.connection) for c in moved] == [("a", "c1"), ("c", "c3")]
    assert list(lobby.waiting) == ["b"]
    # b comes back: the same deadline (from the first arrival), first in line.
    effects = lobby.on_presence("b", "c4", True, now=50.0)
    assert controls(effects, LOBBY)[0].payload["timeout_at"] == 62.0
    lobby.on_presence("d", "c5", True, now=51.0)
    assert lobby.proposal() == ("g2", ["b", "d"])


def test_the_store_s_members_win_and_a_group_is_formed_once() -> None:
    lobby = LobbyState(config())
    lobby.on_presence("a", "c1", True, now=1.0)
    lobby.on_presence("b", "c2", True, now=2.0)
    lobby.on_presence("c", "c3", True, now=3.0)
    # The store had formed g1 with a and c already (a worker died before logging it).
    effects = lobby.form("g1", ["a", "c"], now=4.0)
    assert {c.participant for c in controls(effects, GROUP_FORMED)} == {"a", "c"}
    assert lobby.form("g1", ["a", "b"], now=5.0) == []  # formed once
    assert list(lobby.waiting) == ["b"]


def test_someone_grouped_who_connects_to_the_lobby_is_sent_to_their_group() -> None:
    lobby = LobbyState(config())
    lobby.on_presence("a", "c1", True, now=1.0)
    lobby.on_presence("b", "c2", True, now=2.0)
    lobby.form("g1", ["a", "b"], now=3.0)
    effects = lobby.on_presence("a", "c9", True, now=4.0)
    assert effects == [Control(GROUP_FORMED, {"group": "g1", "members": ["a", "b"]}, "a", "c9")]


def test_at_the_deadline_a_person_is_released_with_their_outcome() -> None:
    lobby = LobbyState(config(lobby_timeout=10.0))
    lobby.on_presence("a", "c1", True, now=1.0)
    lobby.on_presence("b", "c2", True, now=5.0)
    lobby.on_presence("b", "c2", False, now=6.0)
    effects = lobby.on_timer(LOBBY_TIMEOUT, "a", now=11.0)
    assert [r["channel"] for r in rows_of(effects)] == [LOBBY_TIMEOUT, "finished"]
    finished = next(e for e in effects if isinstance(e, Broadcast))
    assert finished.participant == "a"
    assert finished.payload == {
        "outcome": "lobby_timeout",
        "total_payoff": 0.0,
        "redirect": None,
        "code": "WAITED",
    }
    assert lobby.on_timer(LOBBY_TIMEOUT, "a", now=12.0) == []  # once
    # Back later: hello and the end again, never a place in line.
    back = lobby.on_presence("a", "c3", True, now=20.0)
    assert [c.channel for c in back if isinstance(c, Control)] == ["hello", "finished"]
    assert "a" not in lobby.waiting
    # A person away at their deadline is released too.
    assert rows_of(lobby.on_timer(LOBBY_TIMEOUT, "b", now=15.0))[0]["channel"] == LOBBY_TIMEOUT


def test_a_rebuild_from_the_log_arrives_at_the_live_state() -> None:
    live = LobbyState(config())
    log: list[dict[str, Any]] = []
    log += rows_of(live.on_presence("a", "c1", True, now=1.0))
    log += rows_of(live.on_presence("b", "c2", True, now=2.0))
    log += rows_of(live.on_presence("b", "c2", False, now=2.5))
    log += rows_of(live.on_presence("c", "c3", True, now=3.0))
    log += rows_of(live.form("g1", ["a", "c"], now=3.1))
    log += rows_of(live.on_presence("d", "c4", True, now=4.0))
    log += rows_of(live.on_timer(LOBBY_TIMEOUT, "b", now=62.0))
    assert [r["channel"] for r in log].count(LOBBY_LEAVE) == 1

    rebuilt = rebuild(config(), log)
    assert rebuilt.formed == live.formed and rebuilt.grouped == live.grouped
    assert rebuilt.finished == live.finished
    assert list(rebuilt.waiting) == ["d"] == list(live.waiting)
    assert rebuilt.waiting["d"].arrived == live.waiting["d"].arrived
    assert rebuilt.waiting["d"].connection == UNKNOWN  # until its gateway announces it
    assert rebuilt.clock == live.clock
    assert rebuilt.proposal() is None  # an UNKNOWN connection forms no group
    # Not announced again within the resync window: they left (and keep their place).
    assert [r["channel"] for r in rows_of(rebuilt.expire_unknown(now=70.0))] == [LOBBY_LEAVE]


def test_with_bots_an_overdue_person_gets_a_group_with_bots_at_once() -> None:
    lobby = LobbyState(config(group_size=3, on_lobby_timeout="bots", lobby_timeout=10.0))
    lobby.on_presence("a", "c1", True, now=1.0)
    lobby.on_presence("b", "c2", True, now=2.0)
    lobby.on_presence("b", "c2", False, now=3.0)  # away: not taken along
    lobby.on_presence("c", "c3", True, now=4.0)
    # The adapter forms a's group; b, first in line now, gets the next wake-up.
    assert lobby.on_timer(LOBBY_TIMEOUT, "a", now=11.0) == [WakeAt("b", 12.0)]
    assert lobby.bot_proposal() == ("g1", ["a", "c"], 1)
    effects = lobby.form("g1", ["a", "c", "z"], now=11.1, bots=["z"])
    assert rows_of(effects)[0]["value"] == {
        "group": "g1",
        "members": ["a", "c", "z"],
        "bots": ["z"],
    }
    assert lobby.bot_proposal() is None and list(lobby.waiting) == ["b"]
    # No free seat for the bots: released as under `release`.
    lobby.on_timer(LOBBY_TIMEOUT, "b", now=12.0)
    released = lobby.release("b", now=12.0)
    assert [r["channel"] for r in rows_of(released)] == [LOBBY_TIMEOUT, "finished"]
    assert lobby.bot_proposal() is None


def test_one_wake_up_at_a_time_for_the_first_in_line() -> None:
    lobby = LobbyState(config(group_size=3, lobby_timeout=10.0))
    wakes = []
    for i, code in enumerate("abcd"):
        effects = lobby.on_presence(code, f"c-{code}", True, now=float(i))
        wakes += [e for e in effects if isinstance(e, WakeAt)]
    assert wakes == [WakeAt("a", 10.0)]  # a's covers everyone behind a
    lobby.form("g1", ["a", "b", "c"], now=5.0)
    # a's wake-up fires although a is grouped: d, first in line now, gets theirs.
    assert lobby.on_timer(LOBBY_TIMEOUT, "a", now=10.0, at=10.0) == [WakeAt("d", 13.0)]
    assert lobby.on_timer(LOBBY_TIMEOUT, "a", now=10.5, at=10.0) == []  # repeated: nothing
    # d's fires a little early by the decisions clock: d is released all the same.
    released = lobby.on_timer(LOBBY_TIMEOUT, "d", now=12.9, at=13.0)
    assert [r["channel"] for r in rows_of(released)] == [LOBBY_TIMEOUT, "finished"]
    assert lobby.wake is None and not lobby.waiting
