"""The arrival lobby after a worker died between the store's forming a group and the log's
holding it (services/common/lobby.py `form`, found by tests/faults/test_lobby_faults.py): the
rebuilt lobby logs the arrival the log lost, before the group, and a fold of the log arrives
at the same state."""

from __future__ import annotations

from typing import Any

from services.common.lobby import GROUP_FORMED, LOBBY_JOIN, LobbyConfig, LobbyState, rebuild
from tests.unit.test_lobby import config, rows_of


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
