"""Issue 21, done when: an outside plug-in that declares its decision gets a usable page without
any JavaScript of its own. The Cournot duopoly of tests/plugins/site/canopy_cournot (on the
services' path as if pip-installed) declares a quantity from 0 to `max_quantity` units and
shows the price and the total quantity live; it has no page and no `validate`.

In headless Chromium on a phone-sized screen, against the whole stack, the generic page shows
the declared label, range and unit, the instructions, the other member's quantity in units,
the live flow payoff and declared values (computed by the plug-in's own hooks through
POST /p/{key}/view), the running period payoff, and a refused quantity beside the control
with the server's message (the decisions service checks the declaration), above the fold;
the keyboard moves the slider. Screenshot: docs/screenshots/plugin-cournot.png.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from playwright.async_api import Page, expect

from tests.browser.conftest import (
    CHROMIUM,
    SOON_MS,
    VIEWPORT,
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


def row(page: Page, code: str) -> Any:
    return page.locator(f'#members [data-participant="{code}"]')


async def test_the_generic_page_plays_a_declared_cournot_quantity(
    stack: Any, new_context: NewContext
) -> None:
    session = await create_session(
        stack, experiment="cournot", period_length=60, params={"max_quantity": 50}
    )
    me, other_code = session.codes
    page = await open_page(await new_context(), session.urls[0])
    other = await Participant.connect(session.gateway_url, other_code)
    try:
        await expect(page.locator("#period")).to_have_attribute(
            "data-state", "running", timeout=SOON_MS
        )
        config = await page.evaluate("() => window.canopyPage.config")
        assert config["decision"]["input"] == {
            "kind": "number",
            "min": 0.0,
            "max": 50.0,
            "step": None,
            "unit": "units",
            "label": "Your quantity",
            "control": "auto",
        }
        # The declared label, range and unit, and the instructions.
        await expect(page.locator("#experiment .decision-label")).to_have_text(
            "Your quantity, from 0 to 50 units"
        )
        await expect(page.locator("#instructions")).to_contain_text("Choose how many units")
        slider = page.locator("#slider")
        await expect(slider).to_have_attribute("min", "0")
        await expect(slider).to_have_attribute("max", "50")
        await expect(slider).to_be_enabled()

        # The other member's quantity, in the same terms.
        await other.send(20)
        await expect(row(page, other_code).locator(".decision")).to_have_text(
            "20.0 units", timeout=SOON_MS
        )
        await slider.fill("12")
        await expect(row(page, me).locator(".decision")).to_have_text("12.0 units", timeout=SOON_MS)
        await expect(page.locator("#slider-value")).to_have_text("12.0 units")
        # The live values from the plug-in's own hooks: price 60 − 32 = 28, my profit
        # (28 − 6) · 12 = 264 a second.
        await expect(page.locator("#flow-payoff")).to_have_text("264.00", timeout=SOON_MS)
        await expect(page.locator("#shown-price")).to_have_text("28.00 per unit")
        await expect(page.locator("#shown-total")).to_have_text("32.00 units")
        running = page.locator("#period-payoff")
        await expect(running).not_to_have_text("–", timeout=SOON_MS)
        assert 0 <= float(await running.get_attribute("data-value") or "nan") <= 264.0

        # The keyboard: a step of the slider (0.1 units) is sent like a drag.
        await slider.focus()
        await page.keyboard.press("ArrowRight")
        await expect(row(page, me).locator(".decision")).to_have_text("12.1 units", timeout=SOON_MS)

        # A quantity outside the declared range (sent as a script would: the slider cannot):
        # the decisions service checks the declaration (the plug-in has no `validate`), and
        # the page shows the refusal beside the control, on the first screen of a phone.
        await page.evaluate("() => window.canopyClient.decide(70)")
        note = page.locator("#decision-note")
        await expect(note).to_have_attribute("data-invalid", "true", timeout=SOON_MS)
        await expect(note).to_have_text("70.0 units: a decision is a number from 0 to 50 units")
        assert "Sent" not in await note.inner_text()
        box = await note.bounding_box()
        control = await slider.bounding_box()
        assert box is not None and control is not None
        assert box["y"] + box["height"] <= VIEWPORT["height"], box  # no scrolling to see it
        assert 0 <= box["y"] - (control["y"] + control["height"]) <= 120, (box, control)
        # The refused value changed nothing.
        await expect(row(page, me).locator(".decision")).to_have_text("12.1 units")
        await expect(page.locator("#errors [data-code=invalid_decision]")).to_have_count(1)
        await expect(page.locator("#chart canvas")).to_have_count(1)
        await screenshot(page, "plugin-cournot")

        # The next decision clears the refusal.
        await slider.fill("15")
        await expect(note).not_to_have_attribute("data-invalid", "true", timeout=SOON_MS)
        await expect(page.locator("#flow-payoff")).to_have_text(
            f"{(60 - 35 - 6) * 15:.2f}", timeout=SOON_MS
        )
    finally:
        await other.close()
