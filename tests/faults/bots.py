"""Scripted participants that behave as the JS client does when things fail.

The bots of `services.bots.client` (one implementation of the client's rules: reconnect with
backoff after every close, keep every unacknowledged frame and resend it with its seq after
each `hello`, dropping those at or below `hello.last_seq`), tuned for fault injection: a new
random decision in [0, 1] at a steady rate while the period runs, and a short backoff
(50 ms doubling to 1 s) so recovery times measure the system, not the client's patience. A
bot records what it was told, with arrival times, so a test can say what was acknowledged,
when broadcasts resumed, and when periods ended.
"""

from __future__ import annotations

import random
from typing import Any

from services.bots import client
from tests.e2e.protocol import raw_ws_url, ws_url

Received = client.Received


class _Uniform:
    """A fresh decision each turn, independent of the last (every frame is a change)."""

    def act(self, view: Any, rng: random.Random) -> list[tuple[str, Any]]:
        return [("decisions", round(rng.random(), 4))]


class Bot(client.Bot):
    """A fault-test bot on `gateway_url` for participant `code`: `rate` decisions per second
    while its period runs, until period `num_periods` ended. `key`: the seat's key as the
    study link gave it (then `code` may be empty: the bot learns it from `hello`)."""

    def __init__(
        self,
        gateway_url: str,
        code: str,
        rate: float = 10.0,
        num_periods: int = 1,
        *,
        key: str | None = None,
    ) -> None:
        super().__init__(
            raw_ws_url(gateway_url, key) if key is not None else ws_url(gateway_url, code),
            strategy=_Uniform(),
            rate=rate,
            num_periods=num_periods,
            min_delay=0.05,
            max_delay=1.0,
        )
