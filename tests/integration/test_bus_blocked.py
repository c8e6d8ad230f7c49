"""`Bus.blocked` against a real RabbitMQ node: a memory alarm (a watermark far below what the
node uses) blocks a connection at its next publish, and clearing it unblocks it (issue 23,
"Backpressure"). The alarm is the session node's, so it is always cleared before the test
ends; each test has a vhost of its own, as in test_bus.py."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

from services.common.bus import LIVENESS, Bus, Topology
from services.common.messages import Envelope, MessageType

pytestmark = [pytest.mark.integration]

# The node's default: a fraction of the machine's memory (rabbitmq.conf sets none).
DEFAULT_WATERMARK = "0.4"
WAIT = 20.0


@pytest.fixture
async def vhost_url(infra_handle: Any) -> AsyncIterator[str]:
    name = f"test-{secrets.token_hex(4)}"
    infra_handle.rabbitmqctl("add_vhost", name)
    user = infra_handle.broker_user
    infra_handle.rabbitmqctl("set_permissions", "-p", name, user, ".*", ".*", ".*")
    yield infra_handle.infra.amqp_url.rstrip("/") + "/" + name
    infra_handle.rabbitmqctl("delete_vhost", name)


@pytest.fixture
def alarm(infra_handle: Any) -> Iterator[Callable[[bool], None]]:
    """`alarm(True)` raises the node's memory alarm, `alarm(False)` clears it (and so does
    the end of the test, whatever happened)."""

    def set_alarm(on: bool) -> None:
        watermark = "0.0001" if on else DEFAULT_WATERMARK
        result = infra_handle.rabbitmqctl("set_vm_memory_high_watermark", watermark)
        assert result.returncode == 0, result.stdout

    try:
        yield set_alarm
    finally:
        set_alarm(False)


async def until(condition: Callable[[], bool], timeout: float = WAIT) -> None:
    """Polls a flag that the connection's reader sets when the broker's frame arrives."""
    async with asyncio.timeout(timeout):
        while True:
            if condition():
                return
            await asyncio.sleep(0.02)


def heartbeat() -> Envelope:
    return Envelope(type=MessageType.GATEWAY_ALIVE, session="", group="", gateway="test")


async def test_a_memory_alarm_blocks_the_bus_and_its_end_unblocks_it(
    vhost_url: str, alarm: Callable[[bool], None]
) -> None:
    bus = Bus(vhost_url, Topology(1, "classic"), name="blocked test")
    await bus.connect()
    try:
        assert not bus.blocked
        alarm(True)
        # The broker blocks a connection when it publishes during the alarm; the publish is
        # not confirmed until the alarm clears.
        publish = asyncio.create_task(bus.publish(LIVENESS, "", heartbeat(), mandatory=False))
        await until(lambda: bus.blocked)
        assert bus.blocked_reason is not None and "memory" in bus.blocked_reason
        assert not publish.done()
        alarm(False)
        await until(lambda: not bus.blocked)
        async with asyncio.timeout(WAIT):
            await publish  # confirmed once the broker reads the connection again
        assert bus.blocked_reason is None
    finally:
        await bus.close()
