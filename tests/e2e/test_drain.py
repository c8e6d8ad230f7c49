"""Graceful drain on SIGTERM (services/common/serve.py): readiness turns false first, then the
gateway closes its participants' sockets with 1012 ("service restart") and exits."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import httpx
import pytest
import websockets

from tests.e2e.conftest import extra_service
from tests.e2e.protocol import ws_url

pytestmark = pytest.mark.e2e

DRAIN = 1.5


async def test_sigterm_turns_readiness_false_then_closes_with_1012(
    stack: Any, api: httpx.AsyncClient
) -> None:
    created = await api.post(
        "/api/sessions",
        json={
            "experiment": "decisions",
            "num_participants": 2,
            "group_size": 2,
            "period_length": 30,
        },
    )
    assert created.status_code == 201, created.text
    code = created.json()["participants"][0]["code"]
    env = {"CANOPY_DRAIN_SECONDS": str(DRAIN)}
    async with (
        extra_service(stack, "gateway", env) as gateway,
        websockets.connect(ws_url(gateway.url, code)) as ws,
        httpx.AsyncClient(base_url=gateway.url, timeout=2.0) as client,
    ):
        hello = await asyncio.wait_for(ws.recv(), 10)
        assert '"hello"' in str(hello)
        gateway.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(DRAIN):  # before the drain is over ...
            while True:
                ready = await client.get("/readyz")
                if ready.status_code != 200:
                    break
                await asyncio.sleep(0.05)  # the signal lands between two requests
        assert ready.status_code == 503
        assert any("draining" in p for p in ready.json()["problems"])
        assert gateway.process.poll() is None  # ... it still serves the open socket
        with pytest.raises(websockets.ConnectionClosed) as closed:
            async with asyncio.timeout(DRAIN + 10):
                while True:
                    await ws.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
        await asyncio.wait_for(asyncio.to_thread(gateway.process.wait), 15)
