"""Retrying an action until it succeeds, with capped exponential backoff.

For what must happen eventually and is safe to repeat: publishing with confirms while the
broker reconnects (bus), a tick or its record while RabbitMQ or MongoDB is away (timers), a
batch of the event log while MongoDB is away (store). The action's result is returned, so a
read that must wait for a service to come back (decisions asking the store for a group) can be
retried here too instead of with a backoff of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


async def retry_forever(
    action: Callable[[], Awaitable[T]],
    what: str,
    *,
    retry_on: tuple[type[Exception], ...] = (Exception,),
    give_up_on: tuple[type[Exception], ...] = (),
    first_delay: float = 0.05,
    max_delay: float = 2.0,
    on_retry: Callable[[Exception], None] | None = None,
) -> T:
    """Await `action()` until it returns, and return its result. Errors in `give_up_on` are
    raised at once (retrying cannot help); errors in `retry_on` are logged and retried after
    `first_delay`, twice that … `max_delay` s."""
    delay = first_delay
    while True:
        try:
            return await action()
        except give_up_on:
            raise
        except retry_on as exc:
            log.warning("%s failed (%r); retrying in %.2f s", what, exc, delay)
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, max_delay)
