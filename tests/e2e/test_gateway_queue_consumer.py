"""The gateway consumes its own queue with a finite prefetch and acks (issue 23,
"Backpressure"), read from the broker itself (`rabbitmqctl list_consumers`). Before, it
consumed with automatic acks and no prefetch: the broker pushed it whatever the queue held, a
backlog after a block or a slow gateway included. (The rest of the backpressure behaviour:
tests/faults/test_backpressure.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.gateway.settings import GatewaySettings

pytestmark = pytest.mark.e2e


async def test_the_gateway_queue_has_a_finite_prefetch_with_acks(
    stack: Any, infra_handle: Any
) -> None:
    columns = ("queue_name", "ack_required", "prefetch_count")
    result = await asyncio.to_thread(infra_handle.rabbitmqctl, "list_consumers", "-q", *columns)
    assert result.returncode == 0, result.stdout
    consumers = [
        line.split("\t")
        for line in result.stdout.splitlines()
        if line.startswith("canopy.gateway.")
    ]
    assert consumers, result.stdout
    for _, ack_required, prefetch in consumers:
        assert ack_required == "true", "automatic acks: the prefetch would not apply"
        assert int(prefetch) > 0, "no prefetch: the broker sends whatever the queue holds"
        assert int(prefetch) == GatewaySettings.model_fields["gateway_prefetch"].default
