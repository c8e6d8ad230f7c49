"""Broker messages per decision, from RabbitMQ's own global counters.

RabbitMQ (3.9+) keeps node-wide counters of what crossed it: messages received from
publishers (and how many of them asked for a confirm), routed to queues, confirmed, delivered
to consumers, acknowledged by them. The `rabbitmq_prometheus` plugin serves them at
`/metrics` (`rabbitmq_global_messages_*_total`, one series per protocol / queue type, summed
here). The benchmark's own stack enables that plugin (no management UI, no stats database)
and scrapes it at the start and the end of the measured window; the difference divided by the
decisions sent in the window is what the broker did per decision. Without the plugin (a stack
started elsewhere, or the test session's infra) the counts are not measured (None).

The counters are the whole node's: heartbeats are not messages, but timer ticks, presence and
the decisions service's log batches to the store are, and belong to the cost of a decision.
"""

from __future__ import annotations

from collections.abc import Mapping

import httpx
from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT = 5.0
# Our name → the counter family (without `_total`, as the parser names counters).
COUNTERS = {
    "received": "rabbitmq_global_messages_received",
    "received_confirm": "rabbitmq_global_messages_received_confirm",
    "routed": "rabbitmq_global_messages_routed",
    "confirmed": "rabbitmq_global_messages_confirmed",
    "delivered": "rabbitmq_global_messages_delivered",
    "acknowledged": "rabbitmq_global_messages_acknowledged",
}


def parse_counters(text: str) -> dict[str, float]:
    """The global message counters in a Prometheus text page, each summed over its labels."""
    wanted = {family: name for name, family in COUNTERS.items()}
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        name = wanted.get(family.name)
        if name is None:
            continue
        found[name] = sum(s.value for s in family.samples if s.name.endswith("_total"))
    return found


async def scrape_broker(url: str | None) -> dict[str, float] | None:
    """The counters now, or None when there is no URL or the scrape fails (not measured)."""
    if url is None:
        return None
    try:
        async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT) as client:
            response = await client.get(url)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return parse_counters(response.text) or None


def broker_per_decision(
    start: Mapping[str, float] | None, end: Mapping[str, float] | None, decisions: int
) -> dict[str, float] | None:
    """Per counter: (end - start) / decisions, rounded; None when not measured."""
    if start is None or end is None or decisions <= 0:
        return None
    return {
        name: round((end[name] - start[name]) / decisions, 2)
        for name in COUNTERS
        if name in start and name in end
    }
