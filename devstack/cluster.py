"""A RabbitMQ cluster on this machine: the devstack node plus more nodes joined to it.

`start_cluster(run_dir, nodes=3)` starts the usual infrastructure (`start_infra`: nx-27017,
an epmd and the first node), then more Debian RabbitMQ nodes on ports of their own that
register with the same epmd, share the first node's Erlang cookie (same HOME) and
`join_cluster` it. Quorum queues declared afterwards get a member on every node (RabbitMQ's
default initial group size), so a node can die without losing an acknowledged message.
`ClusterHandle.infra.amqp_url` lists every node's URL (services/common/failover.py).

Partitions: every node runs `cluster_partition_handling = pause_minority` (as deploy/k8s does):
a node that sees fewer than half the cluster stops serving (closes its clients' connections,
stops its listener) until it sees a majority again, so the side that keeps quorum queues'
majority is the only side clients can use (docs/reliability.md, "A broker node cut off").
Each joined node N makes its outgoing distribution connections from 127.0.0.N (the first node
from 127.0.0.1), and every node listens on a distribution port of its own, so a packet filter
can tell every node-to-node link apart (tests/cluster/test_partition.py). `net_ticktime`
(Erlang's 60 s by default) is how long a silent peer takes to be declared down.

Used by tests/cluster/ and `make cluster-check`; `make run` stays one node.
"""

from __future__ import annotations

import dataclasses
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from urllib.parse import urlsplit

from devstack.infra import (
    RABBIT_BOOT_TIMEOUT,
    RABBITMQ_BIN,
    Infra,
    InfraError,
    InfraHandle,
    child_env,
    epmd_names,
    free_port,
    log_tails,
    rabbitmqctl,
    spawn,
    start_infra,
    stop_process,
    wait_until,
)

LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"
PARTITION_HANDLING = "pause_minority"


@dataclass
class Node:
    name: str  # e.g. canopy-test-…-2@localhost
    amqp_port: int
    env: dict[str, str]
    log: Path
    dist_port: int = 0  # its Erlang distribution listener (127.0.0.1)
    source_ip: str = "127.0.0.1"  # where its own distribution connections come from
    process: Popen[bytes] | None = None
    credentials: str = ""  # "user:password" of the cluster (users are cluster-wide)

    @property
    def url(self) -> str:
        return f"amqp://{self.credentials}@127.0.0.1:{self.amqp_port}/"

    @property
    def short_name(self) -> str:
        return self.name.split("@")[0]

    def rabbitmqctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return rabbitmqctl(self.name, self.env, *args, timeout=timeout)


@dataclass
class ClusterHandle:
    first: InfraHandle
    nodes: list[Node] = field(default_factory=list)  # the joined nodes (not the first)

    @property
    def infra(self) -> Infra:
        urls = [self.first.infra.amqp_url, *(node.url for node in self.nodes)]
        return dataclasses.replace(self.first.infra, amqp_url=",".join(urls))

    @property
    def names(self) -> list[str]:
        """Every node's name, the first node's first."""
        return [self.first.rabbit_node, *(node.name for node in self.nodes)]

    def dist_endpoint(self, name: str) -> tuple[int, str]:
        """`name`'s distribution port and the address its own distribution connections come
        from: enough for a packet filter to cut it off from the others."""
        if name == self.first.rabbit_node:
            short = self.first.rabbit_short_name
            return (epmd_names(self.first.epmd_port) or {}).get(short, 0), "127.0.0.1"
        node = self.node(name)
        return node.dist_port, node.source_ip

    def amqp_port(self, name: str) -> int:
        if name == self.first.rabbit_node:
            return self.first.amqp_port
        return self.node(name).amqp_port

    def node(self, name: str) -> Node:
        return next(node for node in self.nodes if node.name == name)

    def ctl(self, name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """rabbitmqctl against the node called `name` (any node of the cluster)."""
        if name == self.first.rabbit_node:
            return self.first.rabbitmqctl(*args, timeout=timeout)
        return self.node(name).rabbitmqctl(*args, timeout=timeout)

    def kill(self, node: Node) -> None:
        """SIGKILL a joined node's VM (the cluster keeps a majority with 3 nodes)."""
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait()

    def connections_on(self, node: Node) -> int:
        """Client connections the cluster lists on `node`."""
        # A connection's pid reads <node.serial.number.0>: the node that holds it.
        result = node_ctl(self, "list_connections", "--no-table-headers", "--quiet", "pid")
        return sum(1 for line in result.stdout.splitlines() if line.startswith(f"<{node.name}."))


def node_ctl(cluster: ClusterHandle, *args: str) -> subprocess.CompletedProcess[str]:
    """rabbitmqctl against the first node (it stays up in every scenario)."""
    return cluster.first.rabbitmqctl(*args, timeout=60)


def _cluster_conf(net_ticktime: int | None) -> list[str]:
    """rabbitmq.conf lines every node of a cluster shares."""
    conf = [f"cluster_partition_handling = {PARTITION_HANDLING}"]
    if net_ticktime is not None:
        conf.append(f"net_ticktime = {net_ticktime}")
    return conf


def _configure_first(first: InfraHandle, net_ticktime: int | None) -> None:
    """The first node was started by `start_infra` (one node, `make run`'s config): give it
    the cluster's settings now, before any node joins, and in its rabbitmq.conf for a restart.
    RabbitMQ reads `cluster_partition_handling` when a peer goes down, so setting it at run
    time takes effect."""
    with (first.rabbit_dir / "rabbitmq.conf").open("a") as conf:
        conf.write("\n".join(_cluster_conf(net_ticktime)) + "\n")
    term = f"application:set_env(rabbit, cluster_partition_handling, {PARTITION_HANDLING})"
    if net_ticktime is not None:
        # Transition period 0: at once (nothing is connected to it yet but this CLI call).
        term += f", net_kernel:set_net_ticktime({net_ticktime}, 0)"
    result = first.rabbitmqctl("eval", term + ".")
    if result.returncode != 0:
        raise InfraError(
            f"{first.rabbit_node}: setting the cluster's config failed:\n{result.stdout}"
        )


def _node(first: InfraHandle, index: int, net_ticktime: int | None) -> Node:
    base = first.run_dir / f"rabbit-{index}"
    base.mkdir(parents=True, exist_ok=True)
    port, dist_port = free_port(), free_port()
    name = f"{first.rabbit_short_name}-{index}@localhost"
    conf = [f"listeners.tcp.default = 127.0.0.1:{port}", "loopback_users = none"]
    (base / "rabbitmq.conf").write_text("\n".join(conf + _cluster_conf(net_ticktime)) + "\n")
    source_ip = f"127.0.0.{index}"
    # Read by erl itself (not a shell, which could glob the brackets), for the node and its
    # rabbitmqctl alike: distribution connections from an address of its own; the CLI's net
    # ticktime as the cluster's, or the node would drop a CLI call that waits longer.
    erl_flags = f"-kernel inet_dist_connect_options [{{ip,{{{source_ip.replace('.', ',')}}}}}]"
    if net_ticktime is not None:
        erl_flags += f" -kernel net_ticktime {net_ticktime}"
    (base / "enabled_plugins").write_text("[].\n")
    (base / "rabbitmq-env.conf").write_text("")
    plugins = first.rabbit_dir / "plugins"  # the first node's slim plugins folder
    env = child_env(
        first.run_dir,
        {
            "HOME": str(first.rabbit_dir),  # the same Erlang cookie as the first node
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(dist_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(first.epmd_port),
            "RABBITMQ_MNESIA_BASE": str(base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(first.logs_dir / f"rabbitmq-{index}"),
            "RABBITMQ_PID_FILE": str(base / "rabbitmq.pid"),
            "RABBITMQ_CONFIG_FILE": str(base / "rabbitmq"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(base / "rabbitmq-env.conf"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": LOOPBACK_DIST,
            "RABBITMQ_CTL_DIST_PORT_MIN": "0",
            "RABBITMQ_CTL_DIST_PORT_MAX": "0",
            "RABBITMQ_CTL_ERL_ARGS": LOOPBACK_DIST,
            "RABBITMQ_ALLOW_INPUT": "1",  # the child is the VM itself: SIGKILL reaches it
            "RABBITMQ_SERVER_START_ARGS": "-noinput +B i",
            "ERL_ZFLAGS": erl_flags,
        },
    )
    if plugins.exists():
        env["RABBITMQ_PLUGINS_DIR"] = str(plugins)
    credentials = urlsplit(first.infra.amqp_url).netloc.rpartition("@")[0]
    log = first.logs_dir / f"rabbitmq-{index}.log"
    return Node(name, port, env, log, dist_port, source_ip, credentials=credentials)


def _spawn(node: Node) -> None:
    node.process = spawn([str(RABBITMQ_BIN / "rabbitmq-server")], env=node.env, log=node.log)


def _join(first: InfraHandle, node: Node) -> None:
    short = node.name.split("@")[0]
    try:
        wait_until(
            lambda: short in (epmd_names(first.epmd_port) or {}),
            timeout=RABBIT_BOOT_TIMEOUT,
            what=f"RabbitMQ node {node.name}",
        )
        for step in (
            ("await_startup", "--timeout", str(int(RABBIT_BOOT_TIMEOUT))),
            ("stop_app",),
            ("join_cluster", first.rabbit_node),
            ("start_app",),
        ):
            result = node.rabbitmqctl(*step, timeout=RABBIT_BOOT_TIMEOUT + 10)
            if result.returncode != 0:
                raise InfraError(f"{node.name}: {' '.join(step)} failed:\n{result.stdout}")
    except (InfraError, subprocess.TimeoutExpired) as e:
        raise InfraError(f"{e}\n{log_tails(node.log)}") from None


@contextmanager
def start_cluster(
    run_dir: Path, *, nodes: int = 3, net_ticktime: int | None = None
) -> Iterator[ClusterHandle]:
    """The devstack infrastructure with a RabbitMQ cluster of `nodes` nodes (`net_ticktime`:
    seconds of silence before a peer is down, Erlang's 60 when None)."""
    with ExitStack() as stack:
        first = stack.enter_context(start_infra(run_dir, persistent=False))
        _configure_first(first, net_ticktime)
        cluster = ClusterHandle(first)
        for index in range(2, nodes + 1):  # they boot side by side, then join one by one
            node = _node(first, index, net_ticktime)
            cluster.nodes.append(node)
            stack.callback(_stop_node, node)
            _spawn(node)
        for node in cluster.nodes:
            _join(first, node)
        yield cluster


def _stop_node(node: Node) -> None:
    if node.process is not None:
        stop_process(node.process, grace=0)  # tests only: its data is thrown away
