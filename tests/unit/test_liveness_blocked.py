"""A gateway is not taken for dead while RabbitMQ blocks publishers (issue 23, "Backpressure").

During a memory or disk alarm a gateway cannot publish its heartbeats, so a worker that went on
counting the silence disconnected every member of every gateway after `liveness_timeout`
(3 s), although their sockets stayed open: in tests/faults/test_backpressure.py all 28
members were logged as disconnected, for the rest of the period. While the worker's own
connection is blocked, silence is not counted (as while the broker is away), and counts
from the alarm's end. The in-memory bus (tests/memory_bus.py) stands in for the broker.
"""

from __future__ import annotations

import asyncio

from services.common.messages import Envelope, MessageType, PresenceChanged
from services.decisions.liveness import Liveness
from services.decisions.metrics import DecisionsMetrics
from services.decisions.routes import Routes
from tests.memory_bus import MemoryBus

TIMEOUT = 0.05  # liveness_timeout, s
EVERY = 0.01  # how often the watch looks, s


def connected(participant: str) -> Envelope:
    return Envelope[PresenceChanged](
        type=MessageType.PRESENCE_CHANGED,
        session="s",
        group="g",
        participant=participant,
        connection=f"c-{participant}",
        gateway="gw",
        payload=PresenceChanged(connected=True),
    )


async def test_silence_is_not_counted_while_the_broker_blocks_publishers() -> None:
    bus = MemoryBus(blocked=True)
    routes = Routes()
    routes.learn(connected("a"))
    disconnected: list[str] = []
    gone = asyncio.Event()

    async def disconnect(group: str, participant: str, connection: str) -> None:
        disconnected.append(participant)
        gone.set()

    liveness = Liveness(
        bus,
        routes,
        DecisionsMetrics(),
        disconnect,
        resync_window=1.0,
        liveness_timeout=TIMEOUT,
    )
    liveness.start()
    watch = asyncio.create_task(liveness.watch(every=EVERY))
    try:
        # Four timeouts of silence (about twenty looks), all while blocked: the watch would
        # have disconnected the member after the first. A span of the fault, not a wait for
        # an event: what is checked is that nothing happens in it.
        await asyncio.sleep(4 * TIMEOUT)
        assert disconnected == [], "members of a gateway that could not send disconnected"
        # The alarm clears and the gateway stays silent: now it is gone, a timeout later.
        bus.blocked = False
        await asyncio.wait_for(gone.wait(), 2)
        assert disconnected == ["a"]
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def test_a_gateway_that_announces_its_members_again_is_not_dropped_again_at_once() -> None:
    """A gateway dropped for its silence (away from the broker for longer than the timeout)
    announces its open connections again once it is back, possibly before its next heartbeat.
    Its silence counts again from then: before, the next look found no heartbeat since the
    worker started and disconnected those members at once, for good (the period of
    tests/e2e/test_gateway_reconnect.py then never started, in about half of its runs)."""
    bus = MemoryBus()
    routes = Routes()
    routes.learn(connected("a"))
    disconnected: list[str] = []

    async def disconnect(group: str, participant: str, connection: str) -> None:
        disconnected.append(participant)

    liveness = Liveness(
        bus, routes, DecisionsMetrics(), disconnect, resync_window=1.0, liveness_timeout=TIMEOUT
    )
    liveness.start()
    await liveness.check()  # first look: the silence counts from here
    await asyncio.sleep(2 * TIMEOUT)  # a span of silence longer than the timeout
    await liveness.check()
    assert disconnected == ["a"]
    routes.learn(connected("a"))  # back: its member announced again, no heartbeat yet
    await liveness.check()
    assert disconnected == ["a"], "dropped again for the silence already counted"
    await asyncio.sleep(2 * TIMEOUT)  # silent again for longer than the timeout
    await liveness.check()
    assert disconnected == ["a", "a"]
