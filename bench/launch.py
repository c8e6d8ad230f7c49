"""The "Prolific launch" row of `python -m bench --launch` (issue 19): a study goes live and
`people` open its study link within `within` seconds; the session has `seats` seats in groups
of `group_size`, fewer than the people, so the last ones get the "this study is full" page.
The session groups people as they arrive (`grouping: "arrival"`, the default: what a Prolific
study uses) or in fixed groups (`--grouping fixed`: a seat's group is set at creation).

Each simulated person does what a browser does up to the experiment: `GET /join/{join_key}`
with a Prolific-like query (`PROLIFIC_PID` = a unique 24-hex id, the session's `label_param`,
plus `STUDY_ID` and `SESSION_ID`), one new TCP connection each, redirects not followed; a 303
to `/p/{key}` is a seat, a 200 page with `data-outcome="full"` is "full", anything else an
error. A seated person then opens `/ws/{key}` (bench/wsclient.py, as the load generator does:
a browser does not fetch the page's assets faster than this), waits for the first `hello`, and
stays connected until every group that can form has had its `period_start`. Fixed grouping: the
first `hello` is the group's, and a group's period starts once all its members are connected.
Arrival grouping: the first `hello` is the lobby's (group null), `lobby` counts follow, then,
when the lobby forms the person's group, the group's `hello` and its `period_start`. Nobody
retries, nobody leaves.

Measured: `/join` → 303 and → full page, `/join` → first `hello` (the lobby's under arrival),
`/join` → the group's `hello`, and per group, from its last member's arrival (that member's
first `hello`: under arrival its lobby `hello`) to the group's `hello` that member receives
(the group formed; 0 under fixed grouping) and to its `period_start` (and from that member's
`/join`); each process's CPU over the burst (first arrival → last group started) and the
gateway's and store's RSS before and after; the load generator's own CPU as well.

Checked from the outside, after the burst, against the session as the store lays it out
(seat i is the i-th participant of `POST /api/sessions`, in group order) and its detail
(`GET /api/sessions/{id}`: each seat's label):
- no seat twice: no two people got the same key, every key is one of the session's, each
  seated person's label is on exactly the seat they were sent to, no seat carries a label
  nobody was given;
- seats filled in group order: the seats given are seats 0..n-1;
- arrival order, as far as the outside can tell it: when A's answer came back before B's
  request left, the store handled A first, so B must not have a seat if A got "full", and
  B's seat must come after A's (`order_violations`: both must be 0). Requests that overlap
  in time may be handled in either order, so "the first `seats` answered are the seated
  ones" is reported (`first_answered_seated`) but not required.

Under arrival grouping also (`lobby_checks`, all must be 0), from the sockets and from the
export's `group_formed` rows, read after the burst:
- lobby order, as far as the outside can tell it: when A's lobby `hello` came back before B
  began to open their socket, the lobby had taken A's arrival before B's could exist, so A is
  never grouped after B: A's group was not formed after B's (in the export's order of
  `group_formed` rows), and in one group A's place (`id_in_group`) comes first
  (`grouped_after_later`). Sockets whose openings overlap may be taken in either order;
- every group formed once (`formed_twice`), nobody in two groups (`in_two_groups`: two
  `group_formed` rows, or `hello`s naming two groups), every group a person was told of has
  its row, with the members the `hello` named (`not_logged`, `members_differ`), nobody
  seated without a group once the burst is over (`left_in_lobby`; the seats are a multiple
  of the group size and nobody leaves), and no lobby timeout during the burst.

Arrivals are spread evenly over `within` seconds, or (`--arrivals poisson`) as a Poisson
process with a seed: given its count, a Poisson process's arrival times are independent and
uniform over the window, so the schedule is `people` sorted uniform draws.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import orjson

from bench.loadgen import StackTarget, percentiles
from bench.procstats import Sample, machine_usage, usage
from bench.report import _fmt, machine_info, now_iso, repo_commit, table
from bench.wsclient import WsClient, parse_ws_target

ARRIVALS = ("even", "poisson")
GROUPINGS = ("arrival", "fixed")
PROLIFIC_ID_HEX = 24  # Prolific's participant ids are 24 hex digits (MongoDB ObjectIds)
POLL = 0.02  # s between looks at whether every group has started
FULL_MARK = 'data-outcome="full"'  # the full page's card (services/gateway/join.py)


@dataclass(frozen=True)
class LaunchParams:
    people: int = 1000
    seats: int = 800
    group_size: int = 4
    within: float = 10.0  # seconds over which the people arrive
    arrivals: str = "even"  # or "poisson" (seeded)
    seed: int = 19
    period: float = 5.0  # the session's one period
    grouping: str = "arrival"  # or "fixed"
    lobby_timeout: float = 300.0  # arrival: far past the burst, so nobody is released in it
    join_timeout: float = 30.0  # per person: the /join answer, then the socket's hello
    start_timeout: float = 60.0  # after the last arrival, for every group's period_start
    label_param: str = "PROLIFIC_PID"

    @property
    def groups(self) -> int:
        return self.seats // self.group_size

    def check(self) -> None:
        if self.people < 1 or self.seats < 1 or self.group_size < 1:
            raise ValueError("--people, --seats and --group-size must be at least 1")
        if self.seats % self.group_size:
            raise ValueError("--seats must be a multiple of --group-size")
        if not (self.within >= 0 and self.period > 0):
            raise ValueError("--within must be >= 0 and the period > 0")
        if self.arrivals not in ARRIVALS:
            raise ValueError(f"--arrivals must be one of {', '.join(ARRIVALS)}")
        if self.grouping not in GROUPINGS:
            raise ValueError(f"--grouping must be one of {', '.join(GROUPINGS)}")
        if not self.lobby_timeout > 0:
            raise ValueError("--lobby-timeout must be > 0")


# -- pure pieces --------------------------------------------------------------------------------


def arrival_schedule(people: int, within: float, kind: str = "even", seed: int = 19) -> list[float]:
    """When each person opens the link, seconds after the start, ascending, all in
    [0, within): evenly spaced, or a seeded Poisson process with `people` arrivals (uniform
    order statistics)."""
    if kind == "even":
        return [i * within / people for i in range(people)]
    if kind == "poisson":
        rng = random.Random(seed)
        return (
            sorted(rng.uniform(0, within) for _ in range(people)) if within > 0 else [0.0] * people
        )
    raise ValueError(f"arrivals must be one of {', '.join(ARRIVALS)}, not {kind!r}")


def prolific_ids(people: int, seed: int = 19) -> list[str]:
    """`people` distinct Prolific-like participant ids (24 lower-case hex digits), seeded."""
    rng = random.Random(seed)
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < people:
        candidate = f"{rng.getrandbits(4 * PROLIFIC_ID_HEX):0{PROLIFIC_ID_HEX}x}"
        if candidate not in seen:  # 96 random bits: a repeat is all but impossible, still
            seen.add(candidate)
            ids.append(candidate)
    return ids


@dataclass
class Person:
    """One person of the launch: what they sent, what came back, and when (perf_counter)."""

    index: int
    label: str
    due: float  # seconds after the start
    sent: float | None = None
    answered: float | None = None
    outcome: str = "pending"  # "seated" | "full" | "error"
    error: str | None = None
    key: str | None = None
    code: str | None = None  # the seat's participant code, as its first hello names it
    ws_sent: float | None = None  # the socket's opening began
    hello: float | None = None  # the first hello (the lobby's under arrival grouping)
    group_hello: float | None = None  # the first hello that names a group
    group: str | None = None  # that group
    members: tuple[str, ...] = ()  # its members, as that hello lists them
    groups_told: set[str] = field(default_factory=set)  # every group a hello named
    lobby_frames: int = 0  # `lobby` counts received
    started: float | None = None  # period_start received
    finished: bool = False  # `finished` received (the period ended while still connected)
    close_code: int | None = None


def order_violations(people: Iterable[Person], seat_of: Mapping[str, int]) -> dict[str, int]:
    """Arrival order as the outside can tell it: when A's answer arrived before B's request
    left, the store handled A before B. Then B must not be seated if A got "full"
    (`seat_after_full`), and a seated B's seat must come after every such seated A's
    (`seat_order`)."""
    # A seat given whose socket then failed (outcome "error", with a key) was given in order.
    answered = sorted(
        (p for p in people if p.answered is not None and (p.key or p.outcome == "full")),
        key=lambda p: p.answered or 0.0,
    )
    times = [p.answered or 0.0 for p in answered]
    any_full: list[bool] = []
    max_seat: list[int] = []
    full_so_far, highest = False, -1
    for p in answered:
        full_so_far = full_so_far or p.outcome == "full"
        seat = seat_of.get(p.key or "") if p.key else None
        if seat is not None:
            highest = max(highest, seat)
        any_full.append(full_so_far)
        max_seat.append(highest)
    counts = {"seat_after_full": 0, "seat_order": 0}
    for p in answered:
        if not p.key or p.sent is None:
            continue
        before = bisect.bisect_left(times, p.sent)  # answered strictly before p was sent
        if before == 0:
            continue
        if any_full[before - 1]:
            counts["seat_after_full"] += 1
        seat = seat_of.get(p.key or "")
        if seat is not None and max_seat[before - 1] >= seat:
            counts["seat_order"] += 1
    return counts


def seat_checks(
    people: Sequence[Person],
    layout_keys: Sequence[str],
    detail: Sequence[Mapping[str, Any]],
) -> dict[str, int]:
    """No seat twice, and seats in group order. `layout_keys`: the seats' keys in seat order
    (POST /api/sessions); `detail`: the session detail's participants (key, label)."""
    seat_of = {key: i for i, key in enumerate(layout_keys)}
    # A seat given (a 303) whose socket then failed is a seat given all the same.
    given = Counter(p.key for p in people if p.key)
    label_on = {str(d.get("key")): d.get("label") for d in detail}
    seated = [p for p in people if p.key]
    labels_given = {p.key: p.label for p in seated}
    seats_given = {seat_of[k] for k in given if k in seat_of}
    return {
        "keys_twice": sum(n - 1 for n in given.values() if n > 1),
        "unknown_keys": sum(1 for k in given if k not in seat_of),
        "label_mismatch": sum(1 for p in seated if label_on.get(p.key or "") != p.label),
        "orphan_labels": sum(
            1
            for d in detail
            if d.get("label") is not None and str(d.get("key")) not in labels_given
        ),
        "seats_out_of_order": len(seats_given - set(range(len(seats_given)))),
    }


def first_answered_seated(people: Iterable[Person], seats: int) -> int:
    """Of the first `seats` people whose /join was answered (seat or full), how many are
    seated (all of them when answers came back in the order the store handled them)."""
    answered = sorted(
        (p for p in people if p.answered is not None and p.outcome in ("seated", "full")),
        key=lambda p: p.answered or 0.0,
    )
    return sum(1 for p in answered[:seats] if p.outcome == "seated")


def group_formation(
    people: Iterable[Person], seat_of: Mapping[str, int], group_size: int, *, by_seat: bool = True
) -> dict[str, Any]:
    """Per group whose members all got `hello` and `period_start`: seconds from its last
    member's (first) hello to the period_start that member received (`from_hello`) and to the
    group's hello it received (`to_group_hello`: under arrival grouping its group forming; 0
    when the first hello is the group's), and from that last-arriving member's /join
    (`from_join`: the person whose request left last). Also how many groups were complete
    (every member connected, and under arrival told of the group) and how many started.

    A person's group is the one their hello named; `by_seat` (fixed grouping): one that has
    not named it yet counts in the group of their seat (seat // group_size)."""
    groups: dict[int | str, list[Person]] = {}
    for p in people:
        if p.outcome != "seated":
            continue
        seat = seat_of.get(p.key or "")
        bucket: int | str | None = p.group
        if bucket is None and by_seat and seat is not None:
            bucket = seat // group_size
        if bucket is not None:
            groups.setdefault(bucket, []).append(p)
    from_hello: list[float] = []
    to_group_hello: list[float] = []
    from_join: list[float] = []
    complete = started = 0
    for members in groups.values():
        if len(members) != group_size or any(m.hello is None for m in members):
            continue
        complete += 1
        if any(m.started is None for m in members):
            continue
        started += 1
        last = max(members, key=lambda m: m.hello or 0.0)
        from_hello.append((last.started or 0.0) - (last.hello or 0.0))
        told = last.group_hello if last.group_hello is not None else last.hello
        to_group_hello.append((told or 0.0) - (last.hello or 0.0))
        arrived = max(members, key=lambda m: m.sent or 0.0)
        from_join.append((arrived.started or 0.0) - (arrived.sent or 0.0))
    return {
        "complete": complete,
        "started": started,
        "from_hello": from_hello,
        "to_group_hello": to_group_hello,
        "from_join": from_join,
    }


def lobby_checks(
    people: Sequence[Person],
    formed: Sequence[tuple[str, Sequence[str]]],
    lobby_timeouts: int,
    group_size: int,
) -> dict[str, int]:
    """The arrival lobby seen from outside (all must be 0). `formed`: the export's
    `group_formed` rows as (group, members), in the log's order; `lobby_timeouts`: its
    `lobby_timeout` rows.

    `grouped_after_later` counts each person B grouped before someone A whose lobby hello
    came back before B began to open their socket: the lobby had taken A's arrival before
    B's presence could exist, and it groups the longest-waiting first, so A's place (its
    group's rank in `formed`, then its place in the members) must come before B's. People
    whose sockets opened while the other's arrival was in flight may be taken in either
    order, so they are not compared."""
    rank: dict[str, int] = {}
    rows_of: Counter[str] = Counter()
    member_rows: Counter[str] = Counter()
    members_of: dict[str, tuple[str, ...]] = {}
    for index, (group, members) in enumerate(formed):
        rows_of[group] += 1
        rank.setdefault(group, index)
        members_of.setdefault(group, tuple(members))
        member_rows.update(members)
    seated = [p for p in people if p.outcome == "seated" and p.hello is not None]
    in_two = {code for code, n in member_rows.items() if n > 1}
    in_two |= {p.code or p.key or "" for p in seated if len(p.groups_told) > 1}

    def place(p: Person) -> tuple[int, int] | None:
        if p.group not in rank or p.code is None:
            return None
        members = members_of[p.group or ""]
        return (rank[p.group or ""], members.index(p.code) if p.code in members else len(members))

    # Prefix maxima of the places, in order of lobby hello: "the latest place of anyone whose
    # lobby hello came back before t".
    by_hello = sorted(seated, key=lambda p: p.hello or 0.0)
    times = [p.hello or 0.0 for p in by_hello]
    highest: list[tuple[int, int]] = []
    best = (-1, -1)
    for p in by_hello:
        best = max(best, place(p) or (-1, -1))
        highest.append(best)
    after_later = 0
    for p in seated:
        mine = place(p)
        if mine is None or p.ws_sent is None:
            continue
        before = bisect.bisect_left(times, p.ws_sent)  # lobby hellos strictly before
        if before and highest[before - 1] > mine:
            after_later += 1
    return {
        "grouped_after_later": after_later,
        "formed_twice": sum(n - 1 for n in rows_of.values()),
        "in_two_groups": len(in_two),
        "not_logged": sum(1 for p in seated if p.group is not None and p.group not in rank),
        "members_differ": sum(
            1 for p in seated if p.group in members_of and members_of[p.group] != p.members
        ),
        # Fewer than a group's worth may wait for good (when the seated are no multiple of it).
        "left_in_lobby": max(
            0,
            sum(1 for p in seated if p.group_hello is None) - len(seated) % group_size,
        ),
        "lobby_timeouts": lobby_timeouts,
    }


def summarize(
    people: Sequence[Person],
    params: LaunchParams,
    layout_keys: Sequence[str],
    detail: Sequence[Mapping[str, Any]],
    start: float,
    formed: Sequence[tuple[str, Sequence[str]]] = (),
    lobby_timeouts: int = 0,
) -> dict[str, Any]:
    """The row's counts, checks and latencies (ms) from what each person saw; under arrival
    grouping also the lobby's checks against the export's `formed` groups (`lobby_checks`)."""
    seat_of = {key: i for i, key in enumerate(layout_keys)}
    arrival = params.grouping == "arrival"
    outcomes = Counter(p.outcome for p in people)
    errors = Counter(p.error or "unknown" for p in people if p.outcome == "error")
    seated = [p for p in people if p.outcome == "seated"]
    full = [p for p in people if p.outcome == "full"]
    formation = group_formation(people, seat_of, params.group_size, by_seat=not arrival)
    sent = [p.sent for p in people if p.sent is not None]

    def spans(items: Iterable[Person], a: str, b: str) -> list[float]:
        found = []
        for p in items:
            first, last = getattr(p, a), getattr(p, b)
            if first is not None and last is not None:
                found.append(last - first)
        return found

    checks = seat_checks(people, layout_keys, detail)
    violations = order_violations(people, seat_of)
    lobby = lobby_checks(people, formed, lobby_timeouts, params.group_size) if arrival else {}
    expected_seated = min(params.people, params.seats)
    counts = {
        "people": len(people),
        "seated": outcomes["seated"],
        "full": outcomes["full"],
        "errors": sum(errors.values()),
        "hello": sum(1 for p in seated if p.hello is not None),
        "started": sum(1 for p in seated if p.started is not None),
        "finished": sum(1 for p in seated if p.finished),
        "groups_complete": formation["complete"],
        "groups_started": formation["started"],
        "first_answered_seated": first_answered_seated(people, params.seats),
    }
    ok = (
        not errors
        and counts["seated"] == expected_seated
        and counts["full"] == params.people - expected_seated
        and counts["hello"] == counts["seated"]
        and formation["started"] == formation["complete"] == expected_seated // params.group_size
        and not any(checks.values())
        and not any(violations.values())
        and not any(lobby.values())
    )
    return {
        "counts": counts,
        "error_kinds": dict(errors),
        "seat_checks": checks,
        "order_violations": violations,
        # Arrival grouping only (else empty): see lobby_checks.
        "lobby_checks": lobby,
        "lobby": {
            "groups_formed": len({group for group, _ in formed}),
            "lobby_frames": sum(p.lobby_frames for p in seated),
            "order_compared": order_compared(people),
        }
        if arrival
        else {},
        "join_seat_ms": percentiles(spans(seated, "sent", "answered")),
        "join_full_ms": percentiles(spans(full, "sent", "answered")),
        # The first hello: the lobby's under arrival grouping, the group's under fixed.
        "join_to_hello_ms": percentiles(spans(seated, "sent", "hello")),
        # From the socket's opening to that hello (the /join's wait left out).
        "socket_to_hello_ms": percentiles(spans(seated, "ws_sent", "hello")),
        "join_to_group_hello_ms": percentiles(spans(seated, "sent", "group_hello")),
        # Per group, from its last member's arrival (first hello): the group's hello that
        # member got (the group formed), and its period_start.
        "group_hello_ms": percentiles(formation["to_group_hello"]),
        "group_formed_ms": percentiles(formation["from_hello"]),
        "group_formed_from_join_ms": percentiles(formation["from_join"]),
        # How late each request left against its schedule (the load generator's own delay).
        "send_lag_ms": percentiles(
            [p.sent - (start + p.due) for p in people if p.sent is not None]
        ),
        "arrivals_s": round(max(sent) - min(sent), 3) if sent else None,
        "ok": ok,
    }


# -- the run ------------------------------------------------------------------------------------


class SeatSocket(WsClient):
    """A seated person's socket: notes when hello, period_start and finished arrive."""

    def __init__(self, host: str, port: int, path: str, person: Person) -> None:
        super().__init__(host, port, path)
        self.person = person
        self.hello: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_message(self, raw: bytes, now: float) -> None:
        frame = orjson.loads(raw)
        channel = frame.get("channel")
        person = self.person
        if channel == "hello":
            payload = frame.get("payload") or {}
            group = payload.get("group")
            if person.hello is None:
                person.hello = now
                person.code = payload.get("participant")
                if not self.hello.done():
                    self.hello.set_result(None)
            if group is not None:
                person.groups_told.add(str(group))
                if person.group_hello is None:
                    person.group_hello = now
                    person.group = str(group)
                    person.members = tuple(str(m) for m in payload.get("members") or ())
        elif channel == "lobby":
            person.lobby_frames += 1
        elif channel == "period_start" and person.started is None:
            person.started = now
        elif channel == "finished":
            person.finished = True

    def on_closed(self, expected: bool) -> None:
        self.person.close_code = self.close_code
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(f"closed before hello ({self.close_code})"))


def _query(person: Person, params: LaunchParams) -> dict[str, str]:
    """What Prolific appends to a study URL: the participant's, the study's and the
    session's ids (only `label_param`'s is the label)."""
    return {
        params.label_param: person.label,
        "STUDY_ID": "6571bench0000000000launch",
        "SESSION_ID": f"launch{person.index:018d}",
    }


async def _create_session(api: httpx.AsyncClient, params: LaunchParams) -> dict[str, Any]:
    response = await api.post(
        "/api/sessions",
        json={
            "experiment": "decisions",
            "num_participants": params.seats,
            "group_size": params.group_size,
            "period_length": params.period,
            "num_periods": 1,
            "label": f"bench launch {params.people} people, {params.seats} seats",
            "label_param": params.label_param,
            "grouping": params.grouping,
            **({"lobby_timeout": params.lobby_timeout} if params.grouping == "arrival" else {}),
            "completion": {
                "completed": {"url": "https://app.prolific.com/submissions/complete?cc=BENCH"},
                "full": {"code": "FULLBENCH"},
            },
        },
    )
    if response.status_code != 201:
        raise RuntimeError(f"POST /api/sessions: {response.status_code} {response.text[:500]}")
    session: dict[str, Any] = response.json()
    return session


@dataclass
class _Run:
    """What the people share while the burst runs."""

    host: str
    port: int
    prefix: str
    join_path: str
    params: LaunchParams
    client: httpx.AsyncClient
    sockets: list[SeatSocket] = field(default_factory=list)


async def _arrive(run: _Run, person: Person, start: float) -> None:
    """One person: the study link, then (with a seat) the socket until hello."""
    delay = start + person.due - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    params = run.params
    person.sent = time.perf_counter()
    try:
        async with asyncio.timeout(params.join_timeout):
            response = await run.client.get(run.join_path, params=_query(person, params))
    except (httpx.HTTPError, TimeoutError) as exc:
        person.outcome, person.error = "error", f"join {type(exc).__name__}"
        return
    person.answered = time.perf_counter()
    path = urlsplit(response.headers.get("location", "")).path
    if response.status_code == 303 and path.startswith("/p/"):
        person.outcome, person.key = "seated", unquote(path.removeprefix("/p/"))
    elif response.status_code == 200 and FULL_MARK in response.text:
        person.outcome = "full"
        return
    else:
        person.outcome, person.error = "error", f"join HTTP {response.status_code}"
        return
    loop = asyncio.get_running_loop()
    sock = SeatSocket(run.host, run.port, f"{run.prefix}/ws/{person.key}", person)
    run.sockets.append(sock)
    person.ws_sent = time.perf_counter()
    try:
        async with asyncio.timeout(params.join_timeout):
            await loop.create_connection(lambda: sock, run.host, run.port)
            await sock.opened
            await sock.hello
    except (OSError, TimeoutError, ConnectionError) as exc:
        person.outcome = "error"
        person.error = f"ws {sock.close_code or type(exc).__name__}"


async def _wait_for_groups(
    people: Sequence[Person], seat_of: Mapping[str, int], params: LaunchParams
) -> None:
    """Until every complete group (all members connected) has started at each member, or
    the bound; polled, since what is awaited is many sockets' state. Under arrival grouping
    a group is complete once formed, so also until as many groups are complete as the
    people in the lobby make (nobody leaves)."""
    arrival = params.grouping == "arrival"
    deadline = time.perf_counter() + params.start_timeout
    while time.perf_counter() < deadline:
        formation = group_formation(people, seat_of, params.group_size, by_seat=not arrival)
        connected = sum(1 for p in people if p.outcome == "seated" and p.hello is not None)
        expected = connected // params.group_size if arrival else 0
        if formation["started"] >= formation["complete"] >= expected:
            return
        await asyncio.sleep(POLL)


@dataclass
class LobbyLog:
    """What the export says of the lobby (its rows, group "", in the log's order)."""

    formed: list[tuple[str, list[str]]] = field(default_factory=list)  # (group, members)
    timeouts: int = 0  # lobby_timeout rows
    # Per group formed: seconds from the lobby_join row just before its group_formed row to
    # that row. Both are stamped by decisions while it handles one arrival (the join, then
    # the store's `form_group`, then the group), so this is the store round trip that
    # arrival's handling waited for, holding up the lobby's next inputs meanwhile.
    form_s: list[float] = field(default_factory=list)
    joins: int = 0  # lobby_join rows
    join_span_s: float | None = None  # first lobby_join → last: how long arrivals took in it


def order_compared(people: Iterable[Person]) -> int:
    """How many seated people the lobby-order check could compare with anyone: those who began
    to open their socket after at least one other person's lobby hello came back (the check's
    reach; under a backlog fewer)."""
    seated = [p for p in people if p.outcome == "seated" and p.hello is not None]
    first = min((p.hello or 0.0 for p in seated), default=None)
    if first is None:
        return 0
    return sum(1 for p in seated if p.ws_sent is not None and p.ws_sent > first)


def read_lobby_log(rows: Iterable[Mapping[str, Any]]) -> LobbyLog:
    """The lobby's rows of an export (JSON lines, parsed), in the export's order (by ts)."""
    found = LobbyLog()
    last_join: float | None = None
    first_join: float | None = None
    for row in rows:
        if row.get("group") != "":
            continue
        channel, value = row.get("channel"), row.get("value")
        ts = datetime.fromisoformat(str(row["ts"])).timestamp()
        if channel == "lobby_join":
            found.joins += 1
            last_join = ts
            first_join = ts if first_join is None else first_join
            found.join_span_s = ts - first_join
        elif channel == "group_formed" and isinstance(value, dict):
            found.formed.append((str(value.get("group")), [str(m) for m in value["members"]]))
            if last_join is not None:
                found.form_s.append(ts - last_join)
        elif channel == "lobby_timeout":
            found.timeouts += 1
    return found


async def _lobby_log(api: httpx.AsyncClient, session: str, groups: int, timeout: float) -> LobbyLog:
    """The lobby's rows from the export (`/api/sessions/{id}/events`, JSON lines): polled
    (bounded) until it holds `groups` formed groups, as the store writes the log in batches."""
    deadline = time.perf_counter() + timeout
    while True:
        response = await api.get(f"/api/sessions/{session}/events", params={"format": "jsonl"})
        response.raise_for_status()
        found = read_lobby_log(orjson.loads(line) for line in response.content.splitlines())
        if len(found.formed) >= groups or time.perf_counter() >= deadline:
            return found
        await asyncio.sleep(0.2)


async def _close(sockets: Sequence[SeatSocket], timeout: float = 10.0) -> None:
    for sock in sockets:
        if not sock.closed.done():
            sock.close()
    pending = [s.closed for s in sockets if not s.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    for sock in sockets:
        if not sock.closed.done():
            sock.abort()
        if sock.hello.done() and not sock.hello.cancelled():
            sock.hello.exception()  # retrieved: no "never retrieved" warning


def _rss_mib(target: StackTarget, role: str) -> float | None:
    rss = target.processes.rss(role) if target.processes else None
    return None if rss is None else round(rss / 2**20, 1)


async def run_launch(target: StackTarget, params: LaunchParams) -> dict[str, Any]:
    """One launch on `target`; the row's result (the JSON line's content)."""
    params.check()
    if not (target.store_url and target.token):
        raise ValueError("the launch row needs the store's URL and token")
    host, port, prefix = parse_ws_target(target.gateway_url)
    procs = target.processes
    async with contextlib.AsyncExitStack() as scope:
        api = await scope.enter_async_context(
            httpx.AsyncClient(
                base_url=target.store_url,
                headers={"Authorization": f"Bearer {target.token}"},
                timeout=30,
            )
        )
        session = await _create_session(api, params)
        layout_keys = [str(p["key"]) for p in session["participants"]]
        seat_of = {key: i for i, key in enumerate(layout_keys)}
        join_key = str(session["join_url"]).rpartition("/join/")[2]
        # Each person on a connection of their own, as separate browsers are: no keep-alive.
        client = await scope.enter_async_context(
            httpx.AsyncClient(
                base_url=target.gateway_url,
                follow_redirects=False,
                timeout=params.join_timeout,
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=0),
            )
        )
        run = _Run(host, port, prefix, f"/join/{join_key}", params, client)
        labels = prolific_ids(params.people, params.seed)
        schedule = arrival_schedule(params.people, params.within, params.arrivals, params.seed)
        people = [Person(i, labels[i], due) for i, due in enumerate(schedule)]
        rss_before = {role: _rss_mib(target, role) for role in ("gateway", "store")}
        start = time.perf_counter() + 0.2
        sample_start: Sample | None = procs.sample() if procs else None
        tasks = [asyncio.create_task(_arrive(run, p, start)) for p in people]
        try:
            await asyncio.gather(*tasks)
            await _wait_for_groups(people, seat_of, params)
            sample_end: Sample | None = procs.sample() if procs else None
            burst_s = time.perf_counter() - start
            rss_after = {role: _rss_mib(target, role) for role in ("gateway", "store")}
        finally:
            for task in tasks:
                task.cancel()
            await _close(run.sockets)
        response = await api.get(f"/api/sessions/{session['session']}")
        response.raise_for_status()
        detail = response.json()["participants"]
        lobby_log = LobbyLog()
        if params.grouping == "arrival":
            told = {p.group for p in people if p.group is not None}
            lobby_log = await _lobby_log(api, session["session"], len(told), params.join_timeout)

    summary = summarize(
        people, params, layout_keys, detail, start, lobby_log.formed, lobby_log.timeouts
    )
    if params.grouping == "arrival":
        summary["lobby"] |= {
            "form_ms": percentiles(lobby_log.form_s),
            "form_total_s": round(sum(lobby_log.form_s), 3),
            "joins": lobby_log.joins,
            "join_span_s": None
            if lobby_log.join_span_s is None
            else round(lobby_log.join_span_s, 3),
        }
    processes: dict[str, dict[str, float]] = {}
    machine: dict[str, float] = {}
    if sample_start is not None and sample_end is not None:
        processes = usage(sample_start, sample_end)
        machine = machine_usage(sample_start, sample_end, processes)
        # The CPU's window: from just before the first arrival's due time.
        burst_s = sample_end.at - sample_start.at
    stack_cpu_s = sum(v["cpu_s"] for role, v in processes.items() if role != "loadgen")
    window = max(burst_s, 1e-9)
    return {
        "kind": "launch",
        "timestamp": now_iso(),
        "commit": repo_commit(),
        "machine": machine_info(),
        "params": asdict(params),
        "stack": target.info,
        "session": session["session"],
        **summary,
        # The burst: the first arrival (its due time, or the CPU sample just before it) until
        # every complete group had started.
        "burst_s": round(burst_s, 3),
        "processes": processes,
        "stack_cpu_s": round(stack_cpu_s, 3) if processes else None,
        "stack_cpu_pct": round(100 * stack_cpu_s / window, 1) if processes else None,
        "machine_cpu": machine,
        "rss_mib": {
            role: {"before": rss_before[role], "after": rss_after[role]}
            for role in ("gateway", "store")
        },
    }


# -- the table ----------------------------------------------------------------------------------


def format_launch(result: dict[str, Any]) -> str:
    p = result["params"]
    c = result["counts"]
    grouping = p.get("grouping", "fixed")  # lines written before --grouping were fixed
    arrival = grouping == "arrival"
    rows = []
    measures = (
        (
            ("/join -> 303 (seat)", "join_seat_ms", "people"),
            ("/join -> full page", "join_full_ms", "people"),
            ("/join -> lobby hello", "join_to_hello_ms", "people"),
            ("socket -> lobby hello", "socket_to_hello_ms", "people"),
            ("/join -> group hello", "join_to_group_hello_ms", "people"),
            ("last lobby hello -> group hello", "group_hello_ms", "groups"),
            ("last lobby hello -> period_start", "group_formed_ms", "groups"),
            ("last /join -> period_start", "group_formed_from_join_ms", "groups"),
        )
        if arrival
        else (
            ("/join -> 303 (seat)", "join_seat_ms", "people"),
            ("/join -> full page", "join_full_ms", "people"),
            ("/join -> hello", "join_to_hello_ms", "people"),
            ("socket -> hello", "socket_to_hello_ms", "people"),
            ("last hello -> period_start", "group_formed_ms", "groups"),
            ("last /join -> period_start", "group_formed_from_join_ms", "groups"),
        )
    )
    for name, key, unit in measures:
        lat = result.get(key) or {}
        rows.append(
            [name, f"{lat.get('count', 0)} {unit}", lat.get("p50"), lat.get("p99"), lat.get("max")]
        )
    lines = [
        f"Study-link launch: {p['people']} people within {p['within']:g} s ({p['arrivals']}), "
        f"{p['seats']} seats in groups of {p['group_size']} ({grouping} grouping), "
        f"one {p['period']:g} s period",
        table(["", "n", "p50 ms", "p99 ms", "max ms"], rows),
        f"seated {c['seated']}, full {c['full']}, errors {c['errors']}"
        + (f" {result['error_kinds']}" if result["error_kinds"] else "")
        + f"; groups started {c['groups_started']}/{c['groups_complete']} complete; "
        f"first {p['seats']} answered seated: {c['first_answered_seated']}",
        "checks (all 0): "
        + ", ".join(
            f"{k.replace('_', ' ')} {v}"
            for k, v in {
                **result["seat_checks"],
                **result["order_violations"],
                **(result.get("lobby_checks") or {}),
            }.items()
        ),
    ]
    lobby = result.get("lobby") or {}
    if lobby:
        line = (
            f"lobby: {lobby['groups_formed']} groups formed (export), "
            f"{lobby['lobby_frames']} lobby frames to the seated, "
            f"{lobby.get('order_compared')} people in reach of the order check"
        )
        form = lobby.get("form_ms")
        if form and form.get("count"):
            line += (
                f"; in decisions, arrival -> group formed (the store's form_group) p50 "
                f"{_fmt(form['p50'])} / p99 {_fmt(form['p99'])} ms, {lobby['form_total_s']:.1f} s "
                f"in all; {lobby['joins']} lobby joins over {_fmt(lobby['join_span_s'])} s"
            )
        lines.append(line)
    processes = result.get("processes") or {}
    if processes:
        parts = [
            f"{role} {v['cpu_s']:.2f} s ({v['cpu_pct']:.0f} %)" for role, v in processes.items()
        ]
        machine = result.get("machine_cpu") or {}
        lines.append(
            f"CPU over the burst ({result['burst_s']:.1f} s): " + ", ".join(parts) + f"; stack "
            f"{result['stack_cpu_s']:.2f} s ({result['stack_cpu_pct']:.0f} % of one core); "
            f"machine {_fmt(machine.get('busy_pct'))} %, other {_fmt(machine.get('other_pct'))} %"
        )
        per_person = 1000 * result["stack_cpu_s"] / max(p["people"], 1)
        lines.append(f"stack CPU per person: {per_person:.1f} ms")
    rss = result["rss_mib"]
    lines.append(
        "RSS MiB before -> after: "
        + ", ".join(f"{role} {_fmt(v['before'])} -> {_fmt(v['after'])}" for role, v in rss.items())
    )
    lines.append(f"send lag p99 {_fmt(result['send_lag_ms']['p99'])} ms; ok {result['ok']}")
    return "\n".join(lines)
