"""A RabbitMQ cluster on this machine: the devstack node plus more nodes joined to it.

`start_cluster(run_dir, nodes=3)` starts the usual infrastructure (`start_infra`: nx-27017,
an epmd and the first node), then more Debian RabbitMQ nodes on ports of their own that
register with the same epmd, share the first node's Erlang cookie (same HOME) and
`join_cluster` it. Quorum queues declared afterwards get a member on every node (RabbitMQ's
default initial group size), so a node can die without losing an acknowledged message.
`ClusterHandle.infra.amqp_url` lists every node's URL (services/common/failover.py).

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


@dataclass
class Node:
    name: str  # e.g. canopy-test-…-2@localhost
    amqp_port: int
    env: dict[str, str]
    log: Path
    process: Popen[bytes] | None = None
    credentials: str = ""  # "user:password" of the cluster (users are cluster-wide)

    @property
    def url(self) -> str:
        return f"amqp://{self.credentials}@127.0.0.1:{self.amqp_port}/"

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


def _node(first: InfraHandle, index: int) -> Node:
    base = first.run_dir / f"rabbit-{index}"
    base.mkdir(parents=True, exist_ok=True)
    port, dist_port = free_port(), free_port()
    name = f"{first.rabbit_short_name}-{index}@localhost"
    (base / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{port}\nloopback_users = none\n"
    )
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
        },
    )
    if plugins.exists():
        env["RABBITMQ_PLUGINS_DIR"] = str(plugins)
    credentials = urlsplit(first.infra.amqp_url).netloc.rpartition("@")[0]
    return Node(name, port, env, first.logs_dir / f"rabbitmq-{index}.log", credentials=credentials)


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
def start_cluster(run_dir: Path, *, nodes: int = 3) -> Iterator[ClusterHandle]:
    """The devstack infrastructure with a RabbitMQ cluster of `nodes` nodes."""
    with ExitStack() as stack:
        first = stack.enter_context(start_infra(run_dir, persistent=False))
        cluster = ClusterHandle(first)
        for index in range(2, nodes + 1):  # they boot side by side, then join one by one
            node = _node(first, index)
            cluster.nodes.append(node)
            stack.callback(_stop_node, node)
            _spawn(node)
        for node in cluster.nodes:
            _join(first, node)
        yield cluster


def _stop_node(node: Node) -> None:
    if node.process is not None:
        stop_process(node.process, grace=0)  # tests only: its data is thrown away
