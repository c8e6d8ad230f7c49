"""Retrying an action until it succeeds, with capped exponential backoff.

For what must happen eventually and is safe to repeat: publishing with confirms while the
broker reconnects (bus), a tick or its record while RabbitMQ or MongoDB is away (timers).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)


async def retry_forever(
    action: Callable[[], Awaitable[None]],
    what: str,
    *,
    retry_on: tuple[type[Exception], ...] = (Exception,),
    give_up_on: tuple[type[Exception], ...] = (),
    first_delay: float = 0.05,
    max_delay: float = 2.0,
    on_retry: Callable[[Exception], None] | None = None,
) -> None:
    """Await `action()` until it returns. Errors in `give_up_on` are raised at once (retrying
    cannot help); errors in `retry_on` are logged and retried after 0.05, 0.1 … `max_delay` s."""
    delay = first_delay
    while True:
        try:
            await action()
            return
        except give_up_on:
            raise
        except retry_on as exc:
            log.warning("%s failed (%r); retrying in %.2f s", what, exc, delay)
            if on_retry is not None:
                on_retry(exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, max_delay)
