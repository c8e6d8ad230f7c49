"""`Routes`: which gateway's queue gets a group's frames out, learnt from the inputs."""

from __future__ import annotations

from services.common.messages import Envelope, MessageType
from services.decisions.routes import Routes


def presence(participant: str, connection: str, gateway: str, *, connected: bool) -> Envelope:
    return Envelope(
        type=MessageType.PRESENCE_CHANGED,
        session="s",
        group="g",
        participant=participant,
        connection=connection,
        gateway=gateway,
        payload={"connected": connected},
    )


def frame(participant: str, connection: str, gateway: str) -> Envelope:
    return Envelope(
        type=MessageType.FRAME_ACCEPTED,
        session="s",
        group="g",
        participant=participant,
        seq=1,
        channel="decisions",
        connection=connection,
        gateway=gateway,
        payload=1,
    )


def test_a_group_is_sent_to_every_gateway_holding_a_member() -> None:
    routes = Routes()
    routes.learn(presence("a", "c1", "gw1", connected=True))
    routes.learn(presence("b", "c2", "gw2", connected=True))
    routes.learn(presence("c", "c3", "gw1", connected=True))
    assert routes.group("g") == {"gw1", "gw2"}
    assert routes.member("g", "b") == "gw2"
    routes.learn(presence("b", "c2", "gw2", connected=False))
    assert routes.group("g") == {"gw1"}
    assert routes.member("g", "b") is None
    assert routes.group("other") == set()


def test_a_replaced_connection_stays_reachable_for_its_notice() -> None:
    routes = Routes()
    routes.learn(presence("a", "old", "gw1", connected=True))
    routes.learn(presence("a", "new", "gw2", connected=True))
    assert routes.member("g", "a") == "gw2"
    assert routes.member("g", "a", "new") == "gw2"
    assert routes.member("g", "a", "old") == "gw1"  # where `replaced` must go
    assert routes.group("g") == {"gw2"}
    routes.learn(presence("a", "old", "gw1", connected=False))  # the old one closed
    assert routes.member("g", "a", "old") is None
    assert routes.member("g", "a") == "gw2"


def test_frames_fill_in_unknown_members_but_never_override_presence() -> None:
    routes = Routes()
    routes.learn(frame("a", "c1", "gw1"))  # e.g. this worker restarted: no presence seen
    assert routes.member("g", "a") == "gw1"
    routes.learn(presence("a", "c2", "gw2", connected=True))
    routes.learn(frame("a", "c1", "gw1"))  # a late frame of the replaced connection
    assert routes.member("g", "a") == "gw2"


def test_inputs_without_a_gateway_teach_nothing() -> None:
    routes = Routes()
    timer = Envelope(type=MessageType.TIMER_FIRED, session="s", group="g", payload={})
    routes.learn(timer)
    assert routes.group("g") == set()
