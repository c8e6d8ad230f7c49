"""Fault injection for online studies (PROTOCOL v2 "Online studies"): a SIGKILL loses no outcome
and gives no label two seats, under the real supervisor.

- Decisions, and separately timers, is killed 0.3 s before the last period's scheduled end
  (`ends_at` of `period_start`, the server's clock), so the end happens while it restarts. The
  people came through the study link with their labels; one member of one group left during
  the period. After recovery every seat has exactly one outcome (`completed` if connected at
  the end, `dropout` for the one who left), the export holds exactly one `finished` row per
  seat right after its group's `period_end` (in member order), each redirect holds its seat's
  label percent-encoded, and a member who opens their link again gets `hello`, then the
  `finished` that was logged.
- The store is killed while 20 people open the study link at once (each retrying on a 503 or
  a refused connection, as a reload would): afterwards every label has exactly one seat, no
  seat two labels, the session detail's labels and keys agree with what people got, and
  opening the link again with any label gives the same seat.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections import Counter
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from services.bots import client
from tests.e2e.protocol import raw_ws_url
from tests.faults.bots import Bot
from tests.faults.test_faults import epoch, export, researcher

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

GROUPS, SIZE = 3, 2
PERIOD = 5.0
KILL_BEFORE_END = 0.3  # seconds before the period's scheduled end
LABELS = ["P 1/ä", "P&2", "P=3?", "P#4", "P+5", "P%6"]
COMPLETION = {
    "completed": {"url": "https://example.org/done?pid={label}"},
    "dropout": {"code": "DROP-19"},
}
JOINERS = 20
JOIN_TRIES = 60  # a reload every 0.1 .. 1 s: about 50 s at most


async def study_session(api: httpx.AsyncClient, *, seats: int, period_length: float, name: str
                        ) -> dict[str, Any]:  # fmt: skip
    response = await api.post(
        "/api/sessions",
        json={
            "experiment": "decisions",
            "num_participants": seats,
            "group_size": SIZE,
            "num_periods": 1,
            "period_length": period_length,
            "completion": COMPLETION,
            "label": name,
        },
    )
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    assert session["join_url"].rsplit("/join/", 1)[1]
    return session


async def open_link(
    browser: httpx.AsyncClient, join_key: str, label: str, answers: Counter[str] | None = None
) -> str:
    """The seat key the study link gives `label` (its 303 to `/p/{key}`), opening the link
    again after a 503 or a connection error, as a person reloading the page would."""
    delay = 0.1
    for _ in range(JOIN_TRIES):
        try:
            response = await browser.get(f"/join/{join_key}", params={"label": label})
        except httpx.TransportError as exc:
            outcome = type(exc).__name__
        else:
            if response.status_code == 303:
                location = response.headers["location"]
                assert location.startswith("/p/"), location
                if answers is not None:
                    answers["303"] += 1
                return location.removeprefix("/p/")
            assert response.status_code == 503, (response.status_code, response.text[:300])
            outcome = "503"
        if answers is not None:
            answers[outcome] += 1
        await asyncio.sleep(delay)  # a reload, not a synchronisation
        delay = min(1.0, delay * 2)
    raise AssertionError(f"label {label!r}: no seat after {JOIN_TRIES} tries")


def seat_bot(gateway_url: str, key: str, *, rate: float = 5.0) -> client.Bot:
    """A fault-test bot (reconnects fast, a fresh decision each turn) on the seat `key`."""
    return Bot(gateway_url, "", rate=rate, num_periods=1, key=key)


def listener(gateway_url: str, key: str) -> client.Bot:
    """A client that only listens (no decisions of its own) on the seat `key`."""
    return client.Bot(raw_ws_url(gateway_url, key), strategy=None, min_delay=0.05, max_delay=1.0)


async def wait_api(check: Any, what: str, timeout: float) -> Any:
    """Poll until `check()` answers something true (the store writes the log in batches)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout:g} s")
        await asyncio.sleep(0.05)


async def end_during_restart(stack: Any, victim: str) -> dict[str, Any]:
    urls = stack.urls
    async with (
        researcher(stack) as api,
        httpx.AsyncClient(base_url=urls["gateway"], timeout=10.0) as browser,
    ):
        session = await study_session(
            api, seats=GROUPS * SIZE, period_length=PERIOD, name=f"outcomes {victim}"
        )
        sid, join_key = session["session"], session["join_url"].rsplit("/join/", 1)[1]
        keys = {label: await open_link(browser, join_key, label) for label in LABELS}
        detail = (await api.get(f"/api/sessions/{sid}")).json()
        seats = {p["key"]: p for p in detail["participants"]}
        code_of = {label: seats[key]["code"] for label, key in keys.items()}
        label_of = {code: label for label, code in code_of.items()}
        assert [p["label"] for p in detail["participants"]] == LABELS  # first free seat each

        bots = {label: seat_bot(urls["gateway"], key) for label, key in keys.items()}
        for bot in bots.values():
            bot.start()
        try:
            for bot in bots.values():
                await bot.wait_started(30)
            # One member of the first group leaves during the (last) period; its partner
            # sees it go, so the presence row is logged before the end.
            leaver_code = detail["groups"][0]["participants"][0]
            partner_code = detail["groups"][0]["participants"][1]
            leaver, partner = bots[label_of[leaver_code]], bots[label_of[partner_code]]
            await leaver.wait_for("acks", lambda: len(leaver.acked) >= 3, 10)
            await leaver.stop()
            await partner.wait_for(
                "the leaver's presence",
                lambda: any(
                    p["participant"] == leaver_code and not p["connected"]
                    for p in partner.payloads("presence")
                ),
                10,
            )
            stayers = [bot for label, bot in bots.items() if code_of[label] != leaver_code]

            # The kill: KILL_BEFORE_END before the earliest group's end, on the server's clock
            # (the same machine's), so every group's end falls in the restart.
            ends = [bot.ends_at for bot in stayers]
            assert all(end is not None for end in ends), ends
            first_end = min(e for e in ends if e is not None)
            await asyncio.sleep(max(0.0, first_end - KILL_BEFORE_END - time.time()))
            previous = stack.pid(victim)
            killed_at = time.time()
            stack.kill(victim, signal.SIGKILL)
            restart = await asyncio.to_thread(stack.wait_restarted, victim, previous, 45)
            for bot in stayers:
                await bot.wait_for("finished", lambda b=bot: b.outcome is not None, 30)
            received = {code_of[label]: bot.outcome for label, bot in bots.items()}
        finally:
            for bot in bots.values():
                await bot.stop()

        codes = [p["code"] for p in detail["participants"]]
        expected_outcome = {c: "dropout" if c == leaver_code else "completed" for c in codes}
        rows = await finished_rows(api, sid, len(codes))
        check_finished(session, rows, expected_outcome, label_of)
        logged = {r["participant"]: r["value"] for r in rows if r["channel"] == "finished"}
        for code, payload in received.items():
            if code != leaver_code:
                assert payload == logged[code], (code, payload, logged[code])

        async def outcomes_written() -> dict[str, Any] | None:
            d = (await api.get(f"/api/sessions/{sid}")).json()
            return d if all(p["outcome"] for p in d["participants"]) else None

        final = await wait_api(outcomes_written, "outcome for every seat", 20)
        got = {p["code"]: (p["outcome"], p["status"], p["label"]) for p in final["participants"]}
        assert got == {c: (expected_outcome[c], "finished", label_of[c]) for c in codes}

        # Back after the end: hello, then the finished that was logged (the one who left, and
        # one who completed).
        for code in (leaver_code, partner_code):
            back = listener(urls["gateway"], keys[label_of[code]])
            back.start()
            try:
                await back.wait_for("finished", lambda b=back: b.outcome is not None, 20)
            finally:
                await back.stop()
            channels = [r.channel for r in back.received]
            assert channels[:2] == ["hello", "finished"], channels
            assert back.received[0].payload["period"]["state"] == "ended"
            assert back.received[1].payload == logged[code]

        # Nothing came after: still exactly one finished row per seat.
        again = await export(api, sid)
        assert Counter(r["participant"] for r in again if r["channel"] == "finished") == Counter(
            codes
        )
        # The ends did fall in the restart: after the kill (decisions stamps the row when it
        # applies the tick), and marked late when timers had to fire them late.
        ends_rows = [r for r in rows if r["channel"] == "period_end"]
        assert all(epoch(r["ts"]) > killed_at for r in ends_rows), (killed_at, ends_rows)
        late = all(r["value"].get("late", False) for r in ends_rows)
        if victim == "timers":
            assert late, ends_rows
    return {"restart_s": restart, "killed_before_end_s": first_end - killed_at, "late": late}


async def finished_rows(
    api: httpx.AsyncClient, session: str, seats: int, timeout: float = 30.0
) -> list[dict[str, Any]]:
    """The export once it holds a `finished` row for every seat."""

    async def rows() -> list[dict[str, Any]] | None:
        found = await export(api, session)
        done = {r["participant"] for r in found if r["channel"] == "finished"}
        return found if len(done) >= seats else None

    result: list[dict[str, Any]] = await wait_api(rows, f"finished rows for {seats} seats", timeout)
    return result


def check_finished(
    session: dict[str, Any],
    rows: list[dict[str, Any]],
    expected: dict[str, str],
    label_of: dict[str, str],
) -> None:
    finished = Counter(r["participant"] for r in rows if r["channel"] == "finished")
    assert finished == Counter(list(expected)), f"finished rows per seat: {finished}"
    for group in session["groups"]:
        members = group["participants"]
        mine = [r for r in rows if r["group"] == group["group"]]
        channels = [r["channel"] for r in mine]
        assert channels.count("period_end") == 1, channels
        end = channels.index("period_end")
        after = mine[end + 1 : end + 1 + len(members)]
        assert [(r["channel"], r["participant"], r["direction"]) for r in after] == [
            ("finished", code, "out") for code in members
        ], f"group {group['group']}: after period_end {channels[end:]}"
        payoffs = mine[end]["value"]["payoffs"]
        for row in after:
            code, value = row["participant"], row["value"]
            assert value["outcome"] == expected[code], (code, value)
            assert value["total_payoff"] == pytest.approx(payoffs.get(code, 0.0))
            if value["outcome"] == "completed":
                label = quote(label_of[code], safe="")
                assert value["redirect"] == f"https://example.org/done?pid={label}", value
                assert value["code"] is None
            else:
                assert (value["redirect"], value["code"]) == (None, "DROP-19"), value


@pytest.mark.timeout(90)
@pytest.mark.parametrize("victim", ["decisions", "timers"])
async def test_the_end_during_a_restart_gives_each_seat_one_outcome(
    supervised: Any, victim: str
) -> None:
    result = await end_during_restart(supervised, victim)
    print(
        f"\nOUTCOMES {victim} killed {result['killed_before_end_s']:.2f} s before the end, "
        f"back in {result['restart_s']:.2f} s (period_end late: {result['late']}): one "
        f"finished per seat, right after period_end, outcomes as connected at the end"
    )


@pytest.mark.timeout(90)
async def test_a_store_killed_while_people_join_gives_each_label_one_seat(
    supervised: Any,
) -> None:
    stack = supervised
    labels = [f"joiner {n:02d}/ü" for n in range(JOINERS)]
    async with (
        researcher(stack) as api,
        httpx.AsyncClient(base_url=stack.urls["gateway"], timeout=10.0) as browser,
    ):
        session = await study_session(api, seats=JOINERS, period_length=60, name="join kill")
        sid, join_key = session["session"], session["join_url"].rsplit("/join/", 1)[1]
        answers: Counter[str] = Counter()
        first = asyncio.Event()

        async def person(label: str) -> str:
            key = await open_link(browser, join_key, label, answers)
            first.set()
            return key

        previous = stack.pid("store")
        people = [asyncio.create_task(person(label)) for label in labels]
        # Mid-burst: once the first person has a seat, the others are on their way.
        await asyncio.wait_for(first.wait(), 30)
        seated_before = sum(task.done() for task in people)
        stack.kill("store", signal.SIGKILL)
        restart = await asyncio.to_thread(stack.wait_restarted, "store", previous, 45)
        keys = dict(zip(labels, await asyncio.wait_for(asyncio.gather(*people), 60), strict=True))

        assert len(set(keys.values())) == JOINERS, "two labels got the same seat"
        detail = (await api.get(f"/api/sessions/{sid}")).json()
        by_key = {p["key"]: p for p in detail["participants"]}
        for label, key in keys.items():
            seat = by_key[key]
            assert (seat["label"], seat["status"]) == (label, "playing"), (label, seat)
        seat_labels = [p["label"] for p in detail["participants"]]
        assert sorted(seat_labels) == sorted(labels), seat_labels  # one label a seat, each once
        again = await asyncio.gather(*(open_link(browser, join_key, label) for label in labels))
        assert dict(zip(labels, again, strict=True)) == keys
        # And nobody else gets in: the session is full.
        full = await browser.get(f"/join/{join_key}", params={"label": "one too many"})
        assert full.status_code == 200 and "This study is full" in full.text
    print(
        f"\nJOIN store killed after {seated_before} of {JOINERS} people had a seat, back in "
        f"{restart:.2f} s; answers {dict(answers)}; every label one seat, the same again"
    )
