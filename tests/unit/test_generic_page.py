"""The generic page (static/generic.js) for each kind of declared decision, on its own: the real
page as the gateway renders it (participant.html, generic.js, page.js, canopy.js) in headless
Chromium, its WebSocket a scripted fake and POST /p/{key}/view answered by the test, so each
control is checked without a stack: a number box for a wide range (a value outside it is
refused beside the box and never sent), radio buttons for a choice (the keyboard moves them),
sliders that keep a mix summing to 1, a compound's fields sent together, the others'
decisions in the declared terms, and the live values only when the experiment has payoffs.
The whole stack's version (the Cournot plug-in) is tests/browser/test_plugin_generic_page.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Browser, Page, Route, async_playwright, expect

from services.common.decision import Choice, Compound, Decision, Mix, Number, Option, Shown
from services.common.experiments import Registry
from services.gateway.pages import render_page
from tests.unit.fake_socket import FAKE_WEBSOCKET as BASE_FAKE_WEBSOCKET

CHROMIUM = "/usr/bin/chromium"
STATIC = Path(str(files("services.gateway").joinpath("static")))
VENDOR = Path(str(files("services.common").joinpath("static", "vendor")))
ORIGIN = "https://canopy.test"
KEY = "k" * 32
ME, OTHER = "p-me", "p-other"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing"),
]

FAKE_WEBSOCKET = (
    BASE_FAKE_WEBSOCKET
    + """
window.decisionsSent = () => ws().sent.filter(f => f.channel === "decisions").map(f => f.payload);
"""
)

OpenPage = Callable[..., Awaitable[Page]]


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

    async def make(
        decision: Decision | None, view: dict[str, Any] | None = None, initial: Any = None
    ) -> Page:
        context = await browser.new_context(viewport={"width": 420, "height": 860})
        contexts.append(context)
        page = await context.new_page()
        page.on("pageerror", lambda e: errors.append(str(e)))
        config = {
            "participant": ME,
            "experiment": "a_plugin",
            "id_in_group": 1,
            "members": [ME, OTHER],
            "num_periods": 1,
            "period_length": 600.0,
            "num_subperiods": 0,
            "on_disconnect": "continue",
            "params": {},
            "decision": None if decision is None else decision.model_dump(mode="json"),
        }
        body = render_page((STATIC / "participant.html").read_text(), config, Registry.builtin())
        asked: list[Any] = []

        async def serve(route: Route) -> None:
            path = route.request.url.removeprefix(ORIGIN).split("?")[0]
            if path == f"/p/{KEY}":
                await route.fulfill(content_type="text/html", body=body)
            elif path == f"/p/{KEY}/view" and view is not None:
                asked.append(json.loads(route.request.post_data or "null"))
                await route.fulfill(content_type="application/json", body=json.dumps(view))
            elif path.startswith("/static/vendor/"):
                await route.fulfill(path=VENDOR / path.removeprefix("/static/vendor/"))
            elif path.startswith("/static/"):
                await route.fulfill(path=STATIC / path.removeprefix("/static/"))
            else:
                await route.fulfill(status=404, body="")

        await page.route(f"{ORIGIN}/**", serve)
        await page.add_init_script(FAKE_WEBSOCKET)
        await page.goto(f"{ORIGIN}/p/{KEY}")
        await page.wait_for_function("() => window.canopyPage && window.ws && window.ws()")
        await page.evaluate("() => ws().open()")
        hello = {
            "participant": ME,
            "group": "g1",
            "id_in_group": 1,
            "members": [ME, OTHER],
            "group_decisions": {ME: initial, OTHER: initial},
            "period": {"number": 1, "state": "running", "ends_at": time.time() + 600},
            "last_seq": 0,
            "presence": {ME: True, OTHER: True},
        }
        await receive(page, "hello", hello)
        page.asked = asked  # type: ignore[attr-defined]
        return page

    yield make
    for context in contexts:
        await context.close()
    assert not errors, errors


async def receive(page: Page, channel: str, payload: Any) -> None:
    await page.evaluate("([c, p]) => ws().receive(c, p)", [channel, payload])


async def sent(page: Page) -> list[Any]:
    found: list[Any] = await page.evaluate("() => decisionsSent()")
    return found


def member(page: Page, code: str) -> Any:
    return page.locator(f'#members [data-participant="{code}"] .decision')


async def test_a_wide_number_is_a_box_and_a_value_outside_is_refused_beside_it(
    open_page: OpenPage,
) -> None:
    price = Number(min=0, max=100_000, step=1, unit="€", label="Your price")
    page = await open_page(Decision(input=price, instructions="Name a price."))
    box = page.get_by_label("Your price, from 0 to 100000 €")
    await expect(box).to_have_attribute("type", "number")
    await expect(page.locator("#slider")).to_have_count(0)
    await expect(page.locator("#instructions")).to_have_text("Name a price.")
    await box.fill("120000")
    await box.press("Enter")
    note = page.locator("#decision-note")
    await expect(note).to_have_attribute("data-invalid", "true")
    await expect(note).to_have_text(
        "120000 €: Not sent: a number from 0 to 100000 €."  # checked here, as declared
    )
    await box.fill("2.5")
    await page.get_by_role("button", name="Set").click()
    await expect(note).to_contain_text("in steps of 1")
    assert await sent(page) == []
    await box.fill("250")
    await box.press("Enter")
    assert await sent(page) == [250]
    await expect(note).not_to_have_attribute("data-invalid", "true")
    # A refusal from the server, for a reason only the experiment knows, shows there too.
    await receive(page, "error", {"code": "invalid_decision", "message": "too dear", "seq": 1})
    await expect(note).to_have_text("250 €: too dear")
    await receive(page, "group_decisions", {OTHER: 99})
    await expect(member(page, OTHER)).to_have_text("99 €")
    # No payoffs (the test's view answers none): no payoff shown.
    await expect(page.locator("#live-values")).to_be_hidden()


async def test_a_choice_is_radio_buttons_the_keyboard_moves(open_page: OpenPage) -> None:
    choice = Choice(
        label="Your route",
        options=[Option(value="a", label="Highway"), Option(value="b", label="Back road")],
    )
    page = await open_page(Decision(input=choice), initial="a")
    highway = page.get_by_role("radio", name="Highway")
    await expect(page.get_by_role("group", name="Your route")).to_be_visible()
    await expect(highway).to_be_checked()  # the server's initial decision
    await page.get_by_text("Back road").click()
    assert await sent(page) == ["b"]
    await highway.focus()
    await page.keyboard.press("ArrowDown")
    await page.keyboard.press("ArrowUp")
    assert (await sent(page))[-1] == "a"
    await receive(page, "group_decisions", {OTHER: "b"})
    await expect(member(page, OTHER)).to_have_text("Back road")


async def test_a_mix_keeps_its_sliders_summing_to_one(open_page: OpenPage) -> None:
    mix = Mix(actions=["Rock", "Paper", "Scissors"], label="How often you play each")
    page = await open_page(Decision(input=mix), initial=[1 / 3, 1 / 3, 1 / 3])
    await page.get_by_role("slider", name="Rock").fill("0.5")
    [value] = await sent(page)
    assert len(value) == 3 and abs(sum(value) - 1) < 1e-6 and value[0] == 0.5
    assert value[1] == pytest.approx(0.25) and value[2] == pytest.approx(0.25)
    await receive(page, "group_decisions", {OTHER: [0.2, 0.3, 0.5]})
    await expect(member(page, OTHER)).to_have_text("Rock 20% · Paper 30% · Scissors 50%")


async def test_a_compound_sends_its_fields_together_and_payoffs_show_live(
    open_page: OpenPage,
) -> None:
    order = Compound(
        fields={
            "price": Number(min=1, max=10, step=0.5, label="Price"),
            "side": Choice(
                options=[Option(value="bid", label="Buy"), Option(value="ask", label="Sell")]
            ),
        }
    )
    shows = [Shown(name="spread", label="Spread", unit="€", digits=1)]
    view = {"payoffs": {ME: 1.5, OTHER: 2.0}, "shown": {"spread": 0.25}}
    page = await open_page(Decision(input=order, shows=shows), view=view)
    await page.get_by_label("Price, from 1 to 10").fill("4.5")
    await page.get_by_role("radio", name="Sell").check()
    assert await sent(page) == []  # nothing goes before Send
    await page.get_by_role("button", name="Send").click()
    assert await sent(page) == [{"price": 4.5, "side": "ask"}]
    await expect(page.locator("#flow-payoff")).to_have_text("1.50")
    await expect(page.locator("#shown-spread")).to_have_text("0.3 €")
    await expect(page.locator("#period-payoff")).not_to_have_text("–")
    asked = page.asked  # type: ignore[attr-defined]
    assert asked and asked[0] == {"decisions": {ME: None, OTHER: None}}
    await receive(page, "group_decisions", {OTHER: {"price": 3, "side": "bid"}})
    await expect(member(page, OTHER)).to_have_text("price 3.0 · side Buy")


async def test_without_a_declaration_a_text_box_and_a_refusal_not_sent(
    open_page: OpenPage,
) -> None:
    page = await open_page(None)
    box = page.locator("#decision-input")
    await box.fill("70")
    await box.press("Enter")
    assert await sent(page) == [70]
    note = page.locator("#decision-note")
    await receive(page, "error", {"code": "invalid_decision", "message": "at most 50", "seq": 1})
    await expect(note).to_have_text("70: at most 50")
    await expect(note).not_to_contain_text("Sent")
