"""The participant page's finished screen (static/page.js, PROTOCOL v2 "The end for everyone")
on its own: the real page (participant.html as the gateway renders it, decisions.js, page.js,
canopy.js, leave.js) in headless Chromium, its WebSocket a scripted fake that delivers
`finished` the way the server does; Playwright's fake clock runs the redirect's countdown.
The whole stack's version is tests/browser/test_online_studies.py."""

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
ORIGIN = "https://canopy.test"  # https: a secure context, so navigator.clipboard exists
KEY = "k" * 32
ME, OTHER = "p1", "p2"
DONE_URL = "https://example.org/done?cc=C-9&who=P%201"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing"),
]


def html() -> str:
    shell = (STATIC / "participant.html").read_text()
    config = {
        "participant": ME,
        "experiment": "decisions",
        "id_in_group": 1,
        "members": [ME, OTHER],
        "num_periods": 2,
        "period_length": 10,
        "num_subperiods": 0,
        "on_disconnect": "continue",
        "params": {},
    }
    return render_page(shell, config, Registry.builtin())


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run"],
        )
        yield browser
        await browser.close()


OpenPage = Callable[..., Awaitable[Page]]


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    contexts = []
    errors: list[str] = []

    async def make(*, clipboard: bool = True) -> Page:
        context = await browser.new_context(viewport={"width": 420, "height": 860})
        contexts.append(context)
        if clipboard:
            await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=ORIGIN)
        page = await context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))

        async def serve(route: Route) -> None:
            path = route.request.url.removeprefix(ORIGIN).split("?")[0]
            if path == f"/p/{KEY}":
                await route.fulfill(content_type="text/html", body=html())
            elif path.startswith("/static/vendor/"):
                await route.fulfill(path=VENDOR / path.removeprefix("/static/vendor/"))
            elif path.startswith("/static/"):
                await route.fulfill(path=STATIC / path.removeprefix("/static/"))
            else:
                await route.fulfill(status=404, body="")

        await page.route(f"{ORIGIN}/**", serve)
        await page.route(
            "https://example.org/**",
            lambda route: route.fulfill(content_type="text/html", body="<p>done</p>"),
        )
        await page.add_init_script(FAKE_WEBSOCKET)
        await page.clock.install()
        await page.goto(f"{ORIGIN}/p/{KEY}")
        await page.wait_for_function("() => window.canopyPage && window.ws && window.ws()")
        return page

    yield make
    for context in contexts:
        await context.close()
    assert not errors, errors


def hello(state: str, number: int = 2) -> dict[str, Any]:
    return {
        "participant": ME,
        "group": "g1",
        "id_in_group": 1,
        "members": [ME, OTHER],
        "group_decisions": {ME: 0.5, OTHER: 0.5},
        "period": {"number": number, "state": state, "ends_at": None},
        "last_seq": 0,
    }


async def receive(page: Page, channel: str, payload: Any) -> None:
    await page.evaluate("([c, p]) => ws().receive(c, p)", [channel, payload])


async def play_two_periods(page: Page) -> None:
    await page.evaluate("() => ws().open()")
    await receive(page, "hello", hello("waiting", 1))
    for number, mine in ((1, 1.5), (2, 2.25)):
        await receive(page, "period_start", {"period": number, "ends_at": 1e10, "length": 10})
        payoffs = {ME: mine, OTHER: 1.0}
        await receive(page, "period_end", {"period": number, "payoffs": payoffs})


def finished(**overrides: Any) -> dict[str, Any]:
    return {"outcome": "completed", "total_payoff": 3.75, "redirect": None, "code": "C-123"} | (
        overrides
    )


async def test_finished_shows_the_payoffs_and_a_code_that_copies(open_page: OpenPage) -> None:
    page = await open_page()
    await play_two_periods(page)
    await expect(page.locator("#finished")).to_be_hidden()
    await receive(page, "finished", finished())

    screen = page.locator("#finished")
    await expect(screen).to_be_visible()
    await expect(page.locator("#finished-heading")).to_have_text("You have finished")
    await expect(page.locator("#finished-heading")).to_be_focused()
    await expect(page.locator("#finished-total")).to_have_text("Your total payoff: 3.75.")
    periods = page.locator("#finished-periods tbody tr")
    await expect(periods).to_have_count(2)
    await expect(periods.nth(1)).to_have_text("Period 22.25")
    await expect(page.locator("#completion-code")).to_have_text("C-123")
    await expect(page.locator("#leaving")).to_be_hidden()
    # Over the experiment: nothing else of the page is shown.
    for hidden in ("#experiment", "#members", "#result", "#chart"):
        await expect(page.locator(hidden)).to_be_hidden()

    # Keyboard: from the heading, Tab reaches the Copy button, Enter presses it.
    await page.keyboard.press("Tab")
    await expect(page.locator("#copy-code")).to_be_focused()
    await page.keyboard.press("Enter")
    await expect(page.locator("#copy-note")).to_have_text("Copied.")
    assert await page.evaluate("() => navigator.clipboard.readText()") == "C-123"


async def test_without_a_clipboard_copy_selects_the_code(open_page: OpenPage) -> None:
    page = await open_page(clipboard=False)
    await page.evaluate("() => Object.defineProperty(navigator, 'clipboard', {value: undefined})")
    await play_two_periods(page)
    await receive(page, "finished", finished())
    await page.locator("#copy-code").click()
    await expect(page.locator("#copy-note")).to_contain_text("press Ctrl+C")
    assert await page.evaluate("() => String(window.getSelection())") == "C-123"


async def test_a_finished_seat_opened_again_has_already_taken_part(open_page: OpenPage) -> None:
    page = await open_page()
    await page.evaluate("() => ws().open()")
    await receive(page, "hello", hello("ended"))  # then, right away, finished again
    await receive(page, "finished", finished())
    await expect(page.locator("#finished-heading")).to_have_text("You have already taken part")
    await expect(page.locator("#completion-code")).to_have_text("C-123")
    await expect(page.locator("#finished-periods")).to_be_hidden()  # this page saw none
    # A reconnect brings hello + finished again: same screen, focus left where it is.
    await page.locator("#copy-code").focus()
    await receive(page, "hello", hello("ended"))
    await receive(page, "finished", finished())
    await expect(page.locator("#copy-code")).to_be_focused()
    assert await page.evaluate("() => document.body.dataset.phase") == "finished"


async def test_a_dropout_is_told_kindly(open_page: OpenPage) -> None:
    page = await open_page()
    await page.evaluate("() => ws().open()")
    await receive(page, "hello", hello("ended"))
    await receive(page, "finished", finished(outcome="dropout", code=None, total_payoff=1.5))
    await expect(page.locator("#finished-heading")).to_have_text("The study has ended")
    await expect(page.locator("#finished-text")).to_contain_text("while you were away")
    await expect(page.locator("#finished-code")).to_be_hidden()
    await expect(page.locator("#finished-close")).to_be_visible()  # nowhere to go, no code
    await expect(page.locator("#finished")).to_have_attribute("data-outcome", "dropout")


async def test_a_redirect_counts_down_five_seconds_then_goes(open_page: OpenPage) -> None:
    page = await open_page()
    await play_two_periods(page)
    await receive(page, "finished", finished(redirect=DONE_URL, code=None))
    await expect(page.locator("#leaving")).to_be_visible()
    await expect(page.locator("#leaving-seconds")).to_have_text("5")
    await expect(page.locator("#leave-now")).to_have_attribute("href", DONE_URL)
    await page.clock.run_for(2_000)
    await expect(page.locator("#leaving-seconds")).to_have_text("3")
    assert page.url.startswith(ORIGIN)
    await page.clock.run_for(3_000)
    await page.wait_for_url(DONE_URL)


async def test_a_redirect_that_is_not_http_is_never_followed(open_page: OpenPage) -> None:
    page = await open_page()
    await play_two_periods(page)
    await receive(page, "finished", finished(redirect="javascript:alert(1)"))
    await expect(page.locator("#finished")).to_be_visible()
    await expect(page.locator("#leaving")).to_be_hidden()
    await page.clock.run_for(10_000)
    assert page.url == f"{ORIGIN}/p/{KEY}"
