"""Which gateways are alive, and the window in which gateways announce their members again.

Gateways send a heartbeat each second (`GatewayAlive`, on this worker's own liveness queue);
the members of a gateway silent for `liveness_timeout` are disconnected (their presence turns
false), by the worker, one member at a time, as inputs of their groups. While the broker is
away, or blocks this worker's connection (a memory or disk alarm blocks the gateways'
heartbeats too), no heartbeat can arrive, so silence counts from its return.

After this worker took shards over it asks the gateways to announce their open connections
again (`Resync`, services.decisions.moves); a member a rebuilt group holds for connected
(`UNKNOWN`) whom nobody announced within `resync_window` of that moment is disconnected
(`GroupState.expire_unknown`). Both clocks start when the worker's log barrier passed
(`start`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aio_pika.abc import AbstractIncomingMessage

from services.common.messages import Envelope, MessageType
from services.common.ports import Publisher
from services.decisions.metrics import DecisionsMetrics
from services.decisions.routes import Routes

log = logging.getLogger(__name__)

# Disconnects one member of a gateway that went silent (the worker's `_disconnected`):
# group, participant, connection.
Disconnect = Callable[[str, str, str], Awaitable[None]]


def _loop_time() -> float:
    return asyncio.get_running_loop().time()


class Liveness:
    """Heartbeats heard per gateway, the watch that disconnects a silent gateway's members,
    and the resync window."""

    def __init__(
        self,
        bus: Publisher,
        routes: Routes,
        metrics: DecisionsMetrics,
        disconnect: Disconnect,
        *,
        resync_window: float,
        liveness_timeout: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        """`clock`: seconds on a monotonic clock (the event loop's when not given; tests step
        one of their own instead of waiting)."""
        self._clock = clock or _loop_time
        self._bus = bus
        self._routes = routes
        self._metrics = metrics
        self._disconnect = disconnect
        self._resync_window = resync_window
        self._liveness_timeout = liveness_timeout
        self._heard: dict[str, float] = {}  # gateway queue → loop time of its last heartbeat
        self._started = 0.0

    def start(self) -> None:
        """The resync window and heartbeat silence count from now."""
        self._started = self._clock()

    def after_resync(self, callback: Callable[[], object]) -> None:
        """Call `callback` once the resync window is over (at once if it is)."""
        wait = max(0.0, self._started + self._resync_window - self._clock())
        asyncio.get_running_loop().call_later(wait, callback)

    async def on_heartbeat(self, message: AbstractIncomingMessage) -> None:
        try:
            envelope = Envelope.decode(message.body)
        except ValueError:
            return
        if envelope.type is MessageType.GATEWAY_ALIVE and envelope.gateway is not None:
            self._heard[envelope.gateway] = self._clock()

    async def watch(self, every: float = 0.5) -> None:
        """Disconnect the members of gateways that stopped sending heartbeats."""
        while True:
            await asyncio.sleep(every)
            await self.look()

    async def look(self) -> None:
        """One step of the watch."""
        if not self._bus.is_connected or self._bus.blocked:
            # No heartbeat can arrive while the broker is away, nor while it blocks publishers
            # (a resource alarm: the gateways cannot publish theirs either, and this worker
            # could not publish a disconnect): count from its return.
            self._started = self._clock()
            self._heard.clear()
            return
        await self.check()

    async def check(self) -> None:
        """One look: disconnect the members of each gateway silent for `liveness_timeout`.

        Silence counts from the last heartbeat heard, or else from the first look that found
        the gateway (since this worker started, or last dropped it): a gateway whose members
        were disconnected and that then announces them again (back from its own broker
        outage) may do so before its next heartbeat, and must not be dropped again at once
        for the silence already counted (tests/e2e/test_gateway_reconnect.py was flaky so)."""
        now = self._clock()
        for gateway in self._routes.gateways():
            last = self._heard.setdefault(gateway, now)
            if now - last > self._liveness_timeout:
                await self._gateway_gone(gateway)

    async def _gateway_gone(self, gateway: str) -> None:
        gone = self._routes.drop_gateway(gateway)
        self._heard.pop(gateway, None)
        log.warning("gateway %s is silent: %d participants disconnected", gateway, len(gone))
        self._metrics.gateways_lost.inc()
        for group, participant, connection in gone:
            await self._disconnect(group, participant, connection)
