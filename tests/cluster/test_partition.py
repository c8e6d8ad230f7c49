"""A broker node cut off from the other two mid-period, then healed (issue 23, "Partitions").

The local 3-node cluster (`devstack.cluster`, `cluster_partition_handling = pause_minority`,
`net_ticktime` 10 s) runs the four services and a second gateway; 4 groups of 2 participants
(members of each group on both gateways) send 5 decisions/s each through one period. The node
holding the most client connections is cut off from the other two with nftables
(`tests/cluster/netcut.py`: its Erlang distribution links silenced both ways; the AMQP
listeners stay reachable, so clients on the cut-off node can still talk to it). Then:
- the cut-off node sees a minority and pauses (its AMQP listener closes), which closes its
  clients' connections; they reconnect to the majority (services/common/failover.py);
- the majority's quorum queues keep serving: every participant has frames acknowledged again,
  and no queue's leader is on the cut-off node;
- after the heal the node rejoins and every quorum queue has all three members online again;
- after the period every acknowledged frame is in the export exactly once, each participant's
  frames in order, the period ended on time, and the fold of each group's log is the state the
  service gives (`hello`).
The times of each step are printed (`-s`) for docs/reliability.md. One open finding ends the
test as an expected failure, with what the broker and the services said: a paused node that
did not start again after the heal (RabbitMQ 3.10.8). Any other failure, participants whose
acks do not resume included, and any acknowledged frame lost, doubled or out of order, fails
it. (Participants whose acks never resumed after their gateway's broker connection moved were
the other open finding, until the gateway announced its connections again after its own
reconnect: tests/e2e/test_gateway_reconnect.py.)

Slow (a cluster boots in ~30 s): `make cluster-check` runs it; needs nftables and root (or
password-less sudo, as CI has).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import secrets
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from devstack.cluster import ClusterHandle, start_cluster
from devstack.infra import free_port, log_tails
from devstack.stack import SERVICES, StackHandle, start_stack
from tests.cluster.netcut import NetCut, nft_problem
from tests.conftest import RUN_DIR
from tests.e2e.conftest import ServiceProcess, extra_service
from tests.e2e.protocol import RESEARCHER_HOOKS
from tests.faults.bots import Bot
from tests.faults.test_faults import (
    acked_after,
    check_log,
    check_state_equals_replay,
    export_with,
    stale_hellos,
    tick_delays,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

TICKTIME = 10  # seconds of silence before a node is down (RabbitMQ's default is 60)
GROUPS, SIZE, RATE = 4, 2, 5.0
PERIOD = 50.0
PARTITIONED = 8.0  # seconds the partition lasts after the clients moved (steady serving)


@pytest.fixture(scope="module")
def netcut() -> Iterator[NetCut]:
    problem = nft_problem()
    if problem is not None:
        pytest.fail(problem)
    cut = NetCut()
    try:
        yield cut
    finally:
        cut.heal()  # whatever happened, no rule outlives the test


@pytest.fixture(scope="module")
def cluster(netcut: NetCut) -> Iterator[ClusterHandle]:
    with start_cluster(RUN_DIR, nodes=3, net_ticktime=TICKTIME) as handle:
        try:
            yield handle
        finally:
            netcut.heal()  # before the nodes stop: a cut-off node would stop slowly


@pytest.fixture(scope="module")
def partition_stack(cluster: ClusterHandle) -> Iterator[StackHandle]:
    overrides = {"CANOPY_MONGO_DB": f"partition_{secrets.token_hex(4)}"}
    ports = {name: free_port() for name in SERVICES}
    with start_stack(
        cluster.infra, cluster.first.run_dir, env_overrides=overrides, ports=ports
    ) as handle:
        yield handle


@pytest.fixture
async def second_gateway(partition_stack: StackHandle) -> AsyncIterator[ServiceProcess]:
    async with extra_service(partition_stack, "gateway") as gateway:
        yield gateway


class NodeUnreachable(Exception):
    """A cluster-wide listing could not reach a node (it asks every node, the cut-off one
    included, until the others declare it down): the state is still changing."""


def ctl_json(cluster: ClusterHandle, via: str, *args: str) -> list[dict[str, Any]]:
    result = cluster.ctl(via, *args, "--formatter", "json", "--quiet")
    if result.returncode != 0 and ("nodedown" in result.stdout or "badrpc" in result.stdout):
        raise NodeUnreachable(result.stdout.strip()[-200:])
    assert result.returncode == 0, result.stdout
    rows: list[dict[str, Any]] = json.loads(result.stdout)
    return rows


def connections(cluster: ClusterHandle, via: str) -> Counter[str]:
    """Client connections per node, as node `via` lists them (a connection's `port` is the
    AMQP port of the node that holds it)."""
    nodes = {cluster.amqp_port(name): name for name in cluster.names}
    rows = ctl_json(cluster, via, "list_connections", "port")
    return Counter(nodes.get(int(row["port"]), "?") for row in rows)


def quorum_queues(cluster: ClusterHandle, via: str) -> list[dict[str, Any]]:
    rows = ctl_json(cluster, via, "list_queues", "name", "type", "leader", "members", "online")
    return [row for row in rows if row["type"] == "quorum"]


async def amqp_listening(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def until(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float, poll: float
) -> float:
    """Poll `check` until true; returns the time (monotonic) it first was. The broker's state
    changes on its own clocks (net ticks, Ra elections): there is no event to wait on."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                try:
                    if await check():
                        return time.monotonic()
                except NodeUnreachable:
                    pass  # asked mid-change (a listing that reached a node being cut): not yet
                await asyncio.sleep(poll)
    except TimeoutError:
        raise AssertionError(f"{what} (within {timeout} s)") from None


def in_thread(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """`check` (rabbitmqctl calls, which block) off the event loop the bots run on."""
    return lambda: asyncio.to_thread(check)


STORY = re.compile(r"partition|minority|recover| down| up\b|asked to start|Starting rabbit|stopped")


def broker_story(cluster: ClusterHandle) -> str:
    """What each node logged about peers, partitions and pauses (printed on a failure)."""
    parts = []
    for name in cluster.names:
        for log in sorted(cluster.first.logs_dir.glob(f"rabbitmq*/{name}.log")):
            lines = [
                line for line in log.read_text(errors="replace").splitlines() if STORY.search(line)
            ]
            parts.append(f"==> {name}\n" + "\n".join(lines[-40:]))
    return "\n".join(parts)


def diagnose(cluster: ClusterHandle, via: str, stack: StackHandle, bots: list[Bot]) -> str:
    """What the broker's majority and the services say (printed when a recovery fails)."""
    parts = [
        f"waiting bots: {[(b.code, b.url, len(b.unacked)) for b in bots if b.unacked]}",
    ]
    for args in (
        ("list_queues", "name", "leader", "online", "messages", "consumers"),
        ("list_connections", "name", "port", "state", "client_properties"),
        ("list_channels", "connection", "confirm", "messages_unconfirmed", "consumer_count"),
        ("list_consumers", "queue_name", "channel_pid", "active"),
    ):
        parts.append(f"$ rabbitmqctl -n {via} {' '.join(args)}\n{_ctl_text(cluster, via, *args)}")
    for name in cluster.names:  # (the cut-off node's CLI is cut off too: it times out)
        seen = _ctl_text(cluster, name, "eval", "{nodes(), rabbit:is_running()}.")
        parts.append(f"{name} sees {seen}")
    logs = sorted(stack.logs_dir.glob("*.log"))
    parts.append(log_tails(*logs, lines=30))
    parts.append(broker_story(cluster))
    return "\n".join(parts)


def _ctl_text(cluster: ClusterHandle, name: str, *args: str) -> str:
    try:
        return cluster.ctl(name, *args, timeout=15).stdout
    except subprocess.TimeoutExpired:
        return "(no answer within 15 s)"


def longest_ack_gap(bots: list[Bot], start: float, end: float) -> float:
    """The longest a participant waited between two acks in [start, end]."""
    worst = 0.0
    for bot in bots:
        times = [start] + [r.at for r in bot.received if r.channel == "ack" and start < r.at < end]
        times.append(end)
        worst = max(worst, max(b - a for a, b in itertools.pairwise(times)))
    return worst


async def cut_and_heal(
    cluster: ClusterHandle, netcut: NetCut, bots: list[Bot], victim: str, total: int
) -> dict[str, float]:
    """Cut `victim` off, check that the majority serves, heal, check that it rejoins. Returns
    the times of each step: since the cut, and for `back` and `rejoined` since the heal."""
    majority = [name for name in cluster.names if name != victim]
    via = majority[0]
    port, source = cluster.dist_endpoint(victim)
    victim_amqp = cluster.amqp_port(victim)
    cut_at = time.monotonic()
    netcut.cut(port, source, [cluster.dist_endpoint(name)[0] for name in majority])

    # Every participant served again (a frame sent after the cut acknowledged), ...
    served = asyncio.create_task(acked_after(bots, 60))
    # ... once the minority paused: its listener closes, and its clients' connections.
    try:
        paused_at = await until(
            lambda: _closed(victim_amqp), "the cut-off node never paused", 3 * TICKTIME, 0.2
        )
        await served
    finally:
        served.cancel()
    served_at = time.monotonic()
    # Every client on the majority; no leader left on the cut-off node (they were elected
    # again among the majority).
    moved_at = await until(
        in_thread(lambda: _all_on(connections(cluster, via), victim, total)),
        "the clients did not all move to the majority",
        60,
        1.0,
    )
    queues = await asyncio.to_thread(quorum_queues, cluster, via)
    assert queues, "no quorum queue: the services declare theirs as quorum"
    assert not [q["name"] for q in queues if q["leader"] == victim]
    # Steady serving on the majority while the partition lasts.
    steady_from = time.monotonic()
    for bot in bots:
        await bot.wait_for(
            "acks while partitioned",
            lambda b=bot: any(
                r.channel == "ack" and r.at > steady_from + PARTITIONED for r in b.received
            ),
            PARTITIONED + 30,
        )

    heal_at = time.monotonic()
    netcut.heal()
    back_at = await until(
        lambda: amqp_listening(victim_amqp), "the node did not come back", 60, 0.2
    )
    rejoined_at = await until(
        in_thread(lambda: all(len(q["online"]) == 3 for q in quorum_queues(cluster, via))),
        "quorum queues did not get their third member back",
        60,
        1.0,
    )
    await acked_after(bots, 30)
    return {
        "paused": paused_at - cut_at,
        "served": served_at - cut_at,
        "gap": longest_ack_gap(bots, cut_at, time.monotonic()),
        "moved": moved_at - cut_at,
        "heal": heal_at - cut_at,
        "back": back_at - heal_at,
        "rejoined": rejoined_at - heal_at,
    }


async def test_a_cut_off_broker_node_pauses_and_the_majority_serves(
    cluster: ClusterHandle,
    netcut: NetCut,
    partition_stack: StackHandle,
    second_gateway: ServiceProcess,
) -> None:
    stack = partition_stack
    async with httpx.AsyncClient(
        base_url=stack.urls.store_url,
        headers={"Authorization": f"Bearer {stack.urls.admin_token}"},
        timeout=10.0,
        event_hooks=RESEARCHER_HOOKS,
    ) as api:
        created = await api.post(
            "/api/sessions",
            json={
                "experiment": "decisions",
                "num_participants": GROUPS * SIZE,
                "group_size": SIZE,
                "num_periods": 1,
                "period_length": PERIOD,
                "label": "partition",
            },
        )
        assert created.status_code == 201, created.text
        session = created.json()
        gateways = [stack.urls.gateway_url, second_gateway.url]
        bots = [
            Bot(gateways[i % 2], code, rate=RATE)
            for group in session["groups"]
            for i, code in enumerate(group["participants"])
        ]
        for bot in bots:
            bot.start()
        try:
            for bot in bots:
                await bot.wait_started(30)
            for bot in bots:
                await bot.wait_for("acks", lambda b=bot: len(b.acked) >= 5, 20)

            # The victim: the node with the most clients (the services pick a node at random).
            before = await asyncio.to_thread(connections, cluster, cluster.names[0])
            victim, on_victim = before.most_common(1)[0]
            assert on_victim > 0, "no client on any node: failover would go untested"
            majority = [name for name in cluster.names if name != victim]
            via = majority[0]
            total = sum(before.values())
            leaders = sum(
                q["leader"] == victim for q in await asyncio.to_thread(quorum_queues, cluster, via)
            )
            print(
                f"\nPARTITION cutting {victim.split('@')[0]} off: {on_victim} of {total} client "
                f"connections and {leaders} quorum queue leaders on it"
            )

            try:
                times = await cut_and_heal(cluster, netcut, bots, victim, total)
            except BaseException as e:
                print(await asyncio.to_thread(diagnose, cluster, via, stack, bots))
                # The open finding (docs/reliability.md, "A broker node cut off"): a paused
                # node that never started again after the heal. Anything else fails.
                if "did not come back" in str(e):
                    pytest.xfail(f"open finding (docs/reliability.md): {e}")
                raise
            print(
                f"PARTITION cut: the node paused after {times['paused']:.2f} s "
                f"(net_ticktime {TICKTIME} s); every participant had an ack again after "
                f"{times['served']:.2f} s (longest wait for an ack {times['gap']:.2f} s); all "
                f"{total} client connections on the majority after {times['moved']:.2f} s"
            )
            print(
                f"PARTITION heal after {times['heal']:.2f} s: the node served AMQP again "
                f"after {times['back']:.2f} s, every quorum queue had 3 members online "
                f"after {times['rejoined']:.2f} s"
            )
            for bot in bots:
                await bot.wait_ended(PERIOD + 60)
        finally:
            for bot in bots:
                await bot.stop()

        rows = await export_with(api, session["session"], bots, 60, groups=GROUPS)
        # Nothing doubled or lost, ticks once each, the period on time (late by at most 5 s:
        # the partition was healed well before the end), timestamps in order.
        check_log(session, rows, bots, PERIOD, 0, 0.0)
        for bot in bots:
            seqs = [
                r["seq"] for r in rows if r["participant"] == bot.code and r["direction"] == "in"
            ]
            assert seqs == sorted(seqs), f"{bot.code}: frames out of order in the log"
        stale = stale_hellos(bots)
        assert not stale, f"an ack and then an older hello: {stale}"
        await check_state_equals_replay(session, rows, stack.urls.gateway_url)
        delay, late = tick_delays(rows, PERIOD, 0)
        acked = sum(len(b.acked) for b in bots)
        print(
            f"PARTITION {acked} frames acknowledged, 0 lost, 0 doubled, in order; period_end "
            f"{delay:.3f} s after its deadline ({late} ticks marked late)"
        )


async def _closed(port: int) -> bool:
    return not await amqp_listening(port)


def _all_on(by_node: Counter[str], victim: str, total: int) -> bool:
    return sum(by_node.values()) >= total and not by_node[victim]
