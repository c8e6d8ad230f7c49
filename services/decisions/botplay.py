"""Bots that play a seat inside the decisions worker (PROTOCOL v2 "Online studies").

Under `on_disconnect: bots` a member away for `dropout_grace` seconds is played by a bot until
they come back; under `on_lobby_timeout: bots` the lobby fills a group's empty places with free
seats that bots play from the start. Either way the seat's bot runs here, beside the group's
state, rather than as a WebSocket client somewhere: the worker that owns the group already
knows everything a bot looks at, a bot needs no credential and no connection that could fail
on its own, and it moves with the group when a shard moves or a worker restarts.

A bot plays with the same strategies as `canopy bots` (services.bots.strategies: `default`,
i.e. a random walk over the decision's range, or zero intelligence in the auction), one turn
per second while a period runs, each turn at a random moment of its second. Its inputs are
applied through `GroupState.on_bot_input` and logged as `in` rows of that member without a
`seq`, so the export tells them from the person's (and the `presence` row with `"bot": true`
says since when a bot plays); a rebuild folds them like any row. A turn that changes nothing
(the strategy sends nothing, or the experiment refuses it) costs nothing but the row.

Which members a bot plays is the group's state (`GroupState.bots`), rebuilt from the log; the
grace timers are not logged, so a rebuilt group asks for them again from `away_since`.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from services.bots.strategies import Strategy, StrategyError, View, make_strategy
from services.common.group import GroupState
from services.common.logs import context

log = logging.getLogger(__name__)

TURN_SECONDS = 1.0  # a bot's pace: one strategy turn per second while a period runs

# Applies one bot input to a group (the worker's `_apply_bot`): state, member, channel, payload.
Apply = Callable[[GroupState, str, str, Any], Awaitable[None]]
Held = Callable[[str], object]


class BotPlayer:
    """One task per group that has bots, taking turns for each of its bots."""

    def __init__(self, apply: Apply, held: Held, *, turn_seconds: float = TURN_SECONDS) -> None:
        self._apply = apply
        self._held = held  # the state the worker holds for a group now (None: not held)
        self._turn = turn_seconds
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._strategies: dict[tuple[str, str], Strategy | None] = {}

    def ensure(self, state: GroupState) -> None:
        """Play the group's bots, if it has any and nobody plays them yet."""
        group = state.config.group
        if not state.bots or group in self._tasks:
            return
        task = asyncio.get_running_loop().create_task(self._play(state))
        self._tasks[group] = task
        task.add_done_callback(lambda _: self._tasks.pop(group, None))

    def stop(self, group: str) -> None:
        """Stop playing a group's bots (the worker dropped the group)."""
        for key in [k for k in self._strategies if k[0] == group]:
            del self._strategies[key]
        task = self._tasks.pop(group, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _play(self, state: GroupState) -> None:
        group = state.config.group
        rng = random.Random(group)  # reproducible per group, not across groups
        while self._held(group) is state and state.bots and not _over(state):
            await asyncio.sleep(self._turn * (0.5 + rng.random()))
            if self._held(group) is not state or state.state != "running":
                continue
            for code in sorted(state.bots):
                strategy = self._strategy(state, code)
                if strategy is None:
                    continue  # holds the seat without moving (said once in the log)
                try:
                    actions = strategy.act(self._view(state, code), rng)
                except Exception:
                    where = context(state.config.session, group)
                    log.exception("a bot's strategy failed", extra=where)
                    continue
                for channel, payload in actions:
                    try:
                        await self._apply(state, code, channel, payload)
                    except Exception:
                        # The bus is reconnecting: this turn is lost, the next one comes.
                        log.warning("a bot's input could not be applied", exc_info=True)

    def _strategy(self, state: GroupState, code: str) -> Strategy | None:
        key = (state.config.group, code)
        if key not in self._strategies:
            config = state.config
            try:
                # The group's own experiment (the worker's registry's): no look-up by name.
                self._strategies[key] = make_strategy(state.experiment, "default", state.params)
            except StrategyError as exc:
                log.warning(
                    "bots cannot play %s (%s): its seats are held without moves",
                    config.experiment,
                    exc,
                    extra=context(config.session, config.group),
                )
                self._strategies[key] = None
        return self._strategies[key]

    @staticmethod
    def _view(state: GroupState, code: str) -> View:
        config = state.config
        extra = state.hello_extra()
        book = extra.get("book") if isinstance(extra, dict) else None
        return View(
            code=code,
            id_in_group=config.id_in_group(code),
            members=tuple(config.members),
            decisions=dict(state.decisions),
            book=book,
        )


def _over(state: GroupState) -> bool:
    return state.state == "ended" and state.period == state.config.num_periods
