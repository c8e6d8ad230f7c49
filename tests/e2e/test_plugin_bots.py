"""`canopy bots` on a plug-in that declares its decision (issue 21, done when): the Cournot
duopoly of tests/plugins/site/canopy_cournot, installed where the services and the bots run
(PYTHONPATH, as pip would), declares a quantity from 0 to `max_quantity` units. With no range
flags the bots play inside it, with no warning (nothing is guessed), and the decisions service
accepts every move (it checks the declaration: the plug-in has no `validate`); with
`--strategy best_response` (the generic one, searched over the declaration with the plug-in's
own payoffs) the two firms reach the Cournot-Nash quantities, (a − cost) / 3 = 18 each."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import PLUGINS_SITE
from tests.e2e.protocol import create_session, export_until, inbound

pytestmark = [pytest.mark.e2e]

CANOPY = str(Path(sys.executable).parent / "canopy")


async def play(stack: Any, session: str, *flags: str) -> str:
    """Run `canopy bots` on the session until its period ended; its stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")}
    env["PYTHONPATH"] = str(PLUGINS_SITE)  # the plug-in, installed where the bots run
    process = await asyncio.create_subprocess_exec(
        CANOPY, "--api", stack.urls.store_url, "--token", stack.urls.admin_token,
        "bots", session, "--rate", "10", "--seed", "3", *flags,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    return err.decode()


async def moves(api: httpx.AsyncClient, session: dict[str, Any]) -> dict[str, list[Any]]:
    """Each member's decisions as the log holds them, and the refusals answering any."""
    rows = await export_until(
        api, session["session"], lambda rows: any(r["channel"] == "period_end" for r in rows)
    )
    codes = [p["code"] for p in session["participants"]]
    refused = [r for r in rows if r["channel"] == "error"]
    assert refused == [], refused
    return {code: [json.loads(r["value"]) for r in inbound(rows, code)] for code in codes}


async def test_canopy_bots_play_a_declared_decision_inside_its_range_without_a_guess(
    stack: Any, api: httpx.AsyncClient
) -> None:
    session = await create_session(
        api, experiment="cournot", period_length=2.0, params={"max_quantity": 30}
    )
    stderr = await play(stack, session["session"])
    assert "warning" not in stderr, stderr
    played = await moves(api, session)
    quantities = [q for qs in played.values() for q in qs]
    assert len(quantities) >= 10, played
    assert all(0 <= q <= 30 for q in quantities), quantities
    assert max(quantities) > 1, quantities  # the declared scale, not the slider's [0, 1]


async def test_the_generic_best_response_reaches_the_cournot_nash_quantities(
    stack: Any, api: httpx.AsyncClient
) -> None:
    session = await create_session(api, experiment="cournot", period_length=2.0)
    stderr = await play(stack, session["session"], "--strategy", "best_response")
    assert "warning" not in stderr, stderr
    played = await moves(api, session)
    for code, quantities in played.items():
        assert quantities, played
        assert abs(quantities[-1] - 18) <= 0.5, (code, quantities)
