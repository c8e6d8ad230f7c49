"""Fleets of bots: the library API that the CLI, the researcher console and tests call.

Owns choosing which participants bots play (`open_slots`: the ones not connected, from the
researchers' API), starting one `Bot` per link with the session's strategy, and the fleet's
life and counts. Bots speak only the public contract: participant links and the participants'
WebSocket (PROTOCOL.md), and `GET /api/sessions/{id}` to find the open slots.

    fleet = await start_bots(links, experiment="bimatrix", params={}, strategy="best_response")
    fleet.stats()    # {code: {"sent": n, "acked": n, "errors": n}}
    await fleet.stop()
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from services.bots.client import Bot
from services.bots.strategies import make_strategy
from services.common.experiments import Registry

API_TIMEOUT = 10.0


class BotsError(RuntimeError):
    """The session cannot be given bots (no such session, no open slot, a bad request)."""


@dataclass
class BotFleet:
    """Running bots. `stop()` ends them; `stats()` counts each one's frames."""

    bots: list[Bot]
    experiment: str
    strategy: str
    rate: float
    note: str = ""  # the strategy's warning (a plug-in's guessed range), for whoever started it
    _stopped: bool = field(default=False, repr=False)

    def stats(self) -> dict[str, dict[str, int]]:
        """Per bot (by participant code): new frames sent, acknowledged by the gateway, and
        `error` frames received (refused by the gateway or the experiment)."""
        return {
            bot.name: {"sent": bot.sent, "acked": len(bot.acked), "errors": len(bot.errors)}
            for bot in self.bots
        }

    def totals(self) -> dict[str, int]:
        totals = {"sent": 0, "acked": 0, "errors": 0}
        for counts in self.stats().values():
            for key, value in counts.items():
                totals[key] += value
        return totals

    @property
    def codes(self) -> list[str]:
        return [bot.code for bot in self.bots]

    def connected(self) -> int:
        return sum(1 for bot in self.bots if bot.connected)

    def finished(self) -> int:
        return sum(1 for bot in self.bots if bot.finished)

    async def wait_connected(self, timeout: float = 10.0) -> None:
        """Until every bot has its hello (raises TimeoutError naming the first that has not)."""
        async with asyncio.timeout(timeout):
            for bot in self.bots:
                await bot.wait_for("hello", lambda b=bot: b.connected or b.finished, timeout)

    async def wait_finished(self, timeout: float | None = None) -> None:
        """Until every bot is done (its last period ended, or it gave up its slot)."""
        await asyncio.wait_for(
            asyncio.gather(*(bot.wait_ended(None) for bot in self.bots)), timeout
        )

    async def stop(self) -> None:
        """Close every bot's socket (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        await asyncio.gather(*(bot.stop() for bot in self.bots))


async def start_bots(
    links: list[str],
    *,
    experiment: str,
    params: dict[str, Any],
    strategy: str = "default",
    rate: float = 1.0,
    options: Mapping[str, Any] | None = None,
    num_periods: int | None = None,
    seed: int | None = None,
    codes: list[str] | None = None,
    registry: Registry | None = None,
) -> BotFleet:
    """One bot per participant link (`http://host:port/p/<key>`), each playing `strategy`
    for `experiment` with the session's `params` at `rate` turns per second while its period
    runs; they connect in the background (`fleet.wait_connected()` waits for them).

    `options`: the strategy's own (`value`, `cost`, `low`, `high`: services.bots.strategies);
    `num_periods`: stop playing after that period ended; `seed`: reproducible moves; `codes`:
    the participants' public codes, link by link (else each bot learns its own from `hello`);
    `registry`: where `experiment` is found (`make_strategy`: the process's default when not
    given, for scripts). Raises StrategyError for a strategy that does not fit, ValueError for
    a link that is not one."""
    if not rate >= 0:
        raise ValueError(f"rate must be a number ≥ 0 (turns per second), not {rate!r}")
    chosen = make_strategy(experiment, strategy, params, options, registry=registry)
    master = random.Random(seed)
    if codes is not None and len(codes) != len(links):
        raise ValueError("give one code per link")
    bots = [
        Bot(
            link,
            strategy=chosen,
            rate=rate,
            num_periods=num_periods,
            rng=random.Random(master.getrandbits(64)),
            code=codes[index] if codes is not None else "",
        )
        for index, link in enumerate(links)
    ]
    for bot in bots:
        bot.start()
    note = str(getattr(chosen, "note", ""))
    return BotFleet(bots, experiment=experiment, strategy=strategy, rate=rate, note=note)


def open_slots(
    session: Mapping[str, Any], *, count: int | None = None, all_but: int | None = None
) -> list[dict[str, Any]]:
    """The participants of a session detail (`GET /api/sessions/{id}`) that bots may take:
    those not connected, in group order then `id_in_group`. `all_but`: leave that many open
    slots (the first ones, for people); `count`: take at most that many."""
    if count is not None and all_but is not None:
        raise BotsError("give count or all_but, not both")
    order = {g["group"]: i for i, g in enumerate(session.get("groups", []))}
    free = sorted(
        (p for p in session["participants"] if not p.get("connected")),
        key=lambda p: (order.get(p["group"], len(order)), p["id_in_group"]),
    )
    if all_but is not None:
        if all_but < 0:
            raise BotsError(f"all_but must be ≥ 0, not {all_but}")
        free = free[all_but:]
    if count is not None:
        if count < 0:
            raise BotsError(f"count must be ≥ 0, not {count}")
        free = free[:count]
    return free


async def fetch_session(api_url: str, token: str, session_id: str) -> dict[str, Any]:
    """`GET /api/sessions/{id}`, or BotsError with the API's own message."""
    async with httpx.AsyncClient(
        base_url=api_url, headers={"Authorization": f"Bearer {token}"}, timeout=API_TIMEOUT
    ) as client:
        try:
            response = await client.get(f"/api/sessions/{session_id}")
        except httpx.HTTPError as exc:
            raise BotsError(f"cannot reach the researchers' API at {api_url}: {exc}") from exc
    if response.status_code != 200:
        raise BotsError(f"GET /api/sessions/{session_id}: {_api_message(response)}")
    detail: dict[str, Any] = response.json()
    return detail


async def fill_session(
    api_url: str,
    token: str,
    session_id: str,
    *,
    count: int | None = None,
    all_but: int | None = None,
    strategy: str = "default",
    rate: float = 1.0,
    options: Mapping[str, Any] | None = None,
    seed: int | None = None,
    registry: Registry | None = None,
) -> BotFleet:
    """Bots in the open slots of a session (see `open_slots`), each playing until the
    session's last period ended for its group; `registry` as for `start_bots`."""
    session = await fetch_session(api_url, token, session_id)
    slots = open_slots(session, count=count, all_but=all_but)
    if not slots:
        raise BotsError(f"session {session_id}: no open slot (every participant is connected)")
    return await start_bots(
        [p["url"] for p in slots],
        codes=[p["code"] for p in slots],
        experiment=session["experiment"],
        params=dict(session.get("params") or {}),
        strategy=strategy,
        rate=rate,
        options=options,
        num_periods=int(session.get("num_periods") or 1),
        seed=seed,
        registry=registry,
    )


def _api_message(response: httpx.Response) -> str:
    try:
        error = response.json()["error"]
        return f"{response.status_code} {error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"{response.status_code} {response.text[:300]}"
