"""Least privilege in the browser (issue 23): the admin token never in a URL a server sees, the
console's tabs never handing it to the pages it opens, and both the console and the
participant pages working under their Content-Security-Policy with nothing refused.

Headless Chromium against the session's stack. A violation is caught two ways: the
`securitypolicyviolation` event (recorded by an init script in every document) and Chromium's
"Refused to …" console message.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import BrowserContext, Page, Route, expect

from tests.browser.conftest import CHROMIUM, NewContext, create_session
from tests.e2e.protocol import KEYS, Participant

pytestmark = [
    pytest.mark.browser,
    pytest.mark.e2e,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} missing: apt-get install -y chromium"
    ),
]
TOKEN_KEY = "canopy.adminToken"
RECORD_VIOLATIONS = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (event) => {
  const where = `${event.sourceFile}:${event.lineNumber}`;
  window.__violations.push(`${event.violatedDirective} ${event.blockedURI} at ${where}`);
});
"""


async def watched(context: BrowserContext) -> list[str]:
    """Every CSP refusal in `context`'s pages, as Chromium reports it on the console."""
    refused: list[str] = []
    await context.add_init_script(RECORD_VIOLATIONS)
    context.on(
        "console",
        lambda message: (
            refused.append(message.text) if "Content Security Policy" in message.text else None
        ),
    )
    return refused


async def violations(page: Page) -> list[str]:
    found: list[str] = await page.evaluate("() => window.__violations || []")
    return found


async def test_a_fragment_link_signs_in_and_a_query_token_is_not_used(
    new_context: NewContext, stack: Any
) -> None:
    urls = stack.urls
    context = await new_context()
    page = await context.new_page()
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    await page.goto(f"{urls.store_url}/#token={urls.admin_token}")
    await expect(page.locator("#console")).to_be_visible()
    assert urls.admin_token not in page.url  # taken off the address bar (and history)
    assert await page.evaluate(f"() => sessionStorage.getItem('{TOKEN_KEY}')") == urls.admin_token
    assert not [url for url in requested if urls.admin_token in url]  # no server saw it

    # A link of the old kind: its request already told the server; the console asks instead.
    other = await (await new_context()).new_page()
    await other.goto(f"{urls.store_url}/?token={urls.admin_token}")
    await expect(other.locator("#sign-in")).to_be_visible()
    await expect(other.locator("#sign-in-error")).to_contain_text("#token=")
    assert urls.admin_token not in other.url
    assert await other.evaluate(f"() => sessionStorage.getItem('{TOKEN_KEY}')") is None


async def test_open_all_in_tabs_hands_the_pages_neither_the_token_nor_an_opener(
    new_context: NewContext, stack: Any
) -> None:
    """On Kubernetes the console and the pages share one host: a tab opened with an opener
    would get a copy of the console tab's sessionStorage, the admin token in it. Here the
    participants' links are pointed at the console's own origin to be in that case."""
    urls = stack.urls
    context = await new_context()
    page = await context.new_page()
    same_origin = f"{urls.store_url}/healthz"

    async def same_origin_links(route: Route) -> None:
        if route.request.method != "POST":
            await route.continue_()  # the session list
            return
        response = await route.fetch()
        created = await response.json()
        for participant in created["participants"]:
            participant["url"] = f"{same_origin}?seat={participant['id_in_group']}"
        await route.fulfill(response=response, body=json.dumps(created))

    await page.route("**/api/sessions", same_origin_links)
    await page.goto(f"{urls.store_url}/#token={urls.admin_token}")
    await expect(page.locator("#console")).to_be_visible()
    await page.get_by_label("Participants").fill("2")
    await page.get_by_label("Group size").fill("2")
    await page.get_by_role("button", name="Create session").click()
    await expect(page.locator("#created-links a")).to_have_count(2)
    for link in await page.locator("#created-links a").all():
        assert "noopener" in str(await link.get_attribute("rel"))
    async with context.expect_page() as first_tab:
        await page.get_by_role("button", name="Open all in tabs").click()
    tab = await first_tab.value
    await tab.wait_for_load_state()
    assert tab.url.startswith(same_origin)
    assert await tab.evaluate("() => window.opener") is None
    assert await tab.evaluate(f"() => sessionStorage.getItem('{TOKEN_KEY}')") is None
    await expect(page.locator("#copy-status")).to_contain_text("opened")


async def test_the_console_and_a_page_work_under_their_policy(
    new_context: NewContext, stack: Any
) -> None:
    """The console signs in, lists, monitors live (EventSource) and shows the replay chart
    (uPlot); a participant page loads its modules, reads its JSON config and plays over its
    socket: nothing is refused."""
    urls = stack.urls
    session = await create_session(stack, num_participants=2, group_size=2, period_length=3)
    context = await new_context()
    refused = await watched(context)
    console = await context.new_page()
    await console.goto(f"{urls.store_url}/#token={urls.admin_token}")
    await expect(console.locator("#console")).to_be_visible()
    row = console.locator(f'tr[data-session="{session.id}"]')
    await row.get_by_role("button", name="Monitor").click()
    await expect(console.locator("#monitor-stream")).to_have_attribute("data-status", "open")

    page = await context.new_page()
    await page.goto(session.urls[0])
    await expect(page.locator("body")).to_have_attribute("data-phase", "waiting")
    assert session.codes[1] in KEYS  # the other seat's key, for its protocol client
    other = await Participant.connect(urls.gateway_url, session.codes[1])
    await expect(page.locator("body")).to_have_attribute("data-phase", "running")
    await other.expect("period_start")
    await other.ack(await other.send(0.4))  # something numeric for the chart
    # The period's end on the page, and the replay chart (uPlot) in the console.
    await expect(console.locator('.period[data-state="ended"]')).to_have_count(1, timeout=10_000)
    await expect(console.locator("#replay canvas")).to_have_count(1)
    await other.close()
    for each in (console, page):
        assert await violations(each) == [], each.url
    assert refused == []
