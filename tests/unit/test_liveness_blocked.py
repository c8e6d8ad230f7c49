"""A gateway is not taken for dead while RabbitMQ blocks publishers (issue 23, "Backpressure").

During a memory or disk alarm a gateway cannot publish its heartbeats, so a worker that went on
counting the silence disconnected every member of every gateway after `liveness_timeout`
(3 s), although their sockets stayed open: in tests/faults/test_backpressure.py all 28
members were logged as disconnected, for the rest of the period. While the worker's own
connection is blocked, silence is not counted (as while the broker is away), and counts
from the alarm's end. The in-memory bus (tests/memory_bus.py) stands in for the broker.
"""

from __future__ import annotations

from services.common.messages import Envelope, MessageType, PresenceChanged
from services.decisions.liveness import Liveness
from services.decisions.metrics import DecisionsMetrics
from services.decisions.routes import Routes
from tests.memory_bus import MemoryBus

TIMEOUT = 3.0  # liveness_timeout, s (the default; nothing waits for it: the clock is stepped)


class Clock:
    """The watch's clock, stepped by the test instead of waited for."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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


def watched(bus: MemoryBus, disconnected: list[str]) -> tuple[Liveness, Routes, Clock]:
    routes = Routes()
    routes.learn(connected("a"))
    clock = Clock()

    async def disconnect(group: str, participant: str, connection: str) -> None:
        disconnected.append(participant)

    liveness = Liveness(
        bus,
        routes,
        DecisionsMetrics(),
        disconnect,
        resync_window=1.0,
        liveness_timeout=TIMEOUT,
        clock=clock,
    )
    liveness.start()
    return liveness, routes, clock


async def test_silence_is_not_counted_while_the_broker_blocks_publishers() -> None:
    bus = MemoryBus(blocked=True)
    disconnected: list[str] = []
    liveness, _, clock = watched(bus, disconnected)
    # Four timeouts of silence, looked at twenty times, all while blocked: the watch would
    # have disconnected the member after the first timeout.
    for _ in range(20):
        clock.now += TIMEOUT / 5
        await liveness.look()
    assert disconnected == [], "members of a gateway that could not send disconnected"
    # The alarm clears and the gateway stays silent: gone a timeout after the alarm's end,
    # not before.
    bus.blocked = False
    await liveness.look()
    clock.now += TIMEOUT * 0.9
    await liveness.look()
    assert disconnected == []
    clock.now += TIMEOUT * 0.2
    await liveness.look()
    assert disconnected == ["a"]


async def test_a_gateway_that_announces_its_members_again_is_not_dropped_again_at_once() -> None:
    """A gateway dropped for its silence (away from the broker for longer than the timeout)
    announces its open connections again once it is back, possibly before its next heartbeat.
    Its silence counts again from then: before, the next look found no heartbeat since the
    worker started and disconnected those members at once, for good (the period of
    tests/e2e/test_gateway_reconnect.py then never started, in about half of its runs)."""
    disconnected: list[str] = []
    liveness, routes, clock = watched(MemoryBus(), disconnected)
    await liveness.check()  # first look: the silence counts from here
    clock.now += 2 * TIMEOUT  # a span of silence longer than the timeout
    await liveness.check()
    assert disconnected == ["a"]
    routes.learn(connected("a"))  # back: its member announced again, no heartbeat yet
    await liveness.check()
    assert disconnected == ["a"], "dropped again for the silence already counted"
    clock.now += 2 * TIMEOUT  # silent again for longer than the timeout
    await liveness.check()
    assert disconnected == ["a", "a"]
