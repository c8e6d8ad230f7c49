"""Who may do what on the bus: each service's own RabbitMQ user and its permissions.

RabbitMQ grants a user, per virtual host, three regular expressions over the names of
exchanges and queues: *configure* (declare, delete), *write* (publish to an exchange; bind a
queue, on the queue's side; the dead-letter exchange a queue is declared with) and *read*
(consume, purge; bind, on the exchange's side; a queue declared with a dead-letter exchange).
A passive declaration needs none. Each service's user may do what its code does and nothing
more (docs/operations.md, "RabbitMQ users"):

- It configures only what it declares (services/common/bus/topology.py, "Who declares what"),
  so no service can delete a queue another consumes: the gateway only its own queue, timers
  `canopy.timers`, the store the log's and the dead letters' queues, decisions the shards.
- It reads only the queues it consumes, and the exchanges it binds those to.
- It writes to the exchanges it publishes to, and (RabbitMQ's rule for declaring a queue with
  a dead-letter exchange) to `canopy.dead` when it declares a durable queue.
- On `canopy.inputs` (a topic exchange) the store's routing keys are narrowed too
  (`TOPIC_PERMISSIONS`).

What the broker cannot narrow: decisions sends to each gateway's queue through the default
exchange (`amq.default`), and whoever writes there may address any queue by name; the store
re-drives dead letters to where they came from (`canopy.inputs`, `canopy.commands`,
`canopy.log`). `PERMISSIONS` is the one copy of these rules: `make run` (devstack.infra)
writes them into the broker's definitions, and on Kubernetes the Job `rabbitmq-users` applies
them through the management API:

    python -m services.common.bus.access

reads each service's `CANOPY_AMQP_URL` from its Secret (`CANOPY_<SERVICE>_AMQP_URL` in the
Job's environment), and creates or updates that user with that service's permissions, as the
operator's default user (`RABBITMQ_USERNAME`, `RABBITMQ_PASSWORD`, `RABBITMQ_MANAGEMENT_URL`).
Run again, it changes nothing or sets a rotated password.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import get_args
from urllib.parse import quote, unquote, urlsplit

import httpx

from services.common.bus.topology import (
    COMMANDS,
    DEAD,
    GATEWAYS,
    INPUTS,
    LEGACY_STORE_KEY,
    LIVENESS,
    LOG,
    STORE_QUEUE,
    TIMERS_QUEUE,
    Service,
)
from services.common.failover import amqp_urls

SERVICES: tuple[Service, ...] = get_args(Service)
VHOST = "/"
DEFAULT_EXCHANGE = "amq.default"  # the name RabbitMQ checks a publish to "" against
# Per-instance names (an instance's queue, made and gone with its connection).
SHARD_QUEUES = r"canopy\.decisions\.shard\.\d+"
GATEWAY_QUEUES = r"canopy\.gateway\..+"
LIVENESS_QUEUES = r"canopy\.liveness\..+"
MONITOR_QUEUES = r"canopy\.monitor\..+"
NOTHING = "^$"


def _names(*patterns: str) -> str:
    """A permission regex that matches exactly these names (RabbitMQ's are unanchored)."""
    return "^(" + "|".join(patterns) + ")$"


def _exact(name: str) -> str:
    return re.escape(name)


@dataclass(frozen=True)
class Permissions:
    configure: str
    write: str
    read: str


PERMISSIONS: dict[Service, Permissions] = {
    # Publishes inputs and heartbeats; consumes its own queue, bound to canopy.gateways.
    "gateway": Permissions(
        configure=_names(GATEWAY_QUEUES),
        write=_names(_exact(INPUTS), _exact(LIVENESS), GATEWAY_QUEUES),
        read=_names(_exact(GATEWAYS), GATEWAY_QUEUES),
    ),
    # Consumes the shards and heartbeats; publishes the log, timers' commands, resyncs, and
    # frames to each gateway's queue (the default exchange).
    "decisions": Permissions(
        configure=_names(
            _exact(INPUTS), _exact(LIVENESS), _exact(GATEWAYS), SHARD_QUEUES, LIVENESS_QUEUES
        ),
        write=_names(
            _exact(DEFAULT_EXCHANGE),
            _exact(LOG),
            _exact(COMMANDS),
            _exact(GATEWAYS),
            _exact(DEAD),
            SHARD_QUEUES,
            LIVENESS_QUEUES,
        ),
        read=_names(_exact(INPUTS), _exact(LIVENESS), SHARD_QUEUES, LIVENESS_QUEUES),
    ),
    # Consumes the log, the dead letters and (live monitors) copies of the log; publishes log
    # barriers, and re-drives dead letters to the exchange they came by. Reads canopy.inputs
    # only to unbind its queue from it (a binding from before log batches): its topic
    # permissions (below) let it bind nothing there that carries anything.
    "store": Permissions(
        configure=_names(_exact(LOG), _exact(DEAD), _exact(STORE_QUEUE), MONITOR_QUEUES),
        write=_names(
            _exact(INPUTS),
            _exact(COMMANDS),
            _exact(LOG),
            _exact(DEAD),
            _exact(STORE_QUEUE),
            MONITOR_QUEUES,
        ),
        read=_names(_exact(INPUTS), _exact(LOG), _exact(DEAD), _exact(STORE_QUEUE), MONITOR_QUEUES),
    ),
    # Consumes its commands; publishes timer inputs.
    "timers": Permissions(
        configure=_names(_exact(COMMANDS), _exact(TIMERS_QUEUE)),
        write=_names(_exact(INPUTS), _exact(DEAD), _exact(TIMERS_QUEUE)),
        read=_names(_exact(COMMANDS), _exact(TIMERS_QUEUE)),
    ),
}
ADMIN_PERMISSIONS = Permissions(configure=".*", write=".*", read=".*")


@dataclass(frozen=True)
class TopicPermissions:
    """RabbitMQ's second check on a topic exchange: the routing keys a user may publish with
    (write) and bind with (read). Without one, any key goes."""

    exchange: str
    write: str
    read: str


TOPIC_PERMISSIONS: dict[Service, TopicPermissions] = {
    # The store re-drives dead inputs (gateways' batches, timers' inputs), and unbinds the
    # one binding from before log batches; it cannot bind a copy of participants' inputs.
    "store": TopicPermissions(
        INPUTS,
        write=r"^shard\.\d+\.(batch|timer)$",
        read=_names(_exact(LEGACY_STORE_KEY)),
    ),
}


def user_of(service: str) -> str:
    """The broker user `make run` gives a service (on Kubernetes: the one in its Secret)."""
    return f"canopy-{service}"


def with_credentials(url: str, user: str, password: str) -> str:
    """`url` (several, comma-separated, for a cluster) logged in as `user`."""
    parts = []
    for one in amqp_urls(url):
        split = urlsplit(one)
        host = split.netloc.rpartition("@")[2]
        login = f"{quote(user, safe='')}:{quote(password, safe='')}"
        parts.append(split._replace(netloc=f"{login}@{host}").geturl())
    return ",".join(parts)


@dataclass(frozen=True)
class Login:
    user: str
    password: str
    vhost: str


def login_of(url: str) -> Login:
    """The user, password and virtual host of an AMQP URL (the first, for a cluster's)."""
    split = urlsplit(amqp_urls(url)[0])
    if not split.username or split.password is None:
        raise ValueError("the AMQP URL names no user and password")
    vhost = unquote(split.path[1:]) if len(split.path) > 1 else VHOST
    return Login(unquote(split.username), unquote(split.password), vhost)


def apply(client: httpx.Client, logins: Mapping[Service, Login], *, admin_user: str) -> list[str]:
    """Create or update each service's user (no tags: no management UI) with its service's
    permissions on its virtual host, through RabbitMQ's management API; what was done."""
    users = [login.user for login in logins.values()]
    if admin_user in users or len(set(users)) != len(users):
        raise ValueError(
            "each service needs a broker user of its own, neither shared nor the administrator"
        )
    done = []
    for service, login in logins.items():
        permissions = PERMISSIONS[service]
        vhost = quote(login.vhost, safe="")
        user = quote(login.user, safe="")
        client.put(
            f"/api/users/{user}", json={"password": login.password, "tags": ""}
        ).raise_for_status()
        client.put(
            f"/api/permissions/{vhost}/{user}",
            json={
                "configure": permissions.configure,
                "write": permissions.write,
                "read": permissions.read,
            },
        ).raise_for_status()
        topic = TOPIC_PERMISSIONS.get(service)
        if topic is not None:
            client.put(
                f"/api/topic-permissions/{vhost}/{user}",
                json={"exchange": topic.exchange, "write": topic.write, "read": topic.read},
            ).raise_for_status()
        done.append(f"{login.user}: {service}'s permissions on {login.vhost}")
    return done


def main(environ: Mapping[str, str]) -> int:
    """The Job `rabbitmq-users` (deploy/k8s/base/rabbitmq-users.yaml)."""
    logins = {
        service: login_of(environ[f"CANOPY_{service.upper()}_AMQP_URL"]) for service in SERVICES
    }
    admin = environ["RABBITMQ_USERNAME"]
    with httpx.Client(
        base_url=environ.get("RABBITMQ_MANAGEMENT_URL", "http://rabbitmq:15672"),
        auth=(admin, environ["RABBITMQ_PASSWORD"]),
        timeout=30,
    ) as client:
        for line in apply(client, logins, admin_user=admin):
            print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(os.environ))
