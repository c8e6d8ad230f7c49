"""Fault injection for the arrival lobby (PROTOCOL v2 "The lobby", issue 19 "Crash safety"):
real processes killed by SIGKILL under the real supervisor, people on real WebSockets (the
fault bots of `services.bots.client`, which reconnect as canopy.js does). After each fault:
nothing acknowledged is lost, no group is formed twice, no seat is given two groups.

- decisions killed while people wait: the gateway announces them again (`Resync`, a lobby
  `hello`), the lobby is rebuilt from its log, and the next arrival (while decisions is down,
  or after it is back) forms a group with those who waited, in order of arrival.
- timers (and, separately, decisions) killed just before someone's `lobby_timeout` deadline:
  the durable wake-up still fires (late), the person gets `finished` (`lobby_timeout`), one
  `lobby_timeout` row, one `finished`; under `on_lobby_timeout: bots` they get a group with a
  bot instead, formed once.
- decisions (twice, the kill falling a little later) and the store killed around group
  formation, in several sessions at once: each group's `group_formed` row once, the store's
  groups the same, each member its group's `hello`.
- the gateway killed while people wait: the browsers reconnect to the restarted gateway and are
  back in the lobby with their places (the same deadline, the same order).
- two people arriving at the same moment through two gateways form one group; one label taken
  through two gateways at the same moment gets one seat.

Recovery times are printed (`-s`): from the kill to the group's `hello` / the `finished`.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.infra import free_port, spawn, stop_process
from devstack.stack import PROJECT_ROOT, port_variable
from services.bots import client
from tests.e2e.protocol import raw_ws_url
from tests.faults.test_faults import epoch, export, researcher

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

RECOVERY = 45.0  # seconds a person may wait for what a recovery owes them


# -- sessions and people ---------------------------------------------------------------------


async def arrival_session(
    api: httpx.AsyncClient, *, seats: int, size: int, name: str, **settings: Any
) -> dict[str, Any]:
    """An arrival session of `decisions` (one period of 30 s unless `settings` say)."""
    body = {
        "experiment": "decisions",
        "num_participants": seats,
        "group_size": size,
        "num_periods": 1,
        "period_length": 30.0,
        "grouping": "arrival",
        "label": name,
        **settings,
    }
    response = await api.post("/api/sessions", json=body)
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return session


class Person:
    """A browser on one seat: a client that only listens and reconnects (50 ms .. 1 s), as
    canopy.js does after its socket closed."""

    def __init__(self, gateway_url: str, seat: dict[str, Any]) -> None:
        self.code: str = seat["code"]
        self.bot = client.Bot(
            raw_ws_url(gateway_url, seat["key"]),
            strategy=None,
            min_delay=0.05,
            max_delay=1.0,
            code=self.code,
        )

    def start(self) -> None:
        self.bot.start()

    async def stop(self) -> None:
        await self.bot.stop()

    def hellos(self, since: float = float("-inf")) -> list[dict[str, Any]]:
        return [p for p in self.bot.payloads("hello", since)]

    def lobby_hellos(self, since: float = float("-inf")) -> list[dict[str, Any]]:
        return [h for h in self.hellos(since) if h["group"] is None]

    def group_hello(self) -> dict[str, Any] | None:
        return next((h for h in self.hellos() if h["group"] is not None), None)

    def counts(self, since: float = float("-inf")) -> list[dict[str, Any]]:
        return [p for p in self.bot.payloads("lobby", since)]

    def at(self, channel: str, check: Any = None, since: float = float("-inf")) -> float | None:
        """When the first `channel` frame (for which `check(payload)` holds) arrived."""
        for received in self.bot.received:
            if received.channel != channel or received.at < since:
                continue
            if check is None or check(received.payload):
                return received.at
        return None

    async def until(self, what: str, check: Any, timeout: float = RECOVERY) -> None:
        await self.bot.wait_for(what, check, timeout)

    async def in_lobby(self, timeout: float = RECOVERY) -> dict[str, Any]:
        """Until its lobby `hello` and a `lobby` count came; that count."""
        await self.until("lobby hello", lambda: self.lobby_hellos(), timeout)
        await self.until("lobby count", lambda: self.counts(), timeout)
        return self.counts()[-1]

    def started(self) -> bool:
        """Its group's period started: `period_start` came, or a group `hello` said so (a
        rebuilt worker may apply the period's start before the members are announced again:
        their hellos then say the period runs, and no `period_start` frame follows)."""
        return self.at("period_start") is not None or any(
            h["group"] is not None and h["period"]["state"] != "waiting" for h in self.hellos()
        )

    async def grouped(self, timeout: float = RECOVERY) -> dict[str, Any]:
        """Until its group's `hello` came and its period started; that hello."""
        await self.until("group hello", lambda: self.group_hello() is not None, timeout)
        await self.until("the period's start", self.started, timeout)
        hello = self.group_hello()
        assert hello is not None
        return hello


@contextlib.asynccontextmanager
async def people(gateway_url: str, seats: list[dict[str, Any]]) -> AsyncIterator[list[Person]]:
    """Persons on `seats` (not started), stopped on exit."""
    persons = [Person(gateway_url, seat) for seat in seats]
    try:
        yield persons
    finally:
        for person in persons:
            await person.stop()


async def wait_api(check: Any, what: str, timeout: float = RECOVERY) -> Any:
    """Poll until `check()` answers something true (the store writes the log in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s")
        await asyncio.sleep(0.05)


async def export_until(
    api: httpx.AsyncClient, session: str, done: Any, what: str
) -> list[dict[str, Any]]:
    async def rows() -> list[dict[str, Any]] | None:
        found = await export(api, session)
        return found if done(found) else None

    result: list[dict[str, Any]] = await wait_api(rows, what)
    return result


def lobby_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["group"] == ""]


def formed_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r["channel"] == "group_formed"]


def check_groups(session: dict[str, Any], rows: list[dict[str, Any]], detail: dict[str, Any]
                 ) -> dict[str, list[str]]:  # fmt: skip
    """Each `group_formed` row once per group, the session detail's groups and seats the same,
    no seat in two groups, and every member's arrival (but a bot's) logged before its group; the
    groups formed (group → members)."""
    formed = formed_rows(rows)
    per_group = Counter(r["value"]["group"] for r in formed)
    assert all(n == 1 for n in per_group.values()), f"a group formed twice: {formed}"
    logged = {r["value"]["group"]: r["value"]["members"] for r in formed}
    stored = {g["group"]: g["participants"] for g in detail["groups"] if g["participants"]}
    assert logged == stored, (logged, stored)
    members = [code for group in logged.values() for code in group]
    assert len(members) == len(set(members)), f"a seat in two groups: {logged}"
    seat = {p["code"]: p for p in detail["participants"]}
    for group, codes in logged.items():
        for index, code in enumerate(codes, start=1):
            assert (seat[code]["group"], seat[code]["id_in_group"]) == (group, index), seat[code]
    assert all(seat[c]["group"] is None for c in seat if c not in members)
    # Before it in the log's order (the export's; its µs stamps may tie where ts differ by
    # one TICK).
    order = {id(r): n for n, r in enumerate(rows)}
    joins = {r["participant"]: order[id(r)] for r in rows if r["channel"] == "lobby_join"}
    for row in formed:
        bots = row["value"].get("bots") or []  # seats bots play: no arrivals
        for code in [c for c in row["value"]["members"] if c not in bots]:
            assert code in joins and joins[code] < order[id(row)], (
                f"{code} in group {row['value']['group']} without its lobby_join before: "
                f"{[(r['channel'], r['participant']) for r in lobby_rows(rows)]}"
            )
    return logged


async def detail(api: httpx.AsyncClient, session: str) -> dict[str, Any]:
    response = await api.get(f"/api/sessions/{session}")
    assert response.status_code == 200, response.text
    found: dict[str, Any] = response.json()
    return found


async def kill(stack: Any, victim: str) -> tuple[int, float]:
    """SIGKILL `victim`; its pid and the monotonic time of the kill."""
    previous = stack.pid(victim)
    killed_at = time.monotonic()
    stack.kill(victim, signal.SIGKILL)
    return previous, killed_at


async def restarted(stack: Any, victim: str, previous: int) -> float:
    result: float = await asyncio.to_thread(stack.wait_restarted, victim, previous, 60)
    return result


# -- 1. decisions killed while people wait ---------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("arrives", ["while decisions is down", "after decisions is back"])
async def test_decisions_killed_while_people_wait(supervised: Any, arrives: str) -> None:
    stack = supervised
    gateway = stack.urls["gateway"]
    async with researcher(stack) as api:
        session = await arrival_session(api, seats=6, size=3, name=f"lobby decisions {arrives}")
        sid, seats = session["session"], session["participants"]
        # Arrival order is not seat order: the first to arrive has seat 2.
        async with people(gateway, [seats[2], seats[0], seats[4]]) as (a, b, c):
            a.start()
            await a.in_lobby()
            b.start()
            await b.in_lobby()
            await a.until("2 waiting", lambda: a.counts()[-1]["waiting"] == 2)
            deadlines = {p.code: p.counts()[-1]["timeout_at"] for p in (a, b)}
            # Both arrivals acknowledged: in the log before the kill.
            await export_until(
                api,
                sid,
                lambda r: [x["channel"] for x in lobby_rows(r)] == ["lobby_join"] * 2,
                "2 lobby_join rows",
            )

            previous, killed_at = await kill(stack, "decisions")
            if arrives.startswith("while"):
                c.start()
            restart = await restarted(stack, "decisions", previous)
            if arrives.startswith("after"):
                c.start()

            hellos = [await p.grouped() for p in (a, b, c)]
            grouped_at = max(
                p.at("hello", lambda h: h["group"] is not None) or 0 for p in (a, b, c)
            )
            # Announced again (Resync): a lobby hello after the kill, with the same place.
            for person in (a, b):
                assert person.lobby_hellos(killed_at), f"{person.code}: no hello after the kill"
                again = [x for x in person.counts(killed_at)]
                assert all(x["timeout_at"] == deadlines[person.code] for x in again), again

        codes = [a.code, b.code, c.code]
        assert [h["members"] for h in hellos] == [codes] * 3, hellos  # order of arrival
        assert [h["id_in_group"] for h in hellos] == [1, 2, 3]
        assert {h["group"] for h in hellos} == {session["groups"][0]["group"]}
        rows = await export_until(api, sid, lambda r: formed_rows(r), "group_formed")
        logged = check_groups(session, rows, await detail(api, sid))
        assert logged == {session["groups"][0]["group"]: codes}
        channels = [(r["channel"], r["participant"]) for r in lobby_rows(rows)]
        assert channels == [
            ("lobby_join", a.code),
            ("lobby_join", b.code),
            ("lobby_join", c.code),
            ("group_formed", ""),
        ], channels
    print(
        f"\nLOBBY decisions killed, {arrives}: back in {restart:.2f} s, group's hello "
        f"{grouped_at - killed_at:.2f} s after the kill ({grouped_at - killed_at - restart:.2f} s "
        f"after it was ready); members in order of arrival"
    )


# -- 2. timers (or decisions) killed before a lobby deadline -----------------------------------


async def wakeup_scheduled(stack: Any, code: str, timeout: float = RECOVERY) -> None:
    """Until the timers service logged that it holds the wake-up of `code` (durable now)."""
    path: Path = stack.log_path("timers")
    deadline = time.monotonic() + timeout
    while f"wake-up for {code} at" not in await asyncio.to_thread(
        path.read_text, "utf-8", "replace"
    ):
        assert time.monotonic() < deadline, f"no wake-up for {code} in {path}"
        await asyncio.sleep(0.05)


# How long before the deadline each victim is killed: so that the deadline passes while it
# restarts (timers: and waits for the lease; decisions: the tick waits in the lobby's queue).
KILL_BEFORE_DEADLINE = {"timers": 1.0, "decisions": 0.3}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["timers", "decisions"])
async def test_killed_before_a_lobby_deadline(supervised: Any, victim: str) -> None:
    stack = supervised
    timeout = 5.0
    async with researcher(stack) as api:
        session = await arrival_session(
            api,
            seats=2,
            size=2,
            name=f"lobby deadline {victim}",
            lobby_timeout=timeout,
            labels=["P 1", "P 2"],
            completion={"lobby_timeout": {"url": "https://example.org/wait?pid={label}"}},
        )
        sid = session["session"]
        async with people(stack.urls["gateway"], session["participants"][:1]) as (a,):
            a.start()
            count = await a.in_lobby()
            await wakeup_scheduled(stack, a.code)
            # Killed just before the deadline (the server's clock, this machine's).
            before = KILL_BEFORE_DEADLINE[victim]
            await asyncio.sleep(max(0.0, count["timeout_at"] - before - time.time()))
            previous, killed_at = await kill(stack, victim)
            killed_epoch = time.time()
            restart = await restarted(stack, victim, previous)
            await a.until("finished", lambda: a.bot.outcome is not None)
            finished_at = a.at("finished")
            assert finished_at is not None
            finished_epoch = time.time() - (time.monotonic() - finished_at)
        assert a.bot.outcome == {
            "outcome": "lobby_timeout",
            "total_payoff": 0.0,
            "redirect": "https://example.org/wait?pid=P%201",
            "code": None,
        }
        assert killed_epoch < count["timeout_at"]

        rows = await export_until(
            api, sid, lambda r: any(x["channel"] == "finished" for x in r), "finished row"
        )
        channels = [(r["channel"], r["participant"], r["group"]) for r in rows]
        assert channels == [
            ("lobby_join", a.code, ""),
            ("lobby_timeout", a.code, ""),
            ("finished", a.code, ""),
        ], channels
        assert epoch(rows[1]["ts"]) >= count["timeout_at"] - 1e-3  # never early
        assert rows[2]["value"] == a.bot.outcome

        async def released() -> dict[str, Any] | None:
            found = await detail(api, sid)
            return found if found["participants"][0]["outcome"] else None

        seat = (await wait_api(released, "the outcome in the session detail"))["participants"][0]
        assert (seat["status"], seat["outcome"], seat["group"]) == (
            "finished",
            "lobby_timeout",
            None,
        )
        # Nothing more came: one lobby_timeout, one finished.
        again = Counter(r["channel"] for r in await export(api, sid))
        assert (again["lobby_timeout"], again["finished"]) == (1, 1), again
    print(
        f"\nLOBBY {victim} killed {count['timeout_at'] - killed_epoch:.2f} s before the deadline: "
        f"back in {restart:.2f} s, finished {finished_at - killed_at:.2f} s after the kill "
        f"({finished_epoch - count['timeout_at']:.2f} s late)"
    )


@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["timers", "decisions"])
async def test_killed_before_a_lobby_deadline_with_bots(supervised: Any, victim: str) -> None:
    """`on_lobby_timeout: bots`: at the deadline the one waiting gets a group at once, a bot in
    a free seat: also when timers or decisions died just before it. One group, with its bot,
    and no `lobby_timeout` or `finished` for anyone."""
    stack = supervised
    async with researcher(stack) as api:
        session = await arrival_session(
            api,
            seats=4,
            size=2,
            name=f"lobby deadline bots {victim}",
            lobby_timeout=5.0,
            on_lobby_timeout="bots",
        )
        sid, seats = session["session"], session["participants"]
        async with people(stack.urls["gateway"], [seats[2]]) as (a,):
            a.start()
            count = await a.in_lobby()
            await wakeup_scheduled(stack, a.code)
            before = KILL_BEFORE_DEADLINE[victim]
            await asyncio.sleep(max(0.0, count["timeout_at"] - before - time.time()))
            previous, killed_at = await kill(stack, victim)
            killed_epoch = time.time()
            restart = await restarted(stack, victim, previous)
            hello = await a.grouped()
            grouped_at = a.at("hello", lambda h: h["group"] is not None)
            assert grouped_at is not None
        assert killed_epoch < count["timeout_at"]
        group = session["groups"][0]["group"]
        assert hello["group"] == group and hello["members"][0] == a.code, hello
        (bot,) = hello["members"][1:]
        rows = await export_until(api, sid, lambda r: formed_rows(r), "group_formed")
        assert check_groups(session, rows, await detail(api, sid)) == {group: [a.code, bot]}
        assert formed_rows(rows)[0]["value"]["bots"] == [bot]
        assert epoch(formed_rows(rows)[0]["ts"]) >= count["timeout_at"] - 1e-3  # never early
        channels = [(r["channel"], r["participant"]) for r in lobby_rows(rows)]
        assert channels == [("lobby_join", a.code), ("group_formed", "")], channels
        assert not [r for r in rows if r["channel"] in ("lobby_timeout", "finished")]
    print(
        f"\nLOBBY {victim} killed {count['timeout_at'] - killed_epoch:.2f} s before a deadline "
        f"(bots): back in {restart:.2f} s, the group's hello with a bot "
        f"{grouped_at - killed_at:.2f} s after the kill"
    )


# -- 3. decisions (or the store) killed around group formation --------------------------------

SESSIONS = 6  # per round: one group forming in each at about the same moment
STAGGER = 0.015  # seconds between the second arrivals of the round's sessions


@pytest.mark.timeout(240)
@pytest.mark.parametrize(("victim", "round_"), [("decisions", 0), ("decisions", 2), ("store", 0)])
async def test_killed_while_groups_form(supervised: Any, victim: str, round_: int) -> None:
    """The store decides which group forms (`form_group`); decisions logs and announces it. A
    kill of either while groups form: each group once, everyone its group's hello."""
    stack = supervised
    gateway = stack.urls["gateway"]
    async with researcher(stack) as api:
        sessions = [
            await arrival_session(api, seats=4, size=2, name=f"lobby forming {victim} {round_}.{n}")
            for n in range(SESSIONS)
        ]
        # In each session the seat 3 arrives first, then the seat 1.
        firsts = [s["participants"][3] for s in sessions]
        seconds = [s["participants"][1] for s in sessions]
        async with people(gateway, firsts + seconds) as persons:
            waiting, coming = persons[:SESSIONS], persons[SESSIONS:]
            for person in waiting:
                person.start()
            for person in waiting:
                await person.in_lobby()
            # The second arrivals, a few ms apart; the victim is killed as soon as the first
            # one's socket is open (its presence is published then), a bit later each round.

            async def arrive() -> None:
                for person in coming:
                    person.start()
                    await asyncio.sleep(STAGGER)  # spreads the arrivals over the kill

            arriving = asyncio.create_task(arrive())
            await coming[0].until("open socket", lambda: coming[0].bot.connects >= 1)
            await asyncio.sleep(round_ * 0.02)  # where the kill falls: not a synchronisation
            previous, killed_at = await kill(stack, victim)
            killed_epoch = time.time()
            await arriving
            restart = await restarted(stack, victim, previous)
            hellos = {p.code: await p.grouped() for p in persons}
            grouped_at = max(p.at("hello", lambda h: h["group"] is not None) or 0 for p in persons)
            reconnected = sum(p.bot.connects > 1 for p in persons)

        before = after = 0
        for session, first, second in zip(sessions, waiting, coming, strict=True):
            sid, group = session["session"], session["groups"][0]["group"]
            members = [first.code, second.code]
            assert hellos[first.code]["members"] == members, hellos[first.code]
            assert hellos[second.code]["members"] == members, hellos[second.code]
            assert hellos[first.code]["group"] == hellos[second.code]["group"] == group
            rows = await export_until(api, sid, lambda r: formed_rows(r), "group_formed")
            assert check_groups(session, rows, await detail(api, sid)) == {group: members}
            formed_ts = epoch(formed_rows(rows)[0]["ts"])
            before += formed_ts < killed_epoch
            after += formed_ts >= killed_epoch
    print(
        f"\nLOBBY {victim} killed {round_ * 20} ms after a second arrival ({SESSIONS} groups "
        f"forming): back in {restart:.2f} s, every group's hello {grouped_at - killed_at:.2f} s "
        f"after the kill ({grouped_at - killed_at - restart:.2f} s after it was ready); {before} "
        f"groups logged before the kill, {after} after; "
        f"{reconnected} sockets reconnected; each group formed once"
    )


# -- 4. the gateway killed while people wait -------------------------------------------------


@pytest.mark.timeout(150)
@pytest.mark.parametrize("comes_back", ["at once", "after the leave"])
async def test_gateway_killed_while_people_wait(supervised: Any, comes_back: str) -> None:
    """`at once`: the browsers reconnect as soon as the gateway is back (often before
    decisions noticed the gateway's death: then no `lobby_leave` is logged, the new connection
    replaces the dead one). `after the leave`: they come back once decisions logged their
    `lobby_leave` (its heartbeats stopped): their places are kept all the same."""
    stack = supervised
    gateway = stack.urls["gateway"]
    async with researcher(stack) as api:
        session = await arrival_session(api, seats=6, size=3, name=f"lobby gateway {comes_back}")
        sid, seats = session["session"], session["participants"]
        async with people(gateway, [seats[5], seats[1], seats[3]]) as (a, b, c):
            a.start()
            await a.in_lobby()
            b.start()
            await b.in_lobby()
            await a.until("2 waiting", lambda: a.counts()[-1]["waiting"] == 2)
            deadlines = {p.code: p.counts()[-1]["timeout_at"] for p in (a, b)}
            await export_until(
                api,
                sid,
                lambda r: [x["channel"] for x in lobby_rows(r)] == ["lobby_join"] * 2,
                "2 lobby_join rows",
            )

            previous, killed_at = await kill(stack, "gateway")
            killed_epoch = time.time()
            if comes_back == "after the leave":
                for person in (a, b):  # these browsers stay away for now
                    await person.stop()
            restart = await restarted(stack, "gateway", previous)
            if comes_back == "after the leave":
                await export_until(
                    api,
                    sid,
                    lambda r: sum(x["channel"] == "lobby_leave" for x in r) == 2,
                    "a lobby_leave for each person waiting",
                )
                left_at = time.monotonic()
                for person in (a, b):
                    person.start()  # the same seats, new sockets
            # Back in the lobby: a lobby hello on a new socket, the same deadline, 2 waiting.
            for person in (a, b):
                await person.until(
                    "back in the lobby",
                    lambda p=person: any(x["waiting"] == 2 for x in p.counts(killed_at)),
                )
                assert person.bot.connects >= 2
                assert person.lobby_hellos(killed_at)
                assert {x["timeout_at"] for x in person.counts(killed_at)} == {
                    deadlines[person.code]
                }
            back_at = max(
                p.at("lobby", lambda x: x["waiting"] == 2, killed_at) or 0 for p in (a, b)
            )
            c.start()
            hellos = [await p.grouped() for p in (a, b, c)]
            grouped_at = max(
                p.at("hello", lambda h: h["group"] is not None) or 0 for p in (a, b, c)
            )

        codes = [a.code, b.code, c.code]
        assert [h["members"] for h in hellos] == [codes] * 3, hellos  # their places kept
        rows = await export_until(api, sid, lambda r: formed_rows(r), "group_formed")
        assert check_groups(session, rows, await detail(api, sid)) == {
            session["groups"][0]["group"]: codes
        }
        joins = [r for r in rows if r["channel"] == "lobby_join"]
        arrived = {r["participant"]: r["value"]["arrived"] for r in joins}
        assert all(r["value"]["arrived"] == arrived[r["participant"]] for r in joins), joins
        leaves = [r for r in rows if r["channel"] == "lobby_leave"]
        assert all(epoch(r["ts"]) > killed_epoch for r in leaves), leaves
        for person in (a, b):
            mine = [r["channel"] for r in lobby_rows(rows) if r["participant"] == person.code]
            expected = [["lobby_join", "lobby_leave", "lobby_join"]]
            if comes_back == "at once":  # replaced before decisions saw the gateway go
                expected.append(["lobby_join"])
            assert mine in expected, (person.code, mine)
    if comes_back == "after the leave":
        timing = f"lobby_leave logged {left_at - killed_at:.2f} s after the kill, back "
    else:
        timing = f"{len(leaves)} of 2 lobby_leave logged, back "
    print(
        f"\nLOBBY gateway killed, people back {comes_back}: gateway back in {restart:.2f} s, "
        f"{timing}in the lobby {back_at - killed_at:.2f} s after the kill (same places), the "
        f"group's hello {grouped_at - killed_at:.2f} s after it"
    )


@pytest.mark.timeout(150)
async def test_gateway_killed_while_someone_arrives_through_another(supervised: Any) -> None:
    """Two wait on the gateway that is killed; a third arrives through a second gateway at
    once. Either decisions still counts the two as waiting (their gateway's heartbeats had not
    stopped long enough yet): the group forms meanwhile, its notice to their dead sockets is
    lost, and the restarted gateway gives them their group from the store when they
    reconnect; or it logged their `lobby_leave` first, and the group forms when they are
    back. Either way: one group, in order of arrival, and everyone gets its `hello`."""
    stack = supervised
    with second_gateway(stack) as other:
        async with researcher(stack) as api:
            session = await arrival_session(api, seats=6, size=3, name="lobby gateway meanwhile")
            sid, seats = session["session"], session["participants"]
            async with (
                people(stack.urls["gateway"], [seats[4], seats[2]]) as (a, b),
                people(other, [seats[0]]) as (c,),
            ):
                a.start()
                await a.in_lobby()
                b.start()
                await b.in_lobby()
                await a.until("2 waiting", lambda: a.counts()[-1]["waiting"] == 2)
                await export_until(
                    api,
                    sid,
                    lambda r: [x["channel"] for x in lobby_rows(r)] == ["lobby_join"] * 2,
                    "2 lobby_join rows",
                )
                previous, killed_at = await kill(stack, "gateway")
                c.start()
                restart = await restarted(stack, "gateway", previous)
                hellos = [await p.grouped() for p in (a, b, c)]
                grouped_at = max(
                    p.at("hello", lambda h: h["group"] is not None) or 0 for p in (a, b, c)
                )
            codes = [a.code, b.code, c.code]
            assert [h["members"] for h in hellos] == [codes] * 3, hellos
            rows = await export_until(api, sid, lambda r: formed_rows(r), "group_formed")
            group = session["groups"][0]["group"]
            assert check_groups(session, rows, await detail(api, sid)) == {group: codes}
            leaves = sum(r["channel"] == "lobby_leave" for r in rows)
            formed_while_away = lobby_rows(rows)[-1]["channel"] == "group_formed" and not leaves
    print(
        f"\nLOBBY gateway killed while a third arrives through another: gateway back in "
        f"{restart:.2f} s, the group's hello {grouped_at - killed_at:.2f} s after the kill; "
        f"{'formed while the two were away' if formed_while_away else f'{leaves} lobby_leave'}"
    )


# -- 5. two gateways -------------------------------------------------------------------------


@contextlib.contextmanager
def second_gateway(stack: Any) -> Any:
    """Another gateway process on the supervised stack: the supervised gateway's environment
    (read from /proc), on a port of its own; stopped on exit."""
    pid = stack.pid("gateway")
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
    port = free_port()
    env[port_variable("gateway")] = str(port)
    log = stack.run_dir / "logs" / f"gateway-{port}.log"
    process = spawn([sys.executable, "-m", "services.gateway"], env=env, log=log, cwd=PROJECT_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        with httpx.Client(timeout=2.0) as http:
            while True:
                assert process.poll() is None, log.read_text()[-2000:]
                with contextlib.suppress(httpx.TransportError):
                    if http.get(f"{url}/readyz").status_code == 200:
                        break
                assert time.monotonic() < deadline, "second gateway not ready"
                time.sleep(0.1)  # a process starting: nothing to wait on but /readyz
        yield url
    finally:
        stop_process(process, grace=5.0)


PAIRS = 5  # sessions, each with two people arriving at once through two gateways


@pytest.mark.timeout(150)
async def test_two_people_arriving_at_once_through_two_gateways(supervised: Any) -> None:
    stack = supervised
    first_gateway = stack.urls["gateway"]
    with second_gateway(stack) as other_gateway:
        async with researcher(stack) as api:
            sessions = [
                await arrival_session(api, seats=4, size=2, name=f"lobby two gateways {n}")
                for n in range(PAIRS)
            ]
            started = time.monotonic()
            persons = [
                Person(gateway, seat)
                for session in sessions
                for gateway, seat in zip(
                    (first_gateway, other_gateway), session["participants"][:2], strict=True
                )
            ]
            try:
                for person in persons:  # every socket opened at once
                    person.start()
                hellos = {p.code: await p.grouped() for p in persons}
                grouped_at = max(
                    p.at("hello", lambda h: h["group"] is not None) or 0 for p in persons
                )
            finally:
                for person in persons:
                    await person.stop()
            for session in sessions:
                sid, group = session["session"], session["groups"][0]["group"]
                pair = [p["code"] for p in session["participants"][:2]]
                members = hellos[pair[0]]["members"]
                assert sorted(members) == sorted(pair), members
                assert hellos[pair[1]]["members"] == members
                assert {hellos[c]["group"] for c in pair} == {group}
                rows = await export_until(api, sid, lambda r: formed_rows(r), "group_formed")
                assert check_groups(session, rows, await detail(api, sid)) == {group: members}

            # One label through two gateways at the same moment: one seat.
            study = await arrival_session(api, seats=2 * PAIRS, size=2, name="lobby one label")
            join_key = study["join_url"].rsplit("/join/", 1)[1]
            labels = [f"twice {n}" for n in range(PAIRS)]
            async with (
                httpx.AsyncClient(base_url=first_gateway, timeout=10.0) as one,
                httpx.AsyncClient(base_url=other_gateway, timeout=10.0) as two,
            ):
                for label in labels:
                    answers = await asyncio.gather(
                        one.get(f"/join/{join_key}", params={"label": label}),
                        two.get(f"/join/{join_key}", params={"label": label}),
                    )
                    assert [r.status_code for r in answers] == [303, 303], answers
                    assert answers[0].headers["location"] == answers[1].headers["location"]
            found = await detail(api, study["session"])
            taken = sorted(p["label"] for p in found["participants"] if p["label"])
            assert taken == labels, taken  # each label one seat, no seat two labels
    print(
        f"\nLOBBY two gateways: {PAIRS} pairs arriving at once grouped in "
        f"{grouped_at - started:.2f} s, one group each; one label twice at once: one seat"
    )
