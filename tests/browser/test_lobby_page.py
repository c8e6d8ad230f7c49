"""The arrival lobby (PROTOCOL v2 "The lobby", `grouping: "arrival"`) in headless Chromium against
the whole stack: a person who opens their link waits in the lobby ("1 of 2", a countdown to their
deadline), and the same page becomes the experiment of the group the lobby forms when a second
person arrives (a WebSocket client, tests/e2e/protocol.py); a short `lobby_timeout` ends on the
finished screen with the `lobby_timeout` code; the console's form takes the lobby's settings and
its monitor lists who waits (status `lobby`, since when) and each group as it forms; the lobby
config of docs/online-studies.md creates such a session with `canopy create-session`.

Saves docs/screenshots/lobby.png (420 px wide, as on a phone) and study-lobby-monitor.png.
"""

from __future__ import annotations

import asyncio
import re
import sys
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
import pytest
import websockets
from playwright.async_api import Page, expect

from tests.browser.conftest import (
    CHROMIUM,
    SCREENSHOTS,
    SOON_MS,
    NewContext,
    create_session,
    open_page,
    screenshot,
)
from tests.e2e.protocol import Participant, raw_ws_url, remember

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"
    ),
]
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "online-studies.md"
RELEASE_MS = 15_000  # a 2 s lobby deadline and the finished frame, on a loaded machine
PROLIFIC_IDS = ["64fb06b3c8d9e0f1a2b3c4d5", "650c17c4d9e0f1a2b3c4d5e6", "661d28d5e0f1a2b3c4d5e6f7"]


async def test_a_person_waits_in_the_lobby_then_plays_in_the_group_it_forms(
    stack: Any, new_context: NewContext
) -> None:
    session = await create_session(
        stack, num_participants=4, group_size=2, period_length=30, grouping="arrival"
    )
    page = await open_page(await new_context(), session.urls[0])
    await expect(page.locator("#lobby")).to_be_visible()
    await expect(page.locator("#lobby-count")).to_have_text(
        "1 of 2 people are here. Waiting for 1 more person.", timeout=SOON_MS
    )
    await expect(page.locator("#lobby-countdown")).to_have_text(re.compile(r"^(5:00|4:[0-5]\d)$"))
    remaining = int(str(await page.locator("#lobby-countdown").get_attribute("data-remaining")))
    assert 280 <= remaining <= 300
    for hidden in ("#play", "#members", "#period"):
        await expect(page.locator(hidden)).to_be_hidden()
    await expect(page).to_have_title("(1/2) Waiting · Canopy")
    await screenshot(page, "lobby")

    # A second person arrives (the fourth seat: seats are not groups, arrival order is).
    second = await Participant.connect(session.gateway_url, session.codes[3])
    try:
        hello = await second.expect("hello", lambda h: h["group"] is not None)
        assert hello["members"] == [session.codes[0], session.codes[3]]
        await expect(page.locator("#lobby")).to_be_hidden(timeout=SOON_MS)
        await expect(page.locator("#period")).to_have_attribute(
            "data-state", "running", timeout=SOON_MS
        )
        members = page.locator("#members .member")
        await expect(members).to_have_count(2)
        await expect(members.nth(0)).to_have_attribute("data-participant", session.codes[0])
        await expect(members.nth(0).locator(".name")).to_have_text("Player 1 (you)")
        await expect(page.locator("#slider")).to_be_enabled()
        await expect(page).to_have_title("Decisions · Canopy")
        assert await page.evaluate("() => canopyPage.members()") == hello["members"]

        # The group plays: the other's decision reaches the page, the page's reaches them.
        await second.send(0.7, seq=1)
        await expect(members.nth(1)).to_have_attribute("data-decision", "0.7", timeout=SOON_MS)
        await page.locator("#slider").fill("0.3")
        decisions = await second.expect("group_decisions", lambda d: d.get(session.codes[0]) == 0.3)
        assert decisions[session.codes[0]] == 0.3
    finally:
        await second.close()


async def test_a_short_lobby_timeout_ends_on_the_finished_screen(
    stack: Any, new_context: NewContext
) -> None:
    session = await create_session(
        stack,
        num_participants=2,
        group_size=2,
        grouping="arrival",
        lobby_timeout=2,
        completion={"lobby_timeout": {"code": "WAITED-1"}},
    )
    page = await open_page(await new_context(), session.urls[0])
    await expect(page.locator("#lobby-count")).to_have_text(
        "1 of 2 people are here. Waiting for 1 more person.", timeout=SOON_MS
    )
    await expect(page.locator("#finished")).to_be_visible(timeout=RELEASE_MS)
    await expect(page.locator("#lobby")).to_be_hidden()
    await expect(page.locator("#finished")).to_have_attribute("data-outcome", "lobby_timeout")
    await expect(page.locator("#finished-heading")).to_have_text("The study has ended")
    await expect(page.locator("#finished-text")).to_have_text(
        "No group could be formed in time. Thank you for waiting."
    )
    await expect(page.locator("#completion-code")).to_have_text("WAITED-1")
    await expect(page.locator("#finished-total")).to_be_hidden()
    await expect(page.locator("#finished-heading")).to_be_focused()


def iso(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def on_gateway(stack: Any, url: str) -> str:
    """A URL on the deployment's public base, as the same path on this stack's gateway."""
    return urljoin(str(stack.urls.gateway_url).rstrip("/") + "/", urlsplit(url).path)


async def join(link: str, prolific_id: str) -> str:
    """Open the study link as Prolific does; the seat key it sends the person to."""
    async with httpx.AsyncClient(timeout=10) as http:
        answer = await http.get(link, params={"PROLIFIC_PID": prolific_id})
    assert answer.status_code == 303, answer.text
    return str(answer.headers["location"]).removeprefix("/p/")


async def test_the_console_sets_up_a_lobby_and_its_monitor_shows_who_waits(
    console: Page, stack: Any, new_context: NewContext
) -> None:
    page, urls = console, stack.urls
    await page.goto(f"{urls.store_url}/#token={urls.admin_token}")
    await expect(page.locator("#console")).to_be_visible()
    await page.locator("#experiment").select_option("decisions")
    await page.get_by_label("Participants").fill("4")
    await page.get_by_label("Group size").fill("2")
    await page.get_by_label("Period length (s)").fill("60")
    await page.get_by_label("Label", exact=True).fill("Lobby pilot")
    await page.get_by_label("Id parameter of the study link").fill("PROLIFIC_PID")
    # The lobby's own settings appear with grouping "arrival" only.
    await expect(page.get_by_label("Lobby timeout (s)")).to_be_hidden()
    await page.get_by_label("Grouping").select_option(label="arrival")
    await expect(page.get_by_label("Lobby timeout (s)")).to_be_visible()
    await expect(page.get_by_label("At the lobby timeout")).to_have_value('"release"')
    await page.get_by_label("Lobby timeout (s)").fill("120")
    await page.get_by_role("button", name="Create session").click()

    await expect(page.locator("#created-links li")).to_have_count(4)
    await expect(page.locator("#created-links li").first).to_contain_text("no group yet")
    session = str(await page.locator("#created-id").text_content())
    listed = page.locator(f'#sessions tr[data-session="{session}"]')
    await expect(listed).to_contain_text("4 in groups of 2formed in a lobby")
    api = httpx.AsyncClient(
        base_url=urls.store_url, headers={"Authorization": f"Bearer {urls.admin_token}"}
    )
    people: list[Participant] = []
    try:
        detail = remember((await api.get(f"/api/sessions/{session}")).json())
        assert (detail["grouping"], detail["lobby_timeout"], detail["on_lobby_timeout"]) == (
            "arrival",
            120,
            "release",
        )
        code_of = {p["key"]: p["code"] for p in detail["participants"]}
        first_group, second_group = (g["group"] for g in detail["groups"])
        link = on_gateway(stack, detail["join_url"])
        monitor = page.locator("#monitor")
        lobby = monitor.locator("#lobby")
        await expect(page.locator("#monitor-stream")).to_have_attribute("data-status", "open")
        await expect(lobby).to_be_visible()
        await expect(lobby.locator("#lobby-summary")).to_have_text(
            "0 waiting (0 connected) · 0 of 2 groups formed"
        )
        await expect(lobby.locator("#lobby-settings")).to_have_text(
            "groups of 2 · at most 2:00 each"
        )
        await expect(monitor.locator("#groups [data-group]")).to_have_count(0)

        # The first person, on a phone, through the study link: they wait.
        phone = await open_page(await new_context(), f"{link}?PROLIFIC_PID={PROLIFIC_IDS[0]}")
        await phone.wait_for_url("**/p/*")
        first = code_of[urlsplit(phone.url).path.removeprefix("/p/")]
        await expect(phone.locator("#lobby-count")).to_contain_text("1 of 2", timeout=SOON_MS)
        row = lobby.locator(f'tr[data-participant="{first}"]')
        await expect(row.locator(".seat")).to_have_text("lobby", timeout=SOON_MS)
        await expect(row).to_have_attribute("data-connected", "true")
        await expect(row).to_contain_text(PROLIFIC_IDS[0])
        await expect(row.locator(".waited")).to_have_text(re.compile(r"^0:0\d$"))
        since = await row.locator("time").get_attribute("datetime")
        seat = next(p for p in detail["participants"] if p["code"] == first)
        assert seat["status"] == "unassigned"  # the detail read before anyone came
        seat = next(
            p
            for p in (await api.get(f"/api/sessions/{session}")).json()["participants"]
            if p["code"] == first
        )
        assert seat["status"] == "lobby"
        # The same moment (the monitor's from the log row, the detail's from MongoDB: µs apart).
        assert since and abs(iso(seat["lobby_since"]) - iso(since)) < 0.001
        await expect(lobby.locator("#lobby-summary")).to_have_text(
            "1 waiting (1 connected) · 0 of 2 groups formed"
        )

        # The second person (a WebSocket client) completes the first group.
        for prolific_id in PROLIFIC_IDS[1:]:
            key = await join(link, prolific_id)
            socket = await websockets.connect(raw_ws_url(str(urls.gateway_url), key))
            people.append(Participant(code_of[key], socket))
            if len(people) == 1:
                await people[0].expect("hello", lambda h: h["group"] is not None)
            else:
                await people[1].expect("lobby")
        card = monitor.locator(f'[data-group="{first_group}"]')
        await expect(card.locator("tbody tr")).to_have_count(2, timeout=SOON_MS)
        await expect(card.locator("tbody tr").first).to_have_attribute("data-participant", first)
        await expect(card.locator(".seat")).to_have_text(["playing", "playing"])
        await expect(card.locator(".period")).to_have_attribute(
            "data-state", "running", timeout=SOON_MS
        )
        await expect(phone.locator("#period")).to_have_attribute("data-state", "running")
        # The third waits for the next group.
        await expect(lobby.locator("#lobby-summary")).to_have_text(
            "1 waiting (1 connected) · 1 of 2 groups formed", timeout=SOON_MS
        )
        await expect(lobby.locator("tbody tr")).to_have_count(1)
        await expect(lobby.locator("tbody tr")).to_have_attribute(
            "data-participant", people[1].code
        )
        await expect(lobby.locator("tbody tr")).to_contain_text(PROLIFIC_IDS[2])
        await expect(monitor.locator(f'[data-group="{second_group}"]')).to_have_count(0)
        await expect(page.locator("#monitor-connected")).to_have_text("3/3")

        top = await monitor.bounding_box()
        groups = await monitor.locator("#groups").bounding_box()
        assert top and groups
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        await page.screenshot(
            path=str(SCREENSHOTS / "study-lobby-monitor.png"),
            full_page=True,
            clip={
                "x": top["x"],
                "y": top["y"],
                "width": top["width"],
                "height": groups["y"] + groups["height"] - top["y"] + 12,
            },
        )

        # The third leaves: still in the line (their place kept), shown as away.
        await people[1].close()
        await expect(lobby.locator("tbody tr")).to_have_attribute(
            "data-connected", "false", timeout=SOON_MS
        )
        await expect(lobby.locator("#lobby-summary")).to_have_text(
            "1 waiting (0 connected) · 1 of 2 groups formed"
        )
    finally:
        for person in people:
            await person.close()
        await api.aclose()


def lobby_config() -> str:
    """The ```toml block of docs/online-studies.md that sets up a lobby."""
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), re.DOTALL)
    found = [b for b in blocks if 'grouping = "arrival"' in b]
    assert len(found) == 1, f'one ```toml block with grouping = "arrival" in {DOC}'
    return str(found[0])


async def test_the_docs_lobby_config_creates_an_arrival_session(stack: Any, tmp_path: Path) -> None:
    config = tmp_path / "lobby.toml"
    config.write_text(lobby_config(), encoding="utf-8")
    urls = stack.urls
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "--api", urls.store_url, "--token",
        urls.admin_token, "create-session", str(config),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
    )  # fmt: skip
    out, err = await asyncio.wait_for(command.communicate(), 30)
    assert command.returncode == 0, err.decode()
    printed = out.decode()
    assert "seats (no group yet: the lobby forms the groups as people arrive):" in printed
    assert len(re.findall(r"^    seat \d+: \S+/p/\S+$", printed, re.MULTILINE)) == 20
    session = printed.split()[1]
    async with httpx.AsyncClient(
        base_url=urls.store_url, headers={"Authorization": f"Bearer {urls.admin_token}"}
    ) as api:
        detail = (await api.get(f"/api/sessions/{session}")).json()
    assert (detail["grouping"], detail["lobby_timeout"], detail["on_lobby_timeout"]) == (
        "arrival",
        300,
        "release",
    )
    assert detail["completion"]["lobby_timeout"] == {"code": "WAITED-9Q2M"}
    assert all(p["group"] is None for p in detail["participants"])
    assert all(g["participants"] == [] for g in detail["groups"])
