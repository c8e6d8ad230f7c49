"""The researcher console's API against the whole stack: `GET /api/experiments`, monitor
tickets, and the live monitor's SSE stream (`GET /api/sessions/{id}/live`).

The stream is read as a browser's EventSource reads it (text/event-stream over plain HTTP);
participants are real WebSocket clients (tests/e2e/protocol.py).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from services.store.monitor import issue_ticket
from tests.e2e.protocol import Participant, connect_group, create_session

pytestmark = [pytest.mark.e2e]

TIMEOUT = 10.0


@dataclass
class Stream:
    """One open SSE stream, its events parsed as (event name, JSON data)."""

    lines: AsyncIterator[str]
    events: list[tuple[str, Any]] = field(default_factory=list)
    # Every group's latest view: the snapshot's, updated by the deltas (changed groups only).
    groups: dict[str, Any] = field(default_factory=dict)

    async def next(self) -> tuple[str, Any]:
        name = "message"
        data: list[str] = []
        async for line in self.lines:
            if line == "":
                if data:
                    event = (name, json.loads("\n".join(data)))
                    self.events.append(event)
                    if name in ("snapshot", "groups"):
                        self.groups.update({g["group"]: g for g in event[1]["groups"]})
                    return event
                name = "message"
            elif line.startswith("event:"):
                name = line[6:].strip()
            elif line.startswith("data:"):
                data.append(line[5:].strip())
        raise AssertionError("the stream ended")

    async def until(self, name: str, where: Callable[[Any], bool] = lambda _: True) -> Any:
        try:
            async with asyncio.timeout(TIMEOUT):
                while True:
                    event, data = await self.next()
                    if event == name and where(data):
                        return data
        except TimeoutError:
            raise AssertionError(f"no {name!r} event; the last ones: {self.events[-3:]}") from None


async def ticket(api: httpx.AsyncClient, session: str) -> str:
    response = await api.post("/api/monitor/tickets", json={"session": session})
    assert response.status_code == 201, response.text
    value: str = response.json()["ticket"]
    return value


@asynccontextmanager
async def live(api: httpx.AsyncClient, session: str) -> AsyncIterator[Stream]:
    async with httpx.AsyncClient(base_url=str(api.base_url), timeout=TIMEOUT) as anonymous:
        url = f"/api/sessions/{session}/live"
        async with anonymous.stream(
            "GET", url, params={"ticket": await ticket(api, session)}
        ) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            yield Stream(response.aiter_lines())


def group_of(data: dict[str, Any], group: str) -> dict[str, Any] | None:
    return next((g for g in data["groups"] if g["group"] == group), None)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    assert body["error"]["message"]
    return body


async def test_experiments_describe_every_experiment_and_the_session_settings(
    api: httpx.AsyncClient, stack: Any
) -> None:
    response = await api.get("/api/experiments")
    assert response.status_code == 200, response.text
    body = response.json()
    by_name = {e["name"]: e for e in body["experiments"]}
    # The built-ins and the plug-in the test stack has installed (tests/plugins/site).
    assert set(by_name) >= {"bimatrix", "decisions", "public_goods", "double_auction", "min_effort"}
    bimatrix = by_name["bimatrix"]
    assert bimatrix["channels"] == ["decisions"]
    assert bimatrix["min_group_size"] == 2
    assert bimatrix["group_size_rules"] == ["bimatrix needs groups of at least 2"]
    properties = bimatrix["params_schema"]["properties"]
    assert set(properties) == {"payoff_matrix", "game", "initial_decision"}
    assert by_name["double_auction"]["channels"] == ["cancel", "orders"]
    assert by_name["decisions"]["params_schema"]["properties"] == {}
    assert by_name["min_effort"]["params_schema"]["properties"]["max_effort"]["default"] == 7
    assert by_name["public_goods"]["min_group_size"] == 1
    settings = body["session_schema"]["properties"]
    assert settings["on_disconnect"]["enum"] == ["continue", "pause", "end_period", "bots"]
    assert set(settings) >= {"period_length", "num_subperiods", "rate_limit", "post_period_delay"}
    assert set(settings["experiment"]["enum"]) == set(by_name)

    async with httpx.AsyncClient(base_url=stack.urls.store_url, timeout=TIMEOUT) as anonymous:
        refused = await anonymous.get("/api/experiments")
        assert_error(refused, 401, "unauthorized")
        assert refused.headers["www-authenticate"] == "Bearer"
        assert_error(await anonymous.post("/api/monitor/tickets"), 401, "unauthorized")


async def test_the_live_stream_needs_a_valid_ticket(api: httpx.AsyncClient, stack: Any) -> None:
    session = (await create_session(api))["session"]
    token = stack.urls.admin_token
    url = f"/api/sessions/{session}/live"
    expired, _ = issue_ticket(token, session, now=time.time() - 120)
    forged, _ = issue_ticket("not the admin token", session)
    async with httpx.AsyncClient(base_url=stack.urls.store_url, timeout=TIMEOUT) as anonymous:
        assert_error(await anonymous.get(url), 401, "unauthorized")
        # The admin token itself is not a ticket: it must never travel in a URL.
        assert_error(await anonymous.get(url, params={"ticket": token}), 401, "unauthorized")
        for bad in (expired, forged, "", "9" * 40, "é.x"):
            assert_error(await anonymous.get(url, params={"ticket": bad}), 401, "unauthorized")
        valid = await ticket(api, "nosuch")
        missing = await anonymous.get("/api/sessions/nosuch/live", params={"ticket": valid})
        assert_error(missing, 404, "not_found")
        # A script may use the bearer token instead (a header, never the URL).
        bearer = {"Authorization": f"Bearer {token}"}
        async with anonymous.stream("GET", url, headers=bearer) as response:
            assert response.status_code == 200
            assert (await Stream(response.aiter_lines()).next())[0] == "snapshot"


async def test_the_monitor_shows_a_connect_within_a_second(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    created = await create_session(api, num_participants=2, group_size=2, period_length=30)
    session, group = created["session"], created["groups"][0]["group"]
    a, b = created["groups"][0]["participants"]
    async with live(api, session) as stream:
        snapshot = await stream.until("snapshot")
        view = group_of(snapshot, group)
        assert view is not None and view["connected"] == []
        assert view["period"]["state"] == "waiting"
        assert {p["code"] for p in snapshot["participants"]} == {a, b}

        started = time.perf_counter()
        first = await Participant.connect(gateway_url, a)
        await stream.until("groups", lambda d: (group_of(d, group) or {}).get("connected") == [a])
        connect_seconds = time.perf_counter() - started
        assert connect_seconds < 1.0, f"the monitor showed the connect after {connect_seconds}s"

        second = await Participant.connect(gateway_url, b)
        running = await stream.until(
            "groups",
            lambda d: (group_of(d, group) or {}).get("period", {}).get("state") == "running",
        )
        period = group_of(running, group)["period"]  # type: ignore[index]
        assert period["ends_at"] == pytest.approx(running["now"] + 30, abs=2)
        assert not period["overdue"]

        await first.expect("period_start")
        seq = await first.send(0.25)
        await first.ack(seq)
        decided = await stream.until(
            "groups", lambda d: (group_of(d, group) or {}).get("decisions", {}).get(a) == 0.25
        )
        assert group_of(decided, group)["decisions"][b] is None  # type: ignore[index]
        stats = await stream.until("stats")
        assert stats["events_per_second"] > 0

        await second.close()
        await stream.until("groups", lambda d: (group_of(d, group) or {}).get("connected") == [a])
        await first.close()
    print(f"monitor: connect shown {connect_seconds * 1000:.0f} ms after the WebSocket opened")


async def test_a_second_console_gets_the_same_state_from_a_snapshot(
    api: httpx.AsyncClient, gateway_url: str
) -> None:
    """A console opening mid-period gets the state from MongoDB once (the group's log folded),
    equal to what a console watching from the start built from deltas."""
    created = await create_session(api, experiment="bimatrix", params={"game": "stag_hunt"})
    session, group = created["session"], created["groups"][0]["group"]
    codes = created["groups"][0]["participants"]
    async with live(api, session) as early:
        await early.until("snapshot")
        members = await connect_group(gateway_url, codes)
        for value, member in zip((0.1, 0.9), members, strict=True):
            await member.ack(await member.send(value))
        want = {codes[0]: 0.1, codes[1]: 0.9}
        watched = await early.until(
            "groups", lambda d: (group_of(d, group) or {}).get("decisions") == want
        )
        async with live(api, session) as late:
            snapshot = await late.until("snapshot")
        fresh, built = group_of(snapshot, group), group_of(watched, group)
        assert fresh is not None and built is not None
        for key in ("connected", "decisions", "members"):
            assert fresh[key] == built[key], key
        assert fresh["period"]["ends_at"] == built["period"]["ends_at"]
        assert fresh["period"]["state"] == "running"
        for member in members:
            await member.close()


async def test_the_log_queue_exists_only_while_someone_watches(
    api: httpx.AsyncClient, infra_handle: Any
) -> None:
    session = (await create_session(api))["session"]

    async def monitor_queues() -> list[str]:
        result = await asyncio.to_thread(infra_handle.rabbitmqctl, "list_queues", "-q", "name")
        return [q for q in result.stdout.split() if q.startswith("canopy.monitor.")]

    async with live(api, session) as stream:
        await stream.until("snapshot")
        assert len(await monitor_queues()) == 1
    async with asyncio.timeout(TIMEOUT):
        while True:  # the store notices the closed stream on its own time
            if not await monitor_queues():
                break
            await asyncio.sleep(0.2)


async def test_bots_fill_the_empty_slots_and_stop(api: httpx.AsyncClient, gateway_url: str) -> None:
    created = await create_session(api, experiment="bimatrix", num_participants=4, group_size=2)
    session = created["session"]
    people = sorted(created["participants"], key=lambda p: (p["group"], p["id_in_group"]))
    url = f"/api/sessions/{session}/bots"
    assert_error(await api.post("/api/sessions/nosuch/bots"), 404, "not_found")
    bad = assert_error(await api.post(url, json={"strategy": "zi"}), 422, "invalid_request")
    assert bad["error"]["field"] == "strategy"
    bad = assert_error(await api.post(url, json={"rate": "fast"}), 422, "invalid_request")
    assert bad["error"]["field"] == "rate"
    assert (await api.get(url)).json()["running"] is False

    me = await Participant.connect(gateway_url, people[0]["code"])
    await me.expect("hello")
    async with live(api, session) as stream:
        await stream.until("snapshot")
        # One slot left for a second person; bots take the other two.
        response = await api.post(url, json={"strategy": "fixed", "rate": 5, "all_but": 1})
        assert response.status_code == 201, response.text
        started = response.json()
        assert started["running"] and started["strategy"] == "fixed"
        assert len(started["bots"]) == 2 and people[0]["code"] not in started["bots"]

        def connected(_: Any) -> set[str]:
            return {code for g in stream.groups.values() for code in g["connected"]}

        everyone_but_one = {people[0]["code"], *started["bots"]}
        await stream.until("groups", lambda d: connected(d) == everyone_but_one)
        assert (await api.get(url)).json()["connected"] == 2
        # The bots' slots are taken: asking again finds only the slot kept for a person.
        again = await api.post(url, json={"all_but": 1})
        assert_error(again, 422, "invalid_request")

        stopped = await api.delete(url)
        assert stopped.status_code == 200, stopped.text
        assert stopped.json()["stopped"] == 2 and stopped.json()["running"] is False
        await stream.until("groups", lambda d: connected(d) == {people[0]["code"]})
    await me.close()


async def test_bots_leave_once_the_session_is_over(api: httpx.AsyncClient) -> None:
    """A fleet whose last period ended closes its sockets: no bot holds a connection for ever."""
    created = await create_session(api, period_length=1.5)
    session = created["session"]
    url = f"/api/sessions/{session}/bots"
    response = await api.post(url, json={"strategy": "random_walk", "rate": 5})
    assert response.status_code == 201, response.text
    async with asyncio.timeout(30):
        while True:  # polling the API: the period runs on the server's clock
            detail = (await api.get(f"/api/sessions/{session}")).json()
            ended = all(g["period"]["state"] == "ended" for g in detail["groups"])
            if ended and detail["connected"] == 0:
                break
            await asyncio.sleep(0.1)
    assert (await api.get(url)).json()["running"] is False


async def test_after_a_broker_reconnection_the_view_is_rebuilt(
    api: httpx.AsyncClient, gateway_url: str, infra_handle: Any
) -> None:
    """Records published while the store's connection was down never reached the monitor's
    queue: a reconnection rebuilds the view from MongoDB (a new snapshot)."""
    created = await create_session(api)
    session, group = created["session"], created["groups"][0]["group"]
    a, _ = created["groups"][0]["participants"]

    def store_connections() -> list[str]:
        listed = infra_handle.rabbitmqctl("list_connections", "-q", "pid", "client_properties")
        return [line.split()[0] for line in listed.stdout.splitlines() if '"store ' in line]

    async with live(api, session) as stream:
        await stream.until("snapshot")
        (pid,) = await asyncio.to_thread(store_connections)
        closed = await asyncio.to_thread(
            infra_handle.rabbitmqctl, "close_connection", pid, "console test"
        )
        assert closed.returncode == 0, closed.stdout
        await stream.until("snapshot")  # rebuilt once the connection was restored
        member = await Participant.connect(gateway_url, a)
        await stream.until("groups", lambda d: (group_of(d, group) or {}).get("connected") == [a])
        await member.close()
