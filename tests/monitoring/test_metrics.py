"""Every service's `/metrics` after a short session on the real stack: each metric of issue 10
exists, and the counters moved by exactly what the session did (decisions applied = decisions
sent, latency histogram counts = broadcasts, drift count = ticks). And the logs of that
session: JSON lines with its identifiers, no participant code in uvicorn's handshake lines,
no line per decision."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from devstack.stack import SERVICES, StackHandle
from tests.e2e.protocol import Participant, connect_group, create_session, export_csv
from tests.monitoring.conftest import Scrape, metrics_url, scrape, scrape_all

pytestmark = [pytest.mark.e2e]

DECISIONS = 30
SUBPERIODS = 2
TICKS = 2 + SUBPERIODS  # period_start, each sub-period, period_end
TIMEOUT = 10.0

EXPECTED = {
    "gateway": [
        "canopy_gateway_connections",
        "canopy_gateway_connects",
        "canopy_gateway_disconnects",
        "canopy_gateway_replacements",
        "canopy_gateway_frames_in",
        "canopy_gateway_acks",
        "canopy_gateway_frames_out",
        "canopy_gateway_broadcasts",
        "canopy_gateway_outbox_frames",
        "canopy_gateway_outbox_frames_max",
        "canopy_gateway_confirm_seconds",
        "canopy_gateway_delivery_seconds",
        "canopy_gateway_slow_clients",
    ],
    "decisions": [
        "canopy_decisions_groups",
        "canopy_decisions_inputs",
        "canopy_decisions_frames",
        "canopy_decisions_coalesced",
        "canopy_decisions_broadcasts",
        "canopy_decisions_end_to_end_seconds",
        "canopy_decisions_handle_seconds",
        "canopy_decisions_rebuilds",
        "canopy_decisions_rebuild_seconds",
    ],
    "timers": [
        "canopy_timers_periods_running",
        "canopy_timers_ticks",
        "canopy_timers_tick_drift_seconds",
        "canopy_timers_late_ticks",
        "canopy_timers_leader",
    ],
    "store": [
        "canopy_store_events",
        "canopy_store_batch_size",
        "canopy_store_batch_seconds",
        "canopy_store_lag_seconds",
        "canopy_store_duplicates",
        "canopy_store_exports",
    ],
}


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=TIMEOUT) as client:
        yield client


@pytest.fixture
async def api(stack: StackHandle) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {stack.urls.admin_token}"}
    async with httpx.AsyncClient(
        base_url=stack.urls.store_url, headers=headers, timeout=TIMEOUT
    ) as client:
        yield client


def delta(after: Scrape, before: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


async def wait_metric(
    client: httpx.AsyncClient, url: str, name: str, value: float, **labels: str
) -> Scrape:
    """Scrape `url` (bounded) until `name{labels}` equals `value`: gauges settle after a close."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            result = await scrape(client, url)
            if result.value(name, **labels) == value:
                return result
            await asyncio.sleep(0.05)


def log_lines(stack: StackHandle, service: str, start: int) -> list[dict[str, Any]]:
    """The JSON lines a service logged after byte `start` of its log."""
    with stack.log_path(service).open("rb") as f:
        f.seek(start)
        text = f.read().decode()
    lines = []
    for line in text.splitlines():
        if line.startswith("=== devstack:"):
            continue
        lines.append(json.loads(line))  # every line a service writes is one JSON object
    return lines


async def test_a_session_moves_every_metric_by_what_it_did(
    stack: StackHandle, api: httpx.AsyncClient, client: httpx.AsyncClient
) -> None:
    log_starts = {name: stack.log_path(name).stat().st_size for name in SERVICES}
    before = await scrape_all(client, stack)
    for service, names in EXPECTED.items():
        missing = set(names) - before[service].families
        assert not missing, f"{service} lacks {sorted(missing)}"
        assert before[service].value(f"canopy_{service}_ready") == 1
        assert before[service].value(f"canopy_{service}_bus_reconnects_total") == 0
        (build,) = [k for k in before[service].samples if k[0] == f"canopy_{service}_build_info"]
        assert dict(build[1])["version"]

    session = await create_session(api, period_length=2.0, num_subperiods=SUBPERIODS)
    codes = [p["code"] for p in session["participants"]]
    keys = [p["key"] for p in session["participants"]]
    group = session["groups"][0]["group"]
    a, b = await connect_group(stack.urls.gateway_url, codes)
    for seq in range(1, DECISIONS + 1):
        value = seq / DECISIONS
        await a.send(value, seq=seq)
        await a.ack(seq)
        await b.expect("group_decisions", lambda p, v=value: p[codes[0]] == v)
    await a.ws.send("not json")  # refused by the gateway
    assert (await a.error())["code"] == "bad_json"
    await a.expect("period_end", timeout=TIMEOUT)
    await b.expect("period_end", timeout=TIMEOUT)
    late = await a.send(0.5)  # accepted by the gateway, refused by the state machine
    assert (await a.error(late))["code"] == "period_not_running"
    intruder = await Participant.connect(stack.urls.gateway_url, "x" * 20)  # refused: 4403
    await intruder.ws.wait_closed()
    await a.close()
    await b.close()

    # Everything settles: both sockets closed, every event written.
    gateway = await wait_metric(
        client, metrics_url(stack, "gateway"), "canopy_gateway_connections", 0
    )
    rows, exports = await _written(
        api, session["session"], lambda r: sum(x["channel"] == "presence" for x in r) == 4
    )
    # The export reads MongoDB, which shows a batch as soon as it is committed; the store
    # counts the batch just after that: wait for its counters to catch up with the export.
    inbound_rows = sum(r["direction"] == "in" for r in rows)
    async with asyncio.timeout(TIMEOUT):
        while True:
            after = await scrape_all(client, stack)
            written = delta(
                after["store"], before["store"], "canopy_store_events_total", direction="in"
            )
            if written >= inbound_rows:
                break
            await asyncio.sleep(0.05)  # polling /metrics: the store has no event to wait on
    after["gateway"] = gateway
    bef = before

    # gateway
    g, gb = after["gateway"], bef["gateway"]
    assert delta(g, gb, "canopy_gateway_connects_total", outcome="accepted") == 2
    assert delta(g, gb, "canopy_gateway_connects_total", outcome="unknown_participant") == 1
    assert delta(g, gb, "canopy_gateway_disconnects_total") == 2
    assert delta(g, gb, "canopy_gateway_replacements_total") == 0
    accepted = delta(
        g, gb, "canopy_gateway_frames_in_total", channel="decisions", outcome="accepted"
    )
    assert accepted == DECISIONS + 1
    assert delta(g, gb, "canopy_gateway_frames_in_total", channel="-", outcome="bad_json") == 1
    assert delta(g, gb, "canopy_gateway_acks_total") == DECISIONS + 1
    assert delta(g, gb, "canopy_gateway_confirm_seconds_count") == DECISIONS + 1
    # Each group broadcast a decision caused, written to both members' sockets.
    assert delta(g, gb, "canopy_gateway_delivery_seconds_count") == 2 * DECISIONS
    delivery = delta(g, gb, "canopy_gateway_delivery_seconds_sum") / (2 * DECISIONS)
    assert 0 < delivery < 1.0
    assert g.value("canopy_gateway_outbox_frames") == 0

    # decisions
    d, db = after["decisions"], bef["decisions"]
    assert delta(d, db, "canopy_decisions_frames_total", outcome="applied") == DECISIONS
    assert delta(d, db, "canopy_decisions_frames_total", outcome="period_not_running") == 1
    assert delta(d, db, "canopy_decisions_frames_total", outcome="duplicate") == 0
    assert delta(d, db, "canopy_decisions_coalesced_total") == 0  # rate_limit 0
    assert delta(d, db, "canopy_decisions_inputs_total", type="FrameAccepted") == DECISIONS + 1
    assert delta(d, db, "canopy_decisions_inputs_total", type="TimerFired") == TICKS
    broadcasts = delta(d, db, "canopy_decisions_broadcasts_total", channel="group_decisions")
    assert broadcasts == DECISIONS
    assert delta(d, db, "canopy_decisions_end_to_end_seconds_count") == broadcasts
    end_to_end = delta(d, db, "canopy_decisions_end_to_end_seconds_sum") / broadcasts
    assert 0 < end_to_end < delivery  # the socket write comes after the publish
    assert d.value("canopy_decisions_groups") >= 1

    # timers
    t, tb = after["timers"], bef["timers"]
    ticks = sum(
        delta(t, tb, "canopy_timers_ticks_total", event=event)
        for event in ("period_start", "subperiod", "period_end")
    )
    assert ticks == TICKS
    assert delta(t, tb, "canopy_timers_tick_drift_seconds_count") == ticks
    assert delta(t, tb, "canopy_timers_late_ticks_total") == 0
    assert t.value("canopy_timers_periods_running") == 0
    assert t.value("canopy_timers_leader") == 1

    # store: what it counted is what the export holds (one session on this stack's log)
    s, sb = after["store"], bef["store"]
    inbound = [r for r in rows if r["direction"] == "in"]
    assert len(inbound) == DECISIONS + 1
    assert delta(s, sb, "canopy_store_events_total", direction="in") == len(inbound)
    assert delta(s, sb, "canopy_store_events_total", direction="out") == len(rows) - len(inbound)
    assert delta(s, sb, "canopy_store_duplicates_total") == 0
    assert delta(s, sb, "canopy_store_batch_size_sum") == len(rows)
    assert delta(s, sb, "canopy_store_exports_total", format="csv") == exports
    assert s.value("canopy_store_lag_seconds") == 0

    # logs: lifecycle lines with their identifiers, never a key in any line, and
    # nothing per decision at INFO.
    for service in SERVICES:
        lines = log_lines(stack, service, log_starts[service])
        assert all(line["service"] == service for line in lines)
        assert len(lines) < DECISIONS, f"{service} logged {len(lines)} lines for a short session"
        for line in lines:
            text = json.dumps(line)
            # PROTOCOL v2: a seat key is in no log line (its code is, as the member's name).
            assert not [k for k in keys if k in text], text
    gateway_lines = log_lines(stack, "gateway", log_starts["gateway"])
    connected = [line for line in gateway_lines if line["message"] == "participant connected"]
    assert {line["participant"] for line in connected} == set(codes)
    assert all(
        line["session"] == session["session"] and line["group"] == group for line in connected
    )
    handshakes = [line for line in gateway_lines if "WebSocket /ws/" in line["message"]]
    assert handshakes and all("/ws/<key>" in line["message"] for line in handshakes)


async def _written(
    api: httpx.AsyncClient, session: str, done: Callable[[list[dict[str, str]]], bool]
) -> tuple[list[dict[str, str]], int]:
    """The session's export once `done(rows)` holds (the store writes in batches), and how
    many exports that took (the store counts them too)."""
    exports = 0
    async with asyncio.timeout(TIMEOUT):
        while True:
            rows = await export_csv(api, session)
            exports += 1
            if done(rows):
                return rows, exports
            await asyncio.sleep(0.05)
