"""The built-in experiments' pages (GET /p/{code}) in headless Chromium against the whole stack.

Each test plays one short period (3–4 s) of a session created through the researchers' API
and saves a screenshot of a page mid-period to docs/screenshots/<experiment>.png: two bimatrix
pages end the period showing the same decisions and payoffs as the API; a public-goods page
shows the group total of its own and a WebSocket member's contributions; a double-auction
page places an ask that a zero-intelligence bot (services.bots) fills; a plug-in experiment
brings its own page (and an unknown link gets the generic one); and the page's config and
escaping come from the gateway.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Page, expect

from services.bots.runner import start_bots
from tests.browser.conftest import (
    CHROMIUM,
    SOON_MS,
    NewContext,
    create_session,
    open_page,
    screenshot,
)
from tests.e2e.protocol import Participant

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"
    ),
]
PERIOD_MS = 10_000  # a short period ends well within this, even on a loaded machine


def row(page: Page, code: str) -> Any:
    return page.locator(f'#members [data-participant="{code}"]')


async def expect_running(page: Page) -> None:
    await expect(page.locator("#status")).to_have_attribute(
        "data-status", "connected", timeout=SOON_MS
    )
    await expect(page.locator("#period")).to_have_attribute(
        "data-state", "running", timeout=SOON_MS
    )


async def expect_ended(page: Page) -> None:
    await expect(page.locator("#period")).to_have_attribute(
        "data-state", "ended", timeout=PERIOD_MS
    )


async def set_slider(page: Page, value: float) -> None:
    # fill() on a range input sets the value and fires `input` and `change`, like a drag ending.
    await page.locator("#slider").fill(f"{value:g}")


async def page_config(page: Page) -> dict[str, Any]:
    config: dict[str, Any] = await page.evaluate("() => window.canopyPage.config")
    return config


async def api_payoffs(session: Any) -> dict[str, float]:
    detail = await session.detail()
    return {p["code"]: p["payoffs"].get("1") for p in detail["participants"]}


async def test_two_bimatrix_pages_end_the_period_agreeing(
    stack: Any, new_context: NewContext
) -> None:
    session = await create_session(
        stack, experiment="bimatrix", period_length=3, params={"game": "stag_hunt"}
    )
    a, b = session.codes
    page_a = await open_page(await new_context(), session.urls[0])
    # The waiting screen until the group is complete; the game is not shown yet.
    await expect(page_a.locator("#waiting-text")).to_have_text(
        "Waiting for everyone in your group to join: 1 of 2 here.", timeout=SOON_MS
    )
    await expect(page_a.locator("#experiment")).to_be_hidden()
    page_b = await open_page(await new_context(), session.urls[1])
    for page in (page_a, page_b):
        await expect_running(page)
        await expect(page.locator("#experiment-title")).to_have_text("Bimatrix game")
    await expect(page_a.locator("#waiting")).to_be_hidden()
    # The clock: on this machine the server's clock is the browsers' own, so the true offset
    # is 0, which must lie within the bounds the client keeps: [offset, offset + error].
    for page in (page_a, page_b):
        offset, error = await page.evaluate(
            "() => [window.canopyClient.state.serverOffset, window.canopyClient.state.clockError]"
        )
        print(f"clock offset {offset:+.4f} s, bounds {error:.4f} s wide")
        assert error is not None and offset - 0.002 <= 0 <= offset + error + 0.002
    # Both pages' countdowns say the same (the reads are some ms apart; a loaded machine
    # delays the frames the bounds come from).
    left = "() => window.canopyClient.state.period.ends_at - window.canopyClient.serverNow()"
    lefts = [await p.evaluate(left) for p in (page_a, page_b)]
    assert abs(lefts[0] - lefts[1]) < 0.5, lefts
    config = await page_config(page_a)
    assert config["experiment"] == "bimatrix"
    assert config["params"]["payoff_matrix"] == [[[4, 4], [0, 3]], [[3, 0], [3, 3]]]

    await set_slider(page_a, 0.2)  # A plays Stag 20 %
    await set_slider(page_b, 0.9)  # B plays Stag 90 %
    for page in (page_a, page_b):
        await expect(row(page, a).locator(".decision")).to_have_text("20%", timeout=SOON_MS)
        await expect(row(page, b).locator(".decision")).to_have_text("90%", timeout=SOON_MS)
    # A is the row player: the likeliest outcome is A Hare, B Stag (0.8 × 0.9), A gets 3.
    current = page_a.locator("#matrix td.current")
    await expect(current).to_have_attribute("data-cell", "10")
    await expect(current).to_have_attribute("aria-current", "true")
    # A's expected flow payoff: 0.2·0.9·4 + 0.8·0.9·3 + 0.8·0.1·3 = 3.12 (0.2·0.1·0 aside).
    await expect(page_a.locator("#expected-payoff")).to_have_text("3.12")
    # B is the column player and sees the matrix from its side: B Stag, A Hare, B gets 0.
    await expect(page_b.locator("#matrix td.current")).to_have_attribute("data-cell", "01")
    await expect(page_a.locator("#chart canvas")).to_have_count(1)
    await screenshot(page_a, "bimatrix")

    for page in (page_a, page_b):
        await expect_ended(page)
    # Both pages show the same payoffs (each with its own "(you)").
    tables = [
        [
            [await cell.inner_text() for cell in await tr.locator("td").all()]
            for tr in await p.locator("#result-table tbody tr").all()
        ]
        for p in (page_a, page_b)
    ]
    assert tables[0] == tables[1], tables
    decisions = [
        await p.evaluate("() => window.canopyClient.state.groupDecisions")
        for p in (
            page_a,
            page_b,
        )
    ]
    assert decisions[0] == decisions[1] == {a: 0.2, b: 0.9}
    shown = {
        code: float(
            await page_a.locator(
                f'#result-table tr[data-participant="{code}"] .payoff'
            ).inner_text()
        )
        for code in (a, b)
    }
    payoffs = await page_a.evaluate("() => window.canopyClient.state.period.payoffs")
    assert shown == pytest.approx({code: round(v, 2) for code, v in payoffs.items()}, abs=0.006)
    api = await api_payoffs(session)
    assert api == pytest.approx(payoffs)
    mine = await page_b.locator("#result-text").get_attribute("data-payoff")
    assert float(mine or "nan") == pytest.approx(payoffs[b])


async def test_sub_periods_and_a_pause_while_a_member_is_away(
    stack: Any, new_context: NewContext
) -> None:
    session = await create_session(stack, period_length=4, num_subperiods=4, on_disconnect="pause")
    page_a = await open_page(await new_context(), session.urls[0])
    context_b = await new_context()
    page_b = await open_page(context_b, session.urls[1])
    await expect_running(page_a)
    subperiod = page_a.locator("#subperiod")
    await expect(subperiod).to_have_text("Sub-period 1 of 4.")
    await expect(subperiod).to_have_attribute("data-done", "1", timeout=SOON_MS)
    await expect(subperiod).to_have_text("Sub-period 2 of 4.")

    await context_b.close()  # B leaves: the period stops until B is back
    await expect(page_a.locator("#paused")).to_be_visible(timeout=SOON_MS)
    await expect(page_a.locator("#period")).to_have_attribute("data-state", "paused")
    left = await page_a.locator("#countdown").get_attribute("data-remaining")
    assert left is not None and 0 < int(left) <= 3
    await expect(page_a.locator("#slider")).to_be_disabled()

    page_b = await open_page(await new_context(), session.urls[1])
    await expect_running(page_b)
    await expect(page_a.locator("#paused")).to_be_hidden(timeout=SOON_MS)
    await expect_running(page_a)
    await expect_ended(page_a)
    await expect(subperiod).to_have_text("All 4 sub-periods done.")


async def test_public_goods_page_shows_the_group_total(stack: Any, new_context: NewContext) -> None:
    session = await create_session(
        stack,
        experiment="public_goods",
        period_length=3,
        params={"endowment": 20, "mpcr": 0.5},
    )
    a, b = session.codes
    other = await Participant.connect(session.gateway_url, b)  # member 2: a plain WebSocket
    try:
        await other.expect("hello")
        page = await open_page(await new_context(), session.urls[0])
        await expect_running(page)
        await other.expect("period_start")
        await other.send(5)
        await set_slider(page, 8)
        await expect(page.locator("#group-total")).to_have_text("13.00 of 40", timeout=SOON_MS)
        await expect(page.locator("#group-total")).to_have_attribute("data-total", "13")
        await expect(page.locator("#kept")).to_have_text("12.00")
        await expect(page.locator("#flow-payoff")).to_have_text("18.50")  # 20 − 8 + 0.5 · 13
        await expect(row(page, b).locator(".decision")).to_have_text("5.00")
        await expect(page.locator("#slider")).to_have_attribute("max", "20")
        await screenshot(page, "public_goods")
        await expect_ended(page)
        payoffs = await page.evaluate("() => window.canopyClient.state.period.payoffs")
        await expect(page.locator("#result-text")).to_contain_text(f"{payoffs[a]:.2f}")
    finally:
        await other.close()


async def test_double_auction_order_filled_by_a_bot(stack: Any, new_context: NewContext) -> None:
    session = await create_session(
        stack, experiment="double_auction", period_length=4, params={"buyer_value": 60}
    )
    buyer, seller = session.codes
    page = await open_page(await new_context(), session.urls[1])  # member 2 sells
    await expect(page.locator("#order-submit")).to_have_text("Place ask")
    await expect(page.locator("#role")).to_contain_text("seller")
    fleet = await start_bots(
        [session.urls[0]], experiment="double_auction", params={"buyer_value": 60}, rate=5.0
    )
    try:
        await expect_running(page)
        await page.locator("#order-price").fill("10")
        await page.locator("#order-quantity").fill("1")
        await page.locator("#order-price").press("Enter")  # the keyboard submits the form
        # The bot bids within [0.01, 60] until one crosses; the ask (or its bid) trades.
        trade = page.locator("#tape li.mine").first
        await expect(trade).to_contain_text("you sold", timeout=PERIOD_MS)
        price = float(await trade.get_attribute("data-price") or "nan")
        assert 0 < price <= 60
        await expect(page.locator("#position-units")).to_have_text("1")
        await expect(page.locator("#position-profit")).to_have_text(f"{price:.2f}")
        await expect(page.locator("#chart canvas")).to_have_count(1)
        await screenshot(page, "double_auction")
        await expect_ended(page)
        payoffs = await page.evaluate("() => window.canopyClient.state.period.payoffs")
        # Later trades (the page's next asks are none, but the bot may rest more bids) do
        # not change the seller's sum: one unit sold.
        assert payoffs[seller] == pytest.approx(price)
        assert payoffs[buyer] == pytest.approx(60 - price)
    finally:
        await fleet.stop()
    events = await session.events()
    orders = [e for e in events if e["direction"] == "in" and e["participant"] == seller]
    assert [e["channel"] for e in orders] == ["orders"]
    value = orders[0]["value"]
    assert (json.loads(value) if isinstance(value, str) else value) == {
        "side": "ask",
        "price": 10,
        "quantity": 1,
    }


async def test_cancel_takes_the_order_out_of_the_book(stack: Any, new_context: NewContext) -> None:
    session = await create_session(stack, experiment="double_auction", period_length=30)
    seller = session.codes[1]
    other = await Participant.connect(session.gateway_url, seller)
    try:
        page = await open_page(await new_context(), session.urls[0])  # member 1 buys
        await expect_running(page)
        await page.locator("#order-price").fill("42.5")
        await page.locator("#order-quantity").fill("3")
        await page.locator("#order-submit").click()
        mine = page.locator("#bids-body tr.mine")
        await expect(mine).to_have_count(1, timeout=SOON_MS)
        await expect(mine).to_contain_text("42.50")
        await expect(page.locator("#spread")).to_have_text("42.50 / –")
        cancel = page.get_by_role("button", name=re.compile(r"^Cancel your order \d+: 3 at 42.50"))
        await cancel.click()
        await expect(mine).to_have_count(0, timeout=SOON_MS)
        # A bad price never leaves the page: the form says why.
        await page.locator("#order-price").fill("0")
        await page.locator("#order-submit").click()
        await expect(page.locator("#order-note")).to_have_text("Enter a price above 0.")
        assert await page.evaluate("() => window.canopyClient.state.pending.length") == 0
    finally:
        await other.close()


async def test_a_plugin_experiment_brings_its_own_page(stack: Any, new_context: NewContext) -> None:
    # tests/plugins/site/canopy_min_effort/page.js: the example of docs/pages.md.
    session = await create_session(
        stack, experiment="min_effort", period_length=30, params={"max_effort": 5}
    )
    a, b = session.codes
    page = await open_page(await new_context(), session.urls[0])
    other = await Participant.connect(session.gateway_url, b)
    try:
        await expect_running(page)
        await expect(page.locator("#experiment-title")).to_have_text("Minimum effort")
        efforts = page.get_by_role("group", name="Your effort, from 1 to 5").get_by_role("button")
        await expect(efforts).to_have_count(5)
        await page.get_by_role("button", name="4", exact=True).click()
        await expect(row(page, a).locator(".decision")).to_have_text("4.00", timeout=SOON_MS)
        await expect(page.get_by_role("button", name="4", exact=True)).to_have_attribute(
            "aria-pressed", "true"
        )
        await other.send(2)
        await expect(row(page, b).locator(".decision")).to_have_text("2.00", timeout=SOON_MS)
    finally:
        await other.close()


async def test_an_unknown_link_gets_the_generic_page_and_says_so(
    new_context: NewContext, stack: Any
) -> None:
    gateway = str(stack.urls.gateway_url)
    page = await open_page(await new_context(), f"{gateway}/p/nosuchparticipant")
    await expect(page.locator("#status")).to_have_attribute(
        "data-status", "refused", timeout=SOON_MS
    )
    await expect(page.locator("#notice")).to_contain_text("not valid")
    await expect(page.locator("#decision-input")).to_be_disabled()  # generic.js loaded
    await expect(page.locator("#play")).to_be_hidden()


def test_the_docs_show_the_plugin_page_as_it_is() -> None:
    root = Path(__file__).resolve().parents[2]
    docs = (root / "docs" / "pages.md").read_text()
    shown = docs.split("This is the example plug-in's page", 1)[1].split("```js\n", 1)[1]
    shown = shown.split("```", 1)[0]
    source = (root / "tests/plugins/site/canopy_min_effort/page.js").read_text()
    code = "\n".join(line for line in source.splitlines() if not line.startswith("//"))
    assert shown.strip() == code.strip()


async def test_the_gateway_embeds_the_config_safely(stack: Any) -> None:
    session = await create_session(stack, experiment="public_goods", params={"endowment": 30})
    async with httpx.AsyncClient(timeout=10) as http:
        page = await http.get(session.urls[0])
        unknown = await http.get(f"{session.gateway_url}/p/no-such-code")
        odd = await http.get(f"{session.gateway_url}/p/%3C!--%3Cscript%3E")
    assert page.status_code == 200
    assert '<script type="module" src="/static/public_goods.js"></script>' in page.text
    embedded = re.search(r'id="canopy-config">(.*?)</script>', page.text, re.S)
    assert embedded, page.text
    config = json.loads(embedded.group(1))
    assert config["params"] == {"endowment": 30.0, "mpcr": 0.4}  # defaults filled in
    assert config["members"] == session.codes
    assert config["period_length"] == 30
    # An unknown link gets 404 and the generic page without seat data (PROTOCOL v2); its
    # WebSocket is then refused with 4403.
    assert unknown.status_code == 404
    assert "/static/generic.js" in unknown.text
    assert not [code for code in session.codes if code in unknown.text]
    async with httpx.AsyncClient(timeout=10) as http:
        plugin = await http.get(f"{session.gateway_url}/static/plugins/min_effort.js")
        none = await http.get(f"{session.gateway_url}/static/plugins/public_goods.js")
    assert plugin.status_code == 200
    assert plugin.headers["content-type"].startswith("text/javascript")
    assert 'from "/static/page.js"' in plugin.text
    assert none.status_code == 404
    # An impossible key is not even echoed: the page holds no seat data at all.
    assert odd.status_code == 404
    assert '"participant":null' in odd.text
    assert "<!--<script>" not in odd.text
