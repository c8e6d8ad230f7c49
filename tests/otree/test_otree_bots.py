"""The oTree example (integrations/otree/example) run by oTree 6's own bots against this test
session's Canopy stack: every oTree group gets its Canopy session, Canopy's bots play it, and
each player's oTree payoff and participant fields are Canopy's session detail.

oTree lives in a virtualenv of its own (`.venv-otree`, made by `make otree-check`): its pins
(starlette 0.14, uvicorn 0.13) cannot share Canopy's `.venv`. So `otree test` runs as a
subprocess, and what oTree stored is read from its CSV export.
"""

from __future__ import annotations

import csv
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.stack import PROJECT_ROOT, StackHandle
from tests.otree.conftest import otree_env

pytestmark = pytest.mark.otree

OTREE = PROJECT_ROOT / ".venv-otree" / "bin" / "otree"
EXAMPLE = PROJECT_ROOT / "integrations" / "otree" / "example"
CONFIG = "canopy_bimatrix_quick"
RETURN_URL = "http://127.0.0.1:9"  # where oTree would be: `otree test` has no server
PARTICIPANTS = 4  # two groups of 2, in each of the bots' two cases


def canopy_detail(stack: StackHandle, session: str) -> dict[str, Any]:
    response = httpx.get(
        f"{stack.urls.store_url}/api/sessions/{session}",
        headers={"Authorization": f"Bearer {stack.urls.admin_token}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    detail: dict[str, Any] = response.json()
    return detail


@pytest.mark.timeout(300)
def test_otree_bots_get_canopys_payoffs(stack: StackHandle, tmp_path: Path) -> None:
    assert OTREE.exists(), f"{OTREE} is missing: `make otree-check` creates .venv-otree"
    export = tmp_path / "export"
    started = time.perf_counter()
    run = subprocess.run(
        [str(OTREE), "test", CONFIG, str(PARTICIPANTS), "--export", str(export)],
        cwd=EXAMPLE,
        env=otree_env(stack, CANOPY_RETURN_URL=RETURN_URL),
        capture_output=True,
        text=True,
        timeout=240,
    )
    print(f"otree test {CONFIG} {PARTICIPANTS}: {time.perf_counter() - started:.1f} s")
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    output = run.stdout + run.stderr
    assert output.count("Bots completed session") == 2, output[-2000:]

    with (export / "all_apps_wide.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * PARTICIPANTS  # both cases' sessions
    played = [r for r in rows if r["participant.canopy_outcome"] == "completed"]
    no_show = [r for r in rows if r["participant.canopy_outcome"] == "unfinished"]
    assert len(played) == len(no_show) == PARTICIPANTS, [
        r["participant.canopy_outcome"] for r in rows
    ]

    sessions: dict[str, dict[str, Any]] = {}
    for row in rows:
        session = row["participant.canopy_session"]
        if session not in sessions:
            sessions[session] = canopy_detail(stack, session)
    # One Canopy session per oTree group: two groups per oTree session, two oTree sessions.
    assert len(sessions) == 4
    for row in rows:
        detail = sessions[row["participant.canopy_session"]]
        # The Canopy group is exactly the oTree group, seats in id_in_group order.
        members = [r for r in rows if r["participant.canopy_session"] == detail["session"]]
        assert {r["session.code"] for r in members} == {row["session.code"]}
        assert {r["canopy_bimatrix.1.group.id_in_subsession"] for r in members} == {
            row["canopy_bimatrix.1.group.id_in_subsession"]
        }
        assert detail["experiment"] == "bimatrix"
        assert detail["params"]["game"] == "stag_hunt"
        back = {"url": f"{RETURN_URL}/InitializeParticipant/{{label}}"}
        assert detail["completion"] == {"completed": back, "dropout": back}
        assert detail["labels"] == [
            r["participant.code"]
            for r in sorted(members, key=lambda r: int(r["canopy_bimatrix.1.player.id_in_group"]))
        ]
        (seat,) = [p for p in detail["participants"] if p["label"] == row["participant.code"]]
        assert seat["code"] == row["participant.canopy_code"]
        assert seat["id_in_group"] == int(row["canopy_bimatrix.1.player.id_in_group"])
        payoff = float(row["canopy_bimatrix.1.player.payoff"])
        if row in played:
            assert seat["status"] == "finished"
            assert seat["outcome"] == "completed"
            assert len(seat["payoffs"]) == 2
            assert float(row["participant.canopy_total_payoff"]) == seat["total_payoff"]
            assert row["participant.canopy_payoffs"] == str(seat["payoffs"])
            # oTree keeps POINTS_DECIMAL_PLACES = 2 of Canopy's total.
            assert payoff == round(seat["total_payoff"], 2)
            assert payoff > 0
        else:
            # The group's second member never opened Canopy: the stage never started, and
            # oTree's timeout moved both members on.
            assert seat["status"] != "finished"
            assert seat["payoffs"] == {}
            assert payoff == 0
