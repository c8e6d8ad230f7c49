"""The log barrier: waiting until the store wrote everything sent to the event log before now.

A barrier is an empty `LogBatch` carrying a fresh id. It goes through the log queue behind
every batch published before it, and the store records its id once the batch holding it was
written to MongoDB (services.store.handlers), so once the id is recorded, everything sent to
the event log before it is in MongoDB too. A decisions worker waits for one at start-up and
before it evicts a group (services.decisions.moves), the store's live monitor before it
reads a session's snapshot (services.store.monitor).

The wait is written once here; who publishes (with or without confirms) and how the id is
looked up (the store's HTTP API, or MongoDB directly) are the caller's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.common.messages import LogBatch, new_id

log = logging.getLogger(__name__)


async def wait_for_barrier(
    publish: Callable[[LogBatch], Awaitable[None]],
    passed: Callable[[str], Awaitable[bool]],
    *,
    poll: float,
    resend_after: float | None,
    give_up_after: float | None = None,
    tolerate: tuple[type[Exception], ...] = (),
) -> bool:
    """Publish a barrier and poll `passed(id)` every `poll` seconds until it is recorded; True
    then, False if `give_up_after` seconds passed first.

    A barrier not recorded within `resend_after` seconds is sent again with a new id (the first
    may have gone with a broker connection); None: never. `give_up_after` counts from the first
    publish and also ends a `passed` call under way; None: wait for as long as it takes. Errors
    of `passed` in `tolerate` (the store unreachable for a moment) are logged and polled
    through; other errors propagate, as do those of `publish`.
    """
    loop = asyncio.get_running_loop()
    give_up_at: float | None = None
    while True:
        barrier = new_id()
        await publish(LogBatch(records=[], barrier=barrier))
        if give_up_at is None and give_up_after is not None:
            give_up_at = loop.time() + give_up_after
        resend_at = None if resend_after is None else loop.time() + resend_after
        deadline = asyncio.timeout_at(give_up_at)
        try:
            async with deadline:
                while resend_at is None or loop.time() < resend_at:
                    try:
                        if await passed(barrier):
                            return True
                    except tolerate as exc:
                        log.warning("store unreachable while waiting for the log (%s)", exc)
                    await asyncio.sleep(poll)  # barriers are rows in MongoDB: nothing to await
        except TimeoutError:
            if not deadline.expired():
                raise  # a timeout of `passed` itself, not the caller's patience
            return False
        log.warning("log barrier not written after %.0f s; sending another", resend_after)
