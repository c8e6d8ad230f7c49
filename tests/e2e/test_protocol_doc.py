"""The script in docs/protocol.md ("A script that plays a seat") runs as printed, against the
whole stack: a researcher who copies it gets the ack and the broadcast it promises."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e]

DOC = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def doc_script() -> str:
    section = DOC.read_text().split("## A script that plays a seat", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match is not None, "no Python block in the section"
    return match.group(1)


async def test_the_documented_script_plays_a_seat(stack: Any) -> None:
    script = doc_script()
    line = 'API, TOKEN = "http://127.0.0.1:8001", "<admin token>"'
    assert line in script
    urls = stack.urls
    script = script.replace(line, f"API, TOKEN = {urls.store_url!r}, {urls.admin_token!r}")
    out = io.StringIO()

    def run() -> None:
        names: dict[str, Any] = {"__name__": "protocol_doc"}
        try:
            with contextlib.redirect_stdout(out):
                exec(compile(script, str(DOC), "exec"), names)
        finally:
            if "api" in names:
                names["api"].close()  # a script's process would just exit

    await asyncio.wait_for(asyncio.to_thread(run), timeout=30)
    printed = out.getvalue()
    assert "'ack': {'seq': 1}" in printed
    assert re.search(r"'group_decisions': \{[^}]*0\.7", printed), printed
    assert printed.splitlines()[1].startswith("ts,session,group,participant,direction,channel")
