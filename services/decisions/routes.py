"""Which gateway holds which member's connection: where decisions sends a group's frames.

Broadcasts go straight to the queues of the gateways that hold the group's members, so the
worker must know them; it learns them from the inputs themselves (every frame and presence
input names its connection and gateway), with nothing to ask and nothing to store: after a
restart, the `Resync` the gateways answer fills them in again (services.decisions.moves).
"""

from __future__ import annotations

from collections import OrderedDict

from services.common.messages import Envelope, MessageType, PresenceChanged

RETIRED_CONNECTIONS = 10_000


class Routes:
    """Which gateway holds which member's connection, learnt from the inputs themselves.

    A `PresenceChanged` (connected) names the member's newest connection; a frame fills in a
    member not known yet (e.g. after this worker restarted). A replaced connection's gateway is
    remembered a while longer, for the `replaced` notice that closes it.
    """

    def __init__(self) -> None:
        self._members: dict[str, dict[str, tuple[str, str]]] = {}  # group → code → (conn, gw)
        self._retired: OrderedDict[str, str] = OrderedDict()  # connection → gateway

    def learn(self, envelope: Envelope) -> None:
        participant, connection, gateway = (
            envelope.participant,
            envelope.connection,
            envelope.gateway,
        )
        if participant is None or connection is None or gateway is None:
            return
        members = self._members.setdefault(envelope.group, {})
        current = members.get(participant)
        if envelope.type is MessageType.PRESENCE_CHANGED:
            if PresenceChanged.of(envelope).connected:
                if current is not None and current[0] != connection:
                    self._retire(*current)
                members[participant] = (connection, gateway)
            elif current is not None and current[0] == connection:
                del members[participant]
            else:  # a replaced connection closed
                self._retired.pop(connection, None)
        elif current is None:
            members[participant] = (connection, gateway)

    def drop_gateway(self, gateway: str) -> list[tuple[str, str, str]]:
        """Forget every member held by `gateway`; their (group, participant, connection)."""
        gone = []
        for group, members in self._members.items():
            for participant, (connection, held_by) in list(members.items()):
                if held_by == gateway:
                    del members[participant]
                    gone.append((group, participant, connection))
        return gone

    def forget(self, group: str) -> None:
        self._members.pop(group, None)

    def gateways(self) -> set[str]:
        return {gw for members in self._members.values() for _, gw in members.values()}

    def group(self, group: str) -> set[str]:
        return {gateway for _, gateway in self._members.get(group, {}).values()}

    def member(self, group: str, participant: str, connection: str | None = None) -> str | None:
        current = self._members.get(group, {}).get(participant)
        if current is not None and (connection is None or current[0] == connection):
            return current[1]
        return self._retired.get(connection) if connection is not None else None

    def _retire(self, connection: str, gateway: str) -> None:
        self._retired[connection] = gateway
        if len(self._retired) > RETIRED_CONNECTIONS:
            self._retired.popitem(last=False)
