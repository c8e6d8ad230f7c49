"""The ports of the workers: what `DecisionsWorker` (and its log writer and batchers) and
`TimersWorker` need of the bus, and what decisions needs of the store's directory, as
`Protocol`s.

`services.common.bus.Bus` and `services.common.directory.Directory` are the production
adapters; the unit tests hand in the in-memory bus (tests/memory_bus.py), which keeps the
delivery semantics the workers rely on (order per queue, confirms, ack / nack / redelivery),
and fakes of the directory, so that a worker runs a group's whole life with no broker and no
store. A port names only what its users call: a method added to one is a method every fake
must learn, which is the point.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from services.common.bus import Topology
    from services.common.directory import GroupConfig
    from services.common.lobby import LobbyConfig
    from services.common.messages import Envelope, LogBatch


class Publisher(Protocol):
    """Publishing with confirms (RabbitMQ's publisher confirms in production): each call
    returns once the broker holds the message, and raises if it refused it."""

    @property
    def is_connected(self) -> bool: ...

    @property
    def blocked(self) -> bool:
        """RabbitMQ blocks the connection (a resource alarm): nothing is confirmed meanwhile."""

    async def publish(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope | LogBatch,
        *,
        mandatory: bool = True,
    ) -> None:
        """Once, confirmed; raises if unroutable (mandatory) or refused."""

    async def publish_reliably(
        self,
        exchange: str,
        routing_key: str,
        envelope: Envelope | LogBatch,
        *,
        mandatory: bool = True,
    ) -> None:
        """Until confirmed, riding out a lost connection; raises only if unroutable."""

    async def publish_batch(
        self,
        exchange: str,
        routing_key: str,
        envelopes: Sequence[Envelope],
        *,
        mandatory: bool = True,
        reliable: bool = False,
        encoded: Sequence[bytes] | None = None,
    ) -> None:
        """Envelopes as one message (a JSON array), in their order."""


class RoutingPublisher(Publisher, Protocol):
    """A publisher that also says the topology, for those who route inputs to a shard
    (`bus.input_key` needs the number of shards): the timers."""

    @property
    def topology(self) -> Topology: ...


class GroupDirectory(Protocol):
    """What decisions asks the store (its internal HTTP API in production): a group's and a
    lobby's configuration and log, whether a log barrier was written, and forming a group."""

    async def group(self, group: str) -> GroupConfig:
        """Raises `directory.NotFound` for a group the store does not know."""

    async def group_fresh(self, group: str) -> GroupConfig:
        """The same, read again now (labels given since)."""

    def forget_group(self, group: str) -> None:
        """Drop what is cached of a group whose state went."""

    async def group_log(self, group: str) -> list[dict[str, Any]]:
        """The group's log rows, in the group's order."""

    async def lobby(self, session: str) -> LobbyConfig: ...

    async def lobby_log(self, session: str) -> list[dict[str, Any]]: ...

    async def form_group(
        self, session: str, group: str, members: list[str], bots: int = 0
    ) -> tuple[list[str], list[str]]:
        """The group's members and the seats bots play, as the store formed it (once)."""

    async def barrier_passed(self, barrier: str) -> bool:
        """Whether the store wrote the log batch holding `barrier`."""
