"""The plug-in contract of docs/experiments.md on the real stack (issue 21), with the example
Cournot duopoly (tests/plugins/site/canopy_cournot, on the services' path as if installed):
a check across params is refused at the field it names, `GET /api/experiments` gives an
experiment's `description` attribute and where it came from, every service that loads
plug-ins logs them at start, and `canopy bots` plays the plug-in on its params' scale, saying
so, when the plug-in is not installed where the bots run (where it is, they play what it
declares: tests/e2e/test_plugin_bots.py)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.protocol import create_session, export_until, inbound

pytestmark = [pytest.mark.e2e]

CANOPY = str(Path(sys.executable).parent / "canopy")
COURNOT_SOURCE = "entry point canopy_cournot:Cournot, canopy-cournot 0.1.0"


async def test_a_check_across_params_is_refused_at_the_field_it_names(
    api: httpx.AsyncClient,
) -> None:
    body = {"experiment": "cournot", "num_participants": 2, "group_size": 2, "period_length": 5}
    refused = await api.post("/api/sessions", json=body | {"params": {"a": 60, "cost": 70}})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["field"] == "params.cost"
    assert error["message"] == "params.cost: cost must be below a (60)"
    # The field's own bounds are pydantic's, named as ever; the group check too.
    bad = await api.post("/api/sessions", json=body | {"params": {"max_quantity": -1}})
    assert bad.json()["error"]["field"] == "params.max_quantity"
    three = await api.post("/api/sessions", json=body | {"num_participants": 3, "group_size": 3})
    assert three.json()["error"]["field"] == "group_size"


async def test_experiments_give_a_description_attribute_and_their_source(
    api: httpx.AsyncClient,
) -> None:
    response = await api.get("/api/experiments")
    assert response.status_code == 200
    by_name = {e["name"]: e for e in response.json()["experiments"]}
    cournot = by_name["cournot"]
    assert cournot["description"].startswith("A Cournot duopoly in continuous time: each firm")
    assert cournot["source"] == COURNOT_SOURCE
    assert cournot["min_group_size"] == 2
    # Without the attribute: the class docstring, as before.
    assert by_name["bimatrix"]["description"].startswith("Continuous-time 2×2 game")
    assert by_name["bimatrix"]["source"] == "built-in"


def test_every_service_that_loads_plug_ins_logs_them_at_start(stack: Any) -> None:
    for service in ("store", "decisions", "gateway"):
        lines = [
            json.loads(line)
            for line in stack.log_path(service).read_text().splitlines()
            if line.startswith("{") and '"experiments: ' in line
        ]
        assert lines, f"{service} did not log its experiments"
        message = lines[0]["message"]
        assert f"cournot ({COURNOT_SOURCE})" in message, message
        assert "min_effort (entry point canopy_min_effort:MinEffort" in message, message
        assert "public_goods (built-in)" in message, message


async def test_canopy_bots_play_a_plug_in_on_its_params_scale_and_warn(
    stack: Any, api: httpx.AsyncClient
) -> None:
    session = await create_session(api, experiment="cournot", period_length=2.0)
    base = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")}
    process = await asyncio.create_subprocess_exec(
        CANOPY, "--api", stack.urls.store_url, "--token", stack.urls.admin_token,
        "bots", session["session"], "--rate", "10", "--seed", "3",
        env=base, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    stderr = err.decode()
    assert process.returncode == 0, stderr
    warning = " ".join(stderr.split())  # rich wraps long lines
    # The bots' own environment lacks the plug-in (its declaration): they guess, and say so.
    assert "warning: 'cournot' is not installed where the bots run" in warning, stderr
    assert "0 to params.max_quantity: [0, 50]" in warning, stderr
    codes = [p["code"] for p in session["participants"]]
    rows = await export_until(
        api,
        session["session"],
        lambda rows: any(r["channel"] == "period_end" for r in rows),
    )
    quantities = [json.loads(r["value"]) for code in codes for r in inbound(rows, code)]
    assert len(quantities) >= 10, rows
    assert all(0 <= q <= 50 for q in quantities)
    assert max(quantities) > 5, quantities  # the quantity scale, not the slider's [0, 1]
