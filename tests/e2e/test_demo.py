"""`make run`'s demo: one session of each built-in experiment, every link printed."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from devstack.__main__ import create_demo_sessions, print_banner
from services.common import experiments

pytestmark = [pytest.mark.e2e]


def test_the_demo_offers_each_built_in_and_prints_its_links(
    stack: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    sessions = create_demo_sessions(stack.urls)
    assert len({s["label"] for s in sessions}) == 4
    timings = {"infra": 1.0, "services": 1.0, "session": 0.1, "total": 2.1}
    print_banner(stack.urls, sessions, None, timings, stack.run_dir)
    out = capsys.readouterr().out
    for session in sessions:
        assert session["session"] in out
        for participant in session["participants"]:
            assert participant["url"] in out
    built_in = {"decisions", "bimatrix", "public_goods", "double_auction"}
    assert built_in <= set(experiments.names())
    with httpx.Client(headers={"Authorization": f"Bearer {stack.urls.admin_token}"}) as client:
        seen = {
            client.get(f"{stack.urls.store_url}/api/sessions/{s['session']}").json()["experiment"]
            for s in sessions
        }
    assert seen == built_in
