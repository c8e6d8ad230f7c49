"""The live monitor's pure parts (services/store/monitor.py): tickets, group views (time left
and overdue periods), folding log batches into watched sessions. No broker, no database."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any, cast

import orjson

from services.common import experiments
from services.common.directory import GroupConfig
from services.common.group import GroupState
from services.store.monitor import (
    TICKET_SECONDS,
    LiveHub,
    LiveSession,
    group_view,
    issue_ticket,
    ticket_valid,
)

TOKEN = "a-test-admin-token-0123456789"


def test_a_ticket_is_valid_until_it_expires_and_only_with_its_token_and_session() -> None:
    now = 1_000_000.0
    ticket, expires = issue_ticket(TOKEN, "s1", now=now)
    assert expires == int(now + TICKET_SECONDS) and TICKET_SECONDS <= 30
    assert ticket_valid(TOKEN, ticket, "s1", now=now)
    assert ticket_valid(TOKEN, ticket, "s1", now=expires)
    assert not ticket_valid(TOKEN, ticket, "s1", now=expires + 1)
    assert not ticket_valid("another-admin-token-0123456789", ticket, "s1", now=now)
    assert not ticket_valid(TOKEN, ticket, "s2", now=now)  # another session's stream
    assert ticket != issue_ticket(TOKEN, "s1", now=now)[0]  # each one new (single use)
    stamp, _, rest = ticket.partition(".")
    longer = f"{int(stamp) + 3600}.{rest}"  # a later expiry with the old signature
    assert not ticket_valid(TOKEN, longer, "s1", now=now)
    for garbage in ("", ".", "..", "abc", "12", f"{stamp}.", f"{stamp}..", "١٢٣.x.y", TOKEN):
        assert not ticket_valid(TOKEN, garbage, "s1", now=now), garbage


def state(experiment: str = "decisions", members: tuple[str, ...] = ("a", "b")) -> GroupState:
    config = GroupConfig(
        session="s",
        group="g",
        experiment=experiment,
        members=list(members),
        num_periods=2,
        period_length=30,
        num_subperiods=0,
        rate_limit=0,
        params={},
    )
    return GroupState(config, experiments.get(experiment))


def row(ts: float, channel: str, value: Any, **fields: Any) -> dict[str, Any]:
    return {
        "id": f"{channel}-{ts}",
        "ts": ts,
        "session": "s",
        "group": "g",
        "participant": None,
        "direction": "out",
        "channel": channel,
        "seq": None,
        "value": value,
        **fields,
    }


def presence(ts: float, code: str, connected: bool) -> dict[str, Any]:
    return row(ts, "presence", {"participant": code, "connected": connected})


def test_a_running_period_past_its_end_is_overdue_not_zero_seconds_left() -> None:
    group = state()
    now = time.time()
    for item in (presence(now - 40, "a", True), presence(now - 40, "b", True)):
        group.fold(item)
    group.fold(row(now - 35, "period_start", {"period": 1, "length": 30, "ends_at": now - 5}))
    view = group_view(group, now)
    assert view["connected"] == ["a", "b"]
    assert view["period"]["state"] == "running" and view["period"]["overdue"]
    assert view["period"]["ends_at"] == now - 5  # the server's end, never a stale "time left"
    assert not group_view(group, now - 10)["period"]["overdue"]

    group.fold(row(now - 1, "period_end", {"period": 1, "group_decisions": {}, "payoffs": {}}))
    after = group_view(group, now)
    # Period 2 waits until the group is complete again (everyone is, so decisions would start it).
    assert after["period"]["number"] == 2 and after["period"]["state"] == "waiting"
    assert not after["period"]["overdue"] and after["periods_ended"] == 1


def test_decisions_and_payoffs_come_from_the_groups_state_machine() -> None:
    group = state("public_goods")
    now = time.time()
    for item in (presence(now - 9, "a", True), presence(now - 9, "b", True)):
        group.fold(item)
    group.fold(row(now - 8, "period_start", {"period": 1, "length": 30, "ends_at": now + 22}))
    frame = row(now - 7, "decisions", 12, direction="in", participant="a", seq=1)
    group.fold(frame)
    group.fold(presence(now - 6, "b", False))
    view = group_view(group, now)
    assert view["decisions"] == {"a": 12, "b": 0}
    assert view["connected"] == ["a"]
    assert view["total_payoffs"] == {}
    assert "market" not in view
    assert "market" in group_view(state("double_auction"), now)  # the book


def test_events_per_second_average_the_last_seconds() -> None:
    live = LiveSession("s")
    live.count(10, 100.2)
    live.count(5, 101.7)
    assert live.events_per_second(101.9) == 3.0  # 15 events over the 5 s window
    assert live.events_per_second(105.5) == 1.0  # only second 101 is left in it
    live.count(1, 110.0)
    assert live.events_per_second(110.0) == 0.2


async def test_log_batches_are_held_before_the_snapshot_then_folded_once() -> None:
    hub = LiveHub(cast(Any, None), cast(Any, None), instance="test")
    live = LiveSession("s")
    hub._sessions["s"] = live
    now = time.time()
    before = [presence(now, "a", True)]
    other = {**presence(now, "a", True), "session": "another"}

    def message(records: list[dict[str, Any]]) -> Any:
        return SimpleNamespace(body=orjson.dumps({"id": "x", "records": records}))

    await hub._on_message(message([*before, other]))
    assert live.held == before  # the other session's record is not kept

    live.groups = {"g": state()}
    live.seen = {before[0]["id"]}
    live.ready = True
    later = presence(now + 1, "b", True)
    await hub._on_message(message([before[0], later]))  # the snapshot had the first one
    assert live.dirty == {"g"}
    assert group_view(live.groups["g"], now)["connected"] == ["b"]
    await hub._on_message(SimpleNamespace(body=b"not json"))  # ignored


def test_a_plugin_whose_hello_raises_still_gets_its_group_shown() -> None:
    class BrokenBook(experiments.DoubleAuction):
        def hello(self, state: Any) -> dict[str, Any]:
            raise RuntimeError("the plug-in's hello hook failed")

    config = state("double_auction").config
    group = GroupState(config, experiments.wrap(BrokenBook()))
    view = group_view(group, time.time())
    assert view["market"] == {}  # a failing hook counts as an empty answer (hello_extra)
    assert view["members"] == ["a", "b"] and view["period"]["number"] == 1
