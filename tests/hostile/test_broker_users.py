"""Each service's RabbitMQ user may do what the service does and nothing more.

The rules are services/common/bus/access.py (`PERMISSIONS`), written down in
docs/operations.md ("RabbitMQ users"); the topology each service declares with them is
services/common/bus/topology.py ("Who declares what"). Here, on a running stack: each
service process logs in as its own user, never the administrator; each user is refused
what another service does (consume its queues, publish where it publishes, delete what it
declared); each can still declare its own part of the topology on an empty virtual host, in
any order. That every service still does all it needs is the e2e suite, which runs with
these users (devstack.stack gives each process its own).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika
import httpx
import pytest
from aio_pika.abc import AbstractChannel
from aiormq.exceptions import ChannelAccessRefused, ChannelNotFoundEntity

from devstack.infra import start_infra
from services.common.bus import (
    COMMANDS,
    DEAD,
    GATEWAYS,
    INPUTS,
    LIVENESS,
    LOG,
    LOG_KEY,
    STORE_QUEUE,
    TIMERS_QUEUE,
    Bus,
    Topology,
    shard_queue,
)
from services.common.bus.access import (
    PERMISSIONS,
    SERVICES,
    Login,
    apply,
    login_of,
    user_of,
    with_credentials,
)
from services.common.bus.topology import EXCHANGES
from services.common.messages import Envelope, MessageType
from tests.conftest import RUN_DIR

pytestmark = [pytest.mark.e2e]

Action = Callable[[AbstractChannel], Awaitable[object]]
SHARD = shard_queue(0)


def process_environment(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw if entry)
    return {name: value for name, _, value in pairs}


@asynccontextmanager
async def channel_of(url: str) -> AsyncIterator[AbstractChannel]:
    connection = await aio_pika.connect(url)
    try:
        yield await connection.channel()  # with publisher confirms: a refusal is awaited
    finally:
        await connection.close()


async def refused(url: str, action: Action) -> str:
    """The broker's refusal of `action` (ACCESS_REFUSED, which closes the channel)."""
    async with channel_of(url) as channel:
        with pytest.raises(ChannelAccessRefused) as caught:
            await action(channel)
    return str(caught.value)


async def allowed(url: str, action: Action) -> None:
    async with channel_of(url) as channel:
        await action(channel)


async def ignore(message: object) -> None:
    raise AssertionError(f"consumed {message}")


def consume(queue: str) -> Action:
    async def action(channel: AbstractChannel) -> None:
        found = await channel.declare_queue(queue, passive=True)  # a lookup needs no right
        await found.consume(ignore)

    return action


def take(queue: str) -> Action:
    async def action(channel: AbstractChannel) -> None:
        found = await channel.declare_queue(queue, passive=True)
        await found.get(fail=False)

    return action


def publish(exchange: str, key: str) -> Action:
    async def action(channel: AbstractChannel) -> None:
        target = (
            channel.default_exchange
            if exchange == ""
            else await channel.get_exchange(exchange, ensure=False)
        )
        # Not routable anywhere that matters if it were let through: nobody's queue is named so.
        await target.publish(aio_pika.Message(b"{}"), routing_key=key, mandatory=False)

    return action


def delete(queue: str) -> Action:
    async def action(channel: AbstractChannel) -> None:
        await channel.queue_delete(queue)

    return action


def purge(queue: str) -> Action:
    async def action(channel: AbstractChannel) -> None:
        found = await channel.declare_queue(queue, passive=True)
        await found.purge()

    return action


def declare_exchange(name: str, kind: str) -> Action:
    async def action(channel: AbstractChannel) -> None:
        await channel.declare_exchange(name, kind, durable=True)

    return action


def tap(prefix: str, exchange: str, key: str) -> Action:
    """A queue of the user's own kind (`prefix`), bound to `exchange`: a copy of its traffic."""

    async def action(channel: AbstractChannel) -> None:
        queue = await channel.declare_queue(
            f"{prefix}{secrets.token_hex(4)}", exclusive=True, auto_delete=True
        )
        await queue.bind(exchange, routing_key=key)

    return action


async def exists(url: str, queue: str) -> bool:
    """Whether `queue` exists (a passive declaration: a missing queue closes the channel)."""
    async with channel_of(url) as channel:
        try:
            await channel.declare_queue(queue, passive=True)
        except ChannelNotFoundEntity:
            return False
    return True


def own_queue(name: str) -> Action:
    async def action(channel: AbstractChannel) -> None:
        await channel.declare_queue(name, exclusive=True, auto_delete=True)

    return action


@pytest.fixture(scope="module")
def urls(stack: Any) -> dict[str, str]:
    """Each service's broker URL, as its process got it."""
    return {name: stack.infra.service_amqp_url(name) for name in SERVICES}


def test_each_service_logs_in_as_its_own_broker_user(stack: Any, infra_handle: Any) -> None:
    """No service process holds the administrator's password; the broker lists each
    service's connection under that service's user."""
    admin = urlsplit(stack.infra.amqp_url)
    for name, process in stack.processes.items():
        url = process_environment(process.pid)["CANOPY_AMQP_URL"]
        assert login_of(url).user == user_of(name), name
        assert unquote(admin.password or "") not in url, name
    listed = infra_handle.rabbitmqctl(
        "list_connections", "user", "client_properties", "--no-table-headers", "--quiet"
    ).stdout
    for name in SERVICES:
        # connection_name is "<service> <instance>" (Bus(name=...)).
        lines = [line for line in listed.splitlines() if f'"{name} ' in line]
        assert lines, (name, listed)
        assert all(line.split("\t", 1)[0] == user_of(name) for line in lines), (name, lines)


def test_no_service_user_is_an_administrator(infra_handle: Any) -> None:
    listed = infra_handle.rabbitmqctl("list_users", "--no-table-headers", "--quiet").stdout
    tags = dict(line.split("\t", 1) for line in listed.splitlines() if "\t" in line)
    for name in SERVICES:
        assert tags[user_of(name)].strip() == "[]", tags


async def test_the_gateways_user_reaches_only_inputs_heartbeats_and_its_own_queue(
    urls: dict[str, str],
) -> None:
    """Internet-facing: taken over, it can neither read nor remove what decisions and the
    store consume, nor speak for decisions, timers or the store."""
    url = urls["gateway"]
    assert "ACCESS_REFUSED" in await refused(url, consume(SHARD))
    await refused(url, take(SHARD))
    await refused(url, consume(STORE_QUEUE))
    await refused(url, consume(DEAD))
    await refused(url, publish(LOG, LOG_KEY))  # a forged event log
    await refused(url, publish(COMMANDS, "timers"))
    await refused(url, publish(GATEWAYS, ""))  # a forged resync to every gateway
    await refused(url, publish("", "canopy.gateway.other"))  # frames to another gateway
    await refused(url, delete(SHARD))
    await refused(url, purge(SHARD))
    await refused(url, declare_exchange(INPUTS, "topic"))  # configure: it could delete it
    await refused(url, tap("canopy.gateway.", LOG, LOG_KEY))  # a copy of the event log
    await refused(url, tap("canopy.gateway.", INPUTS, "#"))  # every participant's input
    # What it does (the e2e tests play the rest): its own queue, bound to the resyncs.
    await allowed(url, tap("canopy.gateway.", GATEWAYS, ""))


async def test_the_stores_user_cannot_send_frames_nor_take_inputs(urls: dict[str, str]) -> None:
    url = urls["store"]
    # Frames reach participants through the default exchange (decisions to each gateway).
    await refused(url, publish("", "canopy.gateway.any"))
    await refused(url, publish(GATEWAYS, ""))
    await refused(url, publish(LIVENESS, ""))
    await refused(url, consume(SHARD))
    await refused(url, consume(TIMERS_QUEUE))
    await refused(url, delete(SHARD))
    await refused(url, delete(TIMERS_QUEUE))
    await refused(url, declare_exchange(INPUTS, "topic"))
    # It reads canopy.inputs only to unbind one old binding (topic permissions): no copy of
    # participants' inputs, and it re-drives dead inputs, but never sends a frame of its own.
    await refused(url, tap("canopy.monitor.", INPUTS, "#"))
    await refused(url, tap("canopy.monitor.", INPUTS, "shard.0.batch"))
    await refused(url, publish(INPUTS, "shard.0.frame"))
    # A live monitor's copy of the log.
    await allowed(url, tap("canopy.monitor.", LOG, LOG_KEY))


async def test_decisions_user_cannot_delete_or_read_what_others_consume(
    urls: dict[str, str],
) -> None:
    url = urls["decisions"]
    for queue in (STORE_QUEUE, TIMERS_QUEUE, DEAD):
        await refused(url, delete(queue))
        await refused(url, purge(queue))
        await refused(url, consume(queue))  # the event log, timers' commands, dead letters
    await refused(url, declare_exchange(LOG, "direct"))
    await refused(url, declare_exchange(COMMANDS, "direct"))
    await refused(url, publish(INPUTS, "shard.0.batch"))  # inputs come from gateways, timers
    await refused(url, tap("canopy.liveness.", LOG, LOG_KEY))
    await allowed(url, tap("canopy.liveness.", LIVENESS, ""))


async def test_the_timers_user_only_reads_its_commands_and_sends_timer_inputs(
    urls: dict[str, str],
) -> None:
    url = urls["timers"]
    await refused(url, consume(SHARD))
    await refused(url, consume(STORE_QUEUE))
    await refused(url, publish(LOG, LOG_KEY))
    await refused(url, publish(GATEWAYS, ""))
    await refused(url, publish("", "canopy.gateway.any"))
    await refused(url, delete(SHARD))
    await refused(url, delete(STORE_QUEUE))
    await refused(url, declare_exchange(INPUTS, "topic"))
    await refused(url, tap("canopy.timers.", COMMANDS, "timers"))  # no queue but its own


def test_each_user_configures_only_what_its_service_declares() -> None:
    """configure is also the right to delete: each user's covers exactly the names its
    service declares (topology.py's owners), and the queues of its own instances."""
    topology = Topology(2, "quorum")
    declares: dict[str, set[str]] = {name: set() for name in SERVICES}
    for exchange, (_, owner) in EXCHANGES.items():
        declares[owner].add(exchange)
    for queue, owner in topology.durable_queues().items():
        declares[owner].add(queue)
    own_kind = {
        "gateway": "canopy.gateway.host-1",
        "decisions": "canopy.liveness.host-1",
        "store": "canopy.monitor.host-1.0a1b2c3d",
        "timers": None,
    }
    names = set().union(*declares.values(), {n for n in own_kind.values() if n}) | {"amq.default"}
    for service in SERVICES:
        pattern = PERMISSIONS[service].configure
        expected = declares[service] | ({own_kind[service]} - {None})
        assert {name for name in names if re.fullmatch(pattern, name)} == expected, service


class Waiting(logging.Handler):
    """Sets an event per service once its bus logs that it waits for another's part."""

    def __init__(self) -> None:
        super().__init__()
        self.events: dict[str, asyncio.Event] = {name: asyncio.Event() for name in SERVICES}

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.args, tuple) and record.msg.startswith("%s: waiting for"):
            self.events[str(record.args[0])].set()


async def test_each_service_declares_its_own_part_on_an_empty_broker_in_any_order(
    infra_handle: Any,
) -> None:
    """Each user declares what its service consumes and waits for the rest: on a new virtual
    host the publishers connect first and wait (timers having declared its own part), then
    the others; the topology they leave routes every input, log batch and command."""
    vhost = f"order-{secrets.token_hex(4)}"
    infra_handle.rabbitmqctl("add_vhost", vhost)
    waiting = Waiting()
    topology_log = logging.getLogger("services.common.bus.topology")
    topology_log.addHandler(waiting)
    try:
        admin = infra_handle.broker_user
        infra_handle.rabbitmqctl("set_permissions", "-p", vhost, admin, ".*", ".*", ".*")
        for name in SERVICES:
            rules = PERMISSIONS[name]
            infra_handle.rabbitmqctl(
                "set_permissions", "-p", vhost, user_of(name),
                rules.configure, rules.write, rules.read,
            )  # fmt: skip
        base = infra_handle.infra.amqp_url.rstrip("/") + "/" + vhost
        buses = {
            name: Bus(
                with_credentials(base, user_of(name), infra_handle.infra.service_passwords[name]),
                Topology(2, "quorum", service=name),
                name=f"{name} test",
            )
            for name in SERVICES
        }
        try:
            first = [asyncio.create_task(buses[name].connect()) for name in ("gateway", "timers")]
            async with asyncio.timeout(30):
                await waiting.events["gateway"].wait()
                await waiting.events["timers"].wait()
                assert await exists(base, TIMERS_QUEUE)  # its own part, before it waits
                assert not await exists(base, SHARD)
                assert not any(task.done() for task in first)
                await buses["store"].connect()
                await buses["decisions"].connect()
                await asyncio.gather(*first)
            assert not waiting.events["store"].is_set()  # it uses nothing another declares
            envelope = Envelope(type=MessageType.GATEWAY_ALIVE, session="", group="")
            # mandatory: each would raise if its queue were missing or unbound.
            await buses["gateway"].publish(INPUTS, "shard.1.batch", envelope)
            await buses["timers"].publish(INPUTS, "shard.0.timer", envelope)
            await buses["decisions"].publish(COMMANDS, "timers", envelope)
            await buses["store"].publish(LOG, LOG_KEY, envelope)
        finally:
            for bus in buses.values():
                await bus.close()
    finally:
        topology_log.removeHandler(waiting)
        infra_handle.rabbitmqctl("delete_vhost", vhost)


def test_the_kubernetes_job_applies_the_same_users_through_the_management_api() -> None:
    """`python -m services.common.bus.access` (the Job rabbitmq-users) against a broker with
    the management API: each service's user, from its URL, gets its permissions, again and
    again; the administrator or a shared user is refused."""
    with start_infra(RUN_DIR, persistent=False, management=True) as handle:
        infra = handle.infra
        assert infra.management_url is not None
        logins = {name: Login(f"k8s-{name}", secrets.token_urlsafe(16), "/") for name in SERVICES}
        admin = login_of(infra.amqp_url)
        with httpx.Client(
            base_url=infra.management_url, auth=(admin.user, admin.password), timeout=30
        ) as client:
            with pytest.raises(ValueError, match="of its own"):
                apply(client, {"gateway": admin}, admin_user=admin.user)
            same = Login("shared", "pw", "/")
            with pytest.raises(ValueError, match="of its own"):
                apply(client, {"gateway": same, "timers": same}, admin_user=admin.user)
            for _ in range(2):  # a second run changes nothing
                apply(client, logins, admin_user=admin.user)
            for name, login in logins.items():
                got = client.get(f"/api/permissions/%2F/{login.user}").json()
                rules = PERMISSIONS[name]
                assert (got["configure"], got["write"], got["read"]) == (
                    rules.configure, rules.write, rules.read,
                )  # fmt: skip
                assert client.get(f"/api/users/{login.user}").json()["tags"] in ([], "")
        gateway = logins["gateway"]
        url = with_credentials(infra.amqp_url, gateway.user, gateway.password)

        async def check() -> None:
            await refused(url, declare_exchange(LOG, "direct"))
            await allowed(url, own_queue("canopy.gateway.host-1"))

        asyncio.run(check())
