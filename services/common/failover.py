"""A robust AMQP connection that knows every node of a RabbitMQ cluster.

`CANOPY_AMQP_URL` may list several URLs separated by commas (one per cluster node). Each
connection attempt goes to the next node in turn, starting from a random one so that clients
spread over the cluster; when the node a client is on dies, its next attempt goes to another.
In Kubernetes one URL (the cluster's Service) is enough: there the Service does this.

aio-pika's `RobustConnection` reconnects to the one URL it was given; this subclass only changes
which URL each attempt uses. It overrides the private `__connect_transport` step of aio-pika
10.2 (pinned in pyproject.toml; tests/cluster/test_cluster.py proves the behaviour).
"""

from __future__ import annotations

import random
from typing import Any

from aio_pika import RobustConnection
from yarl import URL


def amqp_urls(setting: str) -> list[str]:
    """The URLs of a `CANOPY_AMQP_URL` setting (one, or several separated by commas)."""
    urls = [url.strip() for url in setting.split(",") if url.strip()]
    if not urls:
        raise ValueError("no AMQP URL given")
    return urls


_CONNECT_TRANSPORT = "_RobustConnection__connect_transport"


def failover_connection_class(urls: list[str]) -> type[RobustConnection]:
    """A `RobustConnection` class whose attempts go round `urls` (for `connection_class`)."""
    nodes = [URL(url) for url in urls]

    class FailoverConnection(RobustConnection):
        _next = random.randrange(len(nodes))

        async def _RobustConnection__connect_transport(self) -> None:
            self.url = nodes[self._next % len(nodes)]
            self._next += 1
            connect: Any = getattr(RobustConnection, _CONNECT_TRANSPORT)
            await connect(self)

    if not hasattr(RobustConnection, _CONNECT_TRANSPORT):  # aio-pika changed its internals
        raise RuntimeError("this aio-pika cannot fail over between nodes: pin 10.2")
    return FailoverConnection
