"""Every built-in participant page in the lobby (PROTOCOL v2 "The lobby", `grouping: "arrival"`),
on its own: the real page (participant.html as the gateway renders it for a lobby seat, the
experiment's module, page.js, canopy.js) in headless Chromium, its WebSocket a scripted fake that
sends what the gateway sends: the lobby's `hello` (group null, members [], period "lobby"),
`lobby` counts, then, when the group forms, the group's frames and its own `hello` on the same
connection, in either order. Playwright's fake clock runs the lobby's countdown.

The whole stack's version is tests/browser/test_lobby_page.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from services.common.experiments import Registry
from services.gateway.pages import render_page
from tests.unit.fake_socket import FAKE_WEBSOCKET

CHROMIUM = "/usr/bin/chromium"
STATIC = Path(str(files("services.gateway").joinpath("static")))
VENDOR = Path(str(files("services.common").joinpath("static", "vendor")))
ORIGIN = "https://canopy.test"
KEY = "k" * 32
ME, FIRST, THIRD = "p-me", "p-first", "p-third"
START = 1_800_000_000.0  # the fake clock's epoch seconds: the server's `ts` agree with it
NOW = PAUSED = START + 5  # where the clock stands still after the page loaded
EXPERIMENTS = ["decisions", "bimatrix", "public_goods", "double_auction", "a_plugin"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing"),
]


def lobby_config(experiment: str) -> dict[str, Any]:
    """What services.gateway.pages.page_config embeds for a seat in the lobby."""
    return {
        "participant": ME,
        "experiment": experiment,
        "grouping": "arrival",
        "id_in_group": None,
        "members": [],
        "group_size": 3,
        "lobby_timeout": 300.0,
        "num_periods": 1,
        "period_length": 60.0,
        "num_subperiods": 0,
        "on_disconnect": "continue",
        "params": {},
    }


OpenPage = Callable[[str], Awaitable[Page]]


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"],
        )
        yield browser
        await browser.close()


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    contexts = []
    errors: list[str] = []

    async def make(experiment: str) -> Page:
        context = await browser.new_context(viewport={"width": 420, "height": 860})
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda e: errors.append(f"{experiment}: {e}"))
        shell = (STATIC / "participant.html").read_text()
        body = render_page(shell, lobby_config(experiment), Registry.builtin())

        async def serve(route: Route) -> None:
            path = route.request.url.removeprefix(ORIGIN).split("?")[0]
            if path == f"/p/{KEY}":
                await route.fulfill(content_type="text/html", body=body)
            elif path.startswith("/static/vendor/"):
                await route.fulfill(path=VENDOR / path.removeprefix("/static/vendor/"))
            elif path.startswith("/static/"):
                await route.fulfill(path=STATIC / path.removeprefix("/static/"))
            else:
                await route.fulfill(status=404, body="")

        await page.route(f"{ORIGIN}/**", serve)
        await page.add_init_script(FAKE_WEBSOCKET)
        await page.clock.install(time=START)
        await page.goto(f"{ORIGIN}/p/{KEY}")
        await page.wait_for_function("() => window.canopyPage && window.ws && window.ws()")
        await page.clock.pause_at(PAUSED)  # from here on, time moves when a test says
        return page

    yield make
    for context in contexts:
        await context.close()
    assert not errors, errors


async def receive(page: Page, channel: str, payload: Any) -> None:
    await page.evaluate("([c, p]) => ws().receive(c, p)", [channel, payload])


def lobby_hello() -> dict[str, Any]:
    return {
        "participant": ME,
        "group": None,
        "id_in_group": None,
        "members": [],
        "group_decisions": {},
        "period": {"number": 1, "state": "lobby", "ends_at": None},
        "last_seq": 0,
        "presence": {},
    }


def group_hello(state: str = "waiting", ends_at: float | None = None) -> dict[str, Any]:
    """The group's hello: this seat arrived second, so it is player 2 (a seller in an auction)."""
    return {
        "participant": ME,
        "group": "g1",
        "id_in_group": 2,
        "members": [FIRST, ME, THIRD],
        "group_decisions": {FIRST: None, ME: None, THIRD: None},
        "period": {"number": 1, "state": state, "ends_at": ends_at},
        "last_seq": 0,
    }


async def in_the_lobby(page: Page, waiting: int) -> None:
    await page.evaluate("() => ws().open()")
    await receive(page, "hello", lobby_hello())
    timeout_at = NOW + 299.4
    await receive(page, "lobby", {"waiting": waiting, "group_size": 3, "timeout_at": timeout_at})


@pytest.mark.parametrize("experiment", EXPERIMENTS)
async def test_the_lobby_then_the_groups_page(open_page: OpenPage, experiment: str) -> None:
    page = await open_page(experiment)
    # Before any hello, a lobby seat's page already says where it is.
    await expect(page.locator("#lobby")).to_be_visible()
    assert await page.evaluate("() => document.body.dataset.phase") == "lobby"

    await in_the_lobby(page, waiting=1)
    count = page.locator("#lobby-count")
    await expect(count).to_have_text("1 of 3 people are here. Waiting for 2 more people.")
    await expect(count).to_have_attribute("aria-live", "polite")  # read out as it changes
    await expect(page.get_by_role("timer")).to_have_text("5:00")  # not read out every second
    await expect(page.locator("#lobby-countdown")).to_have_text("5:00")
    await expect(page.locator("#lobby-seats .lobby-seat.here")).to_have_count(1)
    for hidden in ("#play", "#members", "#period", "#waiting"):
        await expect(page.locator(hidden)).to_be_hidden()
    await expect(page).to_have_title("(1/3) Waiting · Canopy")

    await receive(page, "lobby", {"waiting": 2, "group_size": 3, "timeout_at": NOW + 299.4})
    await expect(count).to_have_text("2 of 3 people are here. Waiting for 1 more person.")
    await page.clock.run_for(60_000)
    await expect(page.locator("#lobby-countdown")).to_have_text("4:00")

    # The group formed: its frames may overtake its hello (another queue than the reply's).
    await receive(page, "presence", {"participant": FIRST, "connected": True})
    await receive(page, "period_start", {"period": 1, "ends_at": NOW + 60 + 60, "length": 60})
    await expect(page.locator("#lobby")).to_be_visible()  # no group until its hello
    await receive(page, "hello", group_hello("waiting"))

    await expect(page.locator("#lobby")).to_be_hidden()
    await expect(page.locator("#period")).to_have_attribute("data-state", "running")
    await expect(page.locator("#play")).to_be_visible()
    await expect(page.locator("#members .member")).to_have_count(3)
    await expect(page.locator("#members .member.you .name")).to_have_text("Player 2 (you)")
    await expect(page.locator("#lobby-announce")).to_contain_text("Your group is complete")
    assert await page.evaluate("() => document.body.dataset.phase") == "running"
    assert await page.evaluate("() => canopyPage.members()") == [FIRST, ME, THIRD]
    assert await page.evaluate("() => canopyPage.idInGroup(canopyPage.me())") == 2
    assert await page.evaluate("() => canopyClient.state.lobby") is None
    assert await page.evaluate("() => canopyClient.inLobby()") is False
    # The group's presence that came first holds; a lobby count still on its way does not
    # bring the lobby back.
    await expect(page.locator(f'#members [data-participant="{FIRST}"]')).to_have_attribute(
        "data-presence", "connected"
    )
    await receive(page, "lobby", {"waiting": 0, "group_size": 3, "timeout_at": NOW + 299.4})
    await expect(page.locator("#lobby")).to_be_hidden()

    if experiment == "double_auction":
        await expect(page.locator("#order-submit")).to_have_text("Place ask")
        await expect(page.locator("#role")).to_contain_text("You are a seller")
        await expect(page.locator("#order-submit")).to_be_enabled()
    elif experiment == "a_plugin":  # the generic page
        await expect(page.locator("#decision-input")).to_be_enabled()
    else:
        await expect(page.locator("#slider")).to_be_enabled()
    # A decision now goes to the group (the lobby refuses none: nothing was sent there).
    await receive(page, "group_decisions", {FIRST: 0.25})
    await expect(page.locator(f'#members [data-participant="{FIRST}"]')).to_have_attribute(
        "data-decision", "0.25"
    )
    assert await page.evaluate("() => canopyPage.chart.points()") >= 1


async def test_a_group_hello_before_its_frames(open_page: OpenPage) -> None:
    page = await open_page("bimatrix")
    await in_the_lobby(page, waiting=2)
    await receive(page, "hello", group_hello("waiting"))
    await expect(page.locator("#waiting")).to_be_visible()
    await expect(page.locator("#waiting-text")).to_have_text(
        "Waiting for everyone in your group to join: 1 of 3 here."
    )
    await receive(page, "period_start", {"period": 1, "ends_at": NOW + 60, "length": 60})
    await expect(page.locator("#period")).to_have_attribute("data-state", "running")
    await expect(page.locator("#slider")).to_be_enabled()


async def test_released_from_the_lobby(open_page: OpenPage) -> None:
    page = await open_page("decisions")
    await in_the_lobby(page, waiting=1)
    await page.clock.run_for(300_000)
    await expect(page.locator("#lobby-countdown")).to_have_text("0:00")
    finished = {"outcome": "lobby_timeout", "total_payoff": 0, "redirect": None, "code": "W-1"}
    await receive(page, "finished", finished)
    await expect(page.locator("#finished")).to_be_visible()
    await expect(page.locator("#lobby")).to_be_hidden()
    await expect(page.locator("#finished-heading")).to_have_text("The study has ended")
    await expect(page.locator("#finished-text")).to_have_text(
        "No group could be formed in time. Thank you for waiting."
    )
    await expect(page.locator("#finished-total")).to_be_hidden()  # nothing was played
    await expect(page.locator("#completion-code")).to_have_text("W-1")
    await expect(page.locator("#lobby-announce")).to_have_text("")
    await expect(page).to_have_title("Decisions · Canopy")


async def test_the_clients_state_when_the_group_forms(browser: Browser) -> None:
    """canopy.js alone: the group's frames that overtook its hello are not lost to it."""
    context = await browser.new_context()
    page = await context.new_page()

    async def serve(route: Route) -> None:
        path = route.request.url.removeprefix(ORIGIN)
        if path == "/static/canopy.js":
            await route.fulfill(content_type="text/javascript", path=STATIC / "canopy.js")
        else:
            await route.fulfill(content_type="text/html", body="<!doctype html><p>t</p>")

    await page.route(f"{ORIGIN}/**", serve)
    await page.add_init_script(FAKE_WEBSOCKET)
    await page.goto(f"{ORIGIN}/p/{KEY}")
    await page.evaluate(
        """async (key) => {
            const Canopy = await import('/static/canopy.js');
            window.hellos = [];
            window.client = Canopy.connect('wss://canopy.test/ws/' + key, key, null, {});
            client.on('hello', (p) => hellos.push(p.group));
            ws().open();
        }""",
        KEY,
    )
    await receive(page, "hello", lobby_hello())
    await receive(page, "lobby", {"waiting": 2, "group_size": 3, "timeout_at": 1e10})
    assert await page.evaluate("() => client.state.lobby.waiting") == 2
    await receive(page, "presence", {"participant": FIRST, "connected": True})
    await receive(page, "period_start", {"period": 1, "ends_at": 1e10, "length": 60})
    await receive(page, "hello", group_hello("waiting"))
    state = await page.evaluate(
        "() => ({period: client.state.period.state, first: client.state.presence['p-first'],"
        " group: client.state.hello.group, lobby: client.state.lobby, hellos})"
    )
    assert state == {
        "period": "running",
        "first": True,
        "group": "g1",
        "lobby": None,
        "hellos": [None, "g1"],
    }
    await context.close()
