"""Local infrastructure that the project starts itself: a private RabbitMQ node and an nx-27017
MongoDB-wire server, both on free loopback ports, both child processes of the caller.

Owns: the layout of an infra folder, the RabbitMQ and nx-27017 command lines and environment,
readiness checks, starting a server again the same way after it died (for the supervisor of
`make run`, devstack.supervisor), stopping (and making sure nothing is left running), and the
lock that keeps two owners off one folder. Used by `make run` (persistent=True) and by the
test session (persistent=False). The measured facts behind it are in the design notes
(LOCAL-INFRA.md).

Layout of an infra folder (``Infra.run_dir``)::

    devstack.lock          flock held by the owner for its whole life; holds the owner's pid
    seat-secret            the seat keys' HMAC secret of `make run` (devstack.stack), 0600
    devstack-state.json    pids, restarts and URLs, while `make run` supervises (supervisor)
    rabbitmq/              HOME of the node (Erlang cookie), rabbitmq.conf, enabled_plugins,
                           definitions.json (its users, with passwords new at each start),
                           plugins/ (symlinks), mnesia/ (queues and messages: kept between runs
                           when persistent)
    mongo/                 nx-27017 data, one SQLite file per database (mongo_storage="file",
                           the default when persistent)
    logs/                  epmd.log, rabbitmq.log (console), rabbitmq/<node>.log, mongo.log,
                           the services' <service>.log (devstack.stack), devstack.log
                           (restarts, devstack.supervisor)

A server started again (`InfraHandle.start_process`) gets the command line and environment of
its first start, so the same ports, node name and folders: the URLs the services hold stay
valid. A node killed by a signal leaves a pid file (removed before its restart) but no epmd
registration (that lives as long as the node's connection to epmd). A restarted epmd knows no
node: the running node registers only when it boots (RabbitMQ 3.10 re-checks every 60 s), so
the handle registers it on its behalf (`process_ready`).

The folder is its owner's alone (0700: it holds the seat secret, the state file's admin
token, the broker's passwords and every log). The broker has no `guest`: an administrator
(`Infra.amqp_url`: the operator's, the tests' and the bench's) and one user per service with
only the permissions it needs (`Infra.service_amqp_url(service)`; the rules are
services/common/bus/access.py), each with a password new at each start, imported from
`rabbitmq/definitions.json` at boot; a node from before that still has `guest` loses it once.

Every process started here (and by `devstack.stack`) carries ``DEVSTACK_RUN_DIR=<run_dir>`` in
its environment. Children of children inherit it (Erlang's erl_child_setup and inet_gethost,
rabbitmqctl's own VM), so `owned_processes()` finds all of them: stop() uses it to leave
nothing behind, and a new owner uses it to clear processes orphaned by a crashed one.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Literal, Self

import pymongo

from services.common.bus.access import (
    ADMIN_PERMISSIONS,
    PERMISSIONS,
    SERVICES,
    TOPIC_PERMISSIONS,
    user_of,
    with_credentials,
)

RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ_LIB = Path("/usr/lib/rabbitmq/lib")  # rabbitmq_server-<version>/plugins
# The RabbitMQ applications a node needs besides the libraries, per enabled plugin.
RABBITMQ_APPS = {
    "": ["rabbitmq_prelaunch"],
    "rabbitmq_management": ["rabbitmq_management_agent", "rabbitmq_web_dispatch"],
    "rabbitmq_prometheus": ["rabbitmq_management_agent", "rabbitmq_web_dispatch"],
}
MARKER_ENV = "DEVSTACK_RUN_DIR"
KEEP_ENV = "DEVSTACK_KEEP_RUN_DIR"  # set to 1 to keep a test infra folder (and its logs)
LOCK_NAME = "devstack.lock"
PERSISTENT_NODE = "canopy@localhost"
RABBIT_BOOT_TIMEOUT = 40.0
MONGO_BOOT_TIMEOUT = 15.0
POLL_INTERVAL = 0.05
PROBE_TIMEOUT = 0.5  # one readiness probe of a server (supervisor)
LOCK_PATIENCE = 1.0  # how long a persistent owner retries a lock a sweeper holds
LOG_TAIL_LINES = 40
BROKER_USER = "canopy"  # the administrator; each service has its own (`user_of`)
NO_GUEST_MARKER = "no-guest"  # in rabbitmq/: this node's guest user is gone
RUN_DIR_MODE = 0o700  # an infra folder: its owner's only
SECRET_MODE = 0o600  # a file in it that holds a secret

Popen = subprocess.Popen[bytes]


class InfraError(RuntimeError):
    """Infrastructure could not be started (the message carries the relevant log tail)."""


class InfraBusy(InfraError):
    """Another owner (a running `make run`) holds the infra folder."""


@dataclass(frozen=True)
class Infra:
    amqp_url: str  # the broker's administrator (every node's URL, comma-separated, in a cluster)
    mongo_url: str
    rabbit_node: str
    run_dir: Path
    management_url: str | None = None  # RabbitMQ management UI, when enabled
    # rabbitmq_prometheus's /metrics (per queue: depth, consumers), when enabled (monitoring)
    prometheus_url: str | None = None
    # The password of each service's own broker user (`service_amqp_url`).
    service_passwords: dict[str, str] = field(default_factory=dict, repr=False)

    def service_amqp_url(self, service: str) -> str:
        """`amqp_url` (every node's) as `service`'s own broker user, which may do only what
        that service does (services/common/bus/access.py)."""
        return with_credentials(self.amqp_url, user_of(service), self.service_passwords[service])


# --------------------------------------------------------------------------------------------
# Small helpers shared with devstack.stack


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago (bind to 0, read, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last `lines` lines of a log file, or a note that it does not exist."""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])


def log_tails(*paths: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Tails of several logs, each under a `--- path ---` header."""
    return "\n".join(f"--- {path} ---\n{log_tail(path, lines)}" for path in paths)


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    failed: Callable[[], str | None] = lambda: None,
    poll: float = POLL_INTERVAL,
) -> None:
    """Poll `ready()` every `poll` s until it is true; raise InfraError after `timeout`
    seconds or as soon as `failed()` returns a reason (e.g. the process exited)."""
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        reason = failed()
        if reason is not None:
            raise InfraError(f"{what}: {reason}")
        if time.monotonic() > deadline:
            raise InfraError(f"{what}: not ready after {timeout:.0f} s")
        time.sleep(poll)


def owned_processes(run_dir: Path) -> list[int]:
    """PIDs of live processes whose environment says they belong to `run_dir`."""
    needle = f"{MARKER_ENV}={run_dir.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in environ.split(b"\0") and _is_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def terminate_owned(run_dir: Path, *, grace: float) -> None:
    """End every process owned by `run_dir`: SIGTERM, up to `grace` s to exit, then SIGKILL."""
    pids = owned_processes(run_dir)
    if grace > 0:
        _signal_all(pids, signal.SIGTERM)
        with contextlib.suppress(InfraError):
            wait_until(lambda: not any(map(_is_alive, pids)), timeout=grace, what="stop")
    _signal_all(pids, signal.SIGKILL)
    # Dead is enough: orphans are reaped by init, our children by whoever holds their Popen.
    try:
        wait_until(lambda: not owned_processes(run_dir), timeout=10, what="SIGKILL")
    except InfraError:
        raise InfraError(
            f"processes of {run_dir} still alive 10 s after SIGKILL: {owned_processes(run_dir)}"
        ) from None


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _is_alive(pid: int) -> bool:
    """True unless the process is gone or a zombie (dead, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _try_flock(lock: IO[str]) -> bool:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def child_env(run_dir: Path, extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment minus RabbitMQ / Erlang settings, plus the ownership marker."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RABBITMQ_", "ERL_")) and k != MARKER_ENV
    }
    env[MARKER_ENV] = str(run_dir.resolve())
    env.update(extra)
    return env


def spawn(args: list[str], *, env: dict[str, str], log: Path, cwd: Path | None = None) -> Popen:
    """Start a child process in a session of its own (a Ctrl-C in the terminal reaches only
    our Python process, which then stops children in order), output appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        return subprocess.Popen(
            args,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold SIGINT / SIGTERM / SIGHUP until the block is done: a Ctrl-C that arrives while
    processes are being stopped takes effect after that, instead of cutting it short."""
    signals = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def stop_process(proc: Popen, *, grace: float) -> None:
    """SIGTERM and wait up to `grace` s (grace=0: SIGKILL at once), then SIGKILL and reap."""
    if proc.poll() is not None:
        return
    if grace > 0:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
            return
    proc.kill()
    proc.wait()


# --------------------------------------------------------------------------------------------
# The handle

# The servers of an infra folder, in the order they start (epmd before the node).
INFRA_PROCESSES = ("epmd", "rabbitmq", "mongo")
MongoStorage = Literal["file", "memory"]


@dataclass(frozen=True)
class _Command:
    """How one server is started. Ports and folders are fixed at the first start, so a server
    started again is reachable at the URLs the services already hold."""

    args: list[str]
    env: dict[str, str]
    log: Path


class InfraHandle:
    """Running infrastructure: `.infra` says where it is; `.stop()` (or leaving the `with`
    block) ends every process it started. Build it with `start_infra()`.

    For a supervisor (`devstack.supervisor`): `.processes` holds the current process of each
    server (INFRA_PROCESSES); `.start_process(name)` starts one again after it exited, the
    same way; `.probe(name)` says quickly whether it serves; `.waiting_for(name)`,
    `.process_exited(name)` and `.process_ready(name)` keep epmd and the node in step."""

    def __init__(
        self,
        run_dir: Path,
        *,
        persistent: bool,
        management: bool,
        mongo_storage: MongoStorage,
        prometheus: bool = False,
    ) -> None:
        self.run_dir = run_dir.resolve()
        self.persistent = persistent
        self.management = management
        self.prometheus = prometheus
        self.prometheus_port: int | None = None
        self.mongo_storage: MongoStorage = mongo_storage
        self.rabbit_node = (
            PERSISTENT_NODE if persistent else f"canopy-{self.run_dir.name}@localhost"
        )
        self._lock: IO[str] | None = None
        self._procs: dict[str, Popen] = {}
        self._commands: dict[str, _Command] = {}
        self._infra: Infra | None = None
        self._stopped = False
        self._env: dict[str, str] = {}  # the node's, epmd's and rabbitmqctl's
        self.epmd_port = 0
        self.amqp_port = 0
        # The broker's administrator and each service's user (no guest), their passwords new
        # at each start (definitions).
        self.broker_user = BROKER_USER
        self._broker_password = secrets.token_urlsafe(24)
        self._service_passwords: dict[str, str] = {
            name: secrets.token_urlsafe(24) for name in SERVICES
        }
        self.mongo_port = 0
        # What the node registered with epmd (a PORT2_RESP body), once it was ready, and the
        # connection that holds that registration on its behalf after epmd was restarted.
        self._node_registration: bytes | None = None
        self._stand_in: socket.socket | None = None

    @property
    def infra(self) -> Infra:
        if self._infra is None:
            raise RuntimeError("infra is not started")
        return self._infra

    @property
    def logs_dir(self) -> Path:
        return self.run_dir / "logs"

    @property
    def rabbit_dir(self) -> Path:
        return self.run_dir / "rabbitmq"

    @property
    def rabbit_short_name(self) -> str:
        return self.rabbit_node.split("@")[0]

    @property
    def processes(self) -> dict[str, Popen]:
        """The current process of each server started so far, by name."""
        return dict(self._procs)

    def log_path(self, name: str) -> Path:
        """The log a server writes itself (the node's own log for rabbitmq)."""
        if name == "rabbitmq":
            return self.logs_dir / "rabbitmq" / f"{self.rabbit_node}.log"
        return self.logs_dir / f"{self._check_name(name)}.log"

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def exited(self) -> list[str]:
        """Names of servers whose process has exited."""
        return [name for name, p in self._procs.items() if p.poll() is not None]

    # -- start ---------------------------------------------------------------------------

    def _start(self) -> None:
        self._take_lock()
        self.run_dir.chmod(RUN_DIR_MODE)
        # Whatever still runs with our marker was orphaned by a previous owner that died.
        terminate_owned(self.run_dir, grace=10 if self.persistent else 0)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        # Start nx-27017 first: it boots while RabbitMQ does (readiness checked after).
        self._spawn_mongo()
        management_port = self._start_rabbit()
        self._await_mongo()
        self._infra = Infra(
            amqp_url=f"amqp://{self.broker_user}:{self._broker_password}@127.0.0.1:{self.amqp_port}/",
            mongo_url=f"mongodb://127.0.0.1:{self.mongo_port}/",
            rabbit_node=self.rabbit_node,
            run_dir=self.run_dir,
            management_url=(
                f"http://127.0.0.1:{management_port}/" if management_port is not None else None
            ),
            prometheus_url=(
                f"http://127.0.0.1:{self.prometheus_port}/metrics"
                if self.prometheus_port is not None
                else None
            ),
            service_passwords=dict(self._service_passwords),
        )

    def _take_lock(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = (self.run_dir / LOCK_NAME).open("a+")
        try:
            if self.persistent:
                # Refuse a second owner, but not a sweeper (clear_stale_test_folders) that
                # holds the lock of a folder it found for a moment.
                wait_until(lambda: _try_flock(lock), timeout=LOCK_PATIENCE, what="lock", poll=0.02)
            else:  # a test folder is new and ours: block
                fcntl.flock(lock, fcntl.LOCK_EX)
        except InfraError:
            lock.seek(0)
            owner = lock.read().strip() or "?"
            lock.close()
            raise InfraBusy(
                f"{self.run_dir} is in use by another `make run` (pid {owner}). "
                "Stop that one first (Ctrl-C in its terminal), or use another checkout."
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def _spawn_mongo(self) -> None:
        self.mongo_port = free_port()
        if self.mongo_storage == "file":
            # --data-dir: one SQLite file per database. A single --db file would share
            # collections between database names, which real MongoDB never does.
            data_dir = self.run_dir / "mongo"
            data_dir.mkdir(exist_ok=True)
            db_args = ["--data-dir", str(data_dir)]
        else:
            db_args = ["--db", "memory"]
        # nx-27017 through devstack.nx_server (a dead client's open transaction rolled back),
        # with the interpreter of the running venv: `make` does not activate the venv.
        self._commands["mongo"] = _Command(
            args=[
                sys.executable,
                "-m",
                "devstack.nx_server",
                *db_args,
                "--host",
                "127.0.0.1",
                "-p",
                str(self.mongo_port),
                "--log-file",
                str(self.logs_dir / "mongo.log"),
                "--pid-file",
                str(self.run_dir / "mongo.pid"),
            ],
            env=child_env(self.run_dir, {}),
            log=self.logs_dir / "mongo-console.log",
        )
        self._spawn("mongo")

    def _await_mongo(self) -> None:
        """Ready when it accepts a TCP connection and answers PyMongo's `ping`."""
        mongo = self._procs["mongo"]
        try:
            wait_until(
                lambda: mongo_answers(self.mongo_port),
                timeout=MONGO_BOOT_TIMEOUT,
                what=f"nx-27017 on port {self.mongo_port}",
                failed=lambda: _exit_reason(mongo),
            )
        except InfraError as e:
            tails = log_tails(self.logs_dir / "mongo.log", self.logs_dir / "mongo-console.log")
            raise InfraError(f"{e}\n{tails}") from None

    def _start_rabbit(self) -> int | None:
        """Start our own epmd and the node; return the management port (or None)."""
        if not (RABBITMQ_BIN / "rabbitmq-server").exists():
            raise InfraError(f"{RABBITMQ_BIN}/rabbitmq-server not found: run `make install`")
        rabbit_dir = self.rabbit_dir
        rabbit_dir.mkdir(exist_ok=True)
        self.amqp_port, dist_port, self.epmd_port = free_port(), free_port(), free_port()
        management_port = free_port() if self.management else None
        definitions = rabbit_dir / "definitions.json"
        fd = os.open(definitions, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_MODE)
        with os.fdopen(fd, "w") as f:
            users = {user_of(name): password for name, password in self._service_passwords.items()}
            json.dump(broker_definitions(self.broker_user, self._broker_password, users), f)
        if not (rabbit_dir / "mnesia").exists():
            # A node that boots with definitions to import makes no default user (guest).
            (rabbit_dir / NO_GUEST_MARKER).touch()
        conf = [
            f"listeners.tcp.default = 127.0.0.1:{self.amqp_port}",
            "loopback_users = none",
            # Imported at every boot (a restarted node too): the user of this start.
            f"load_definitions = {definitions}",
        ]
        if management_port is not None:
            conf += ["management.tcp.ip = 127.0.0.1", f"management.tcp.port = {management_port}"]
        if self.prometheus:
            self.prometheus_port = free_port()
            conf += [
                "prometheus.tcp.ip = 127.0.0.1",
                f"prometheus.tcp.port = {self.prometheus_port}",
                # Per-queue series (depth, consumers) on /metrics: the queue-without-consumer
                # alert and the dashboard's queue depths need the queue label.
                "prometheus.return_per_object_metrics = true",
            ]
        (rabbit_dir / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        plugins = ["rabbitmq_management"] if self.management else []
        if self.prometheus:
            plugins.append("rabbitmq_prometheus")
        (rabbit_dir / "enabled_plugins").write_text(f"[{','.join(plugins)}].\n")
        plugins_dir = _slim_plugins_dir(rabbit_dir / "plugins", plugins)
        (rabbit_dir / "rabbitmq-env.conf").write_text("")  # so the system one is not read
        loopback_dist = "-kernel inet_dist_use_interface {127,0,0,1}"
        self._env = child_env(
            self.run_dir,
            {
                "HOME": str(rabbit_dir),
                "RABBITMQ_NODENAME": self.rabbit_node,
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                "RABBITMQ_NODE_PORT": str(self.amqp_port),
                "RABBITMQ_DIST_PORT": str(dist_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1",
                "ERL_EPMD_PORT": str(self.epmd_port),
                "RABBITMQ_MNESIA_BASE": str(rabbit_dir / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.logs_dir / "rabbitmq"),
                "RABBITMQ_PID_FILE": str(rabbit_dir / "rabbitmq.pid"),
                "RABBITMQ_CONFIG_FILE": str(rabbit_dir / "rabbitmq"),  # without .conf
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(rabbit_dir / "enabled_plugins"),
                "RABBITMQ_PLUGINS_DIR": str(plugins_dir),
                "RABBITMQ_CONF_ENV_FILE": str(rabbit_dir / "rabbitmq-env.conf"),
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": loopback_dist,
                # rabbitmqctl: its own distribution port chosen by the OS (default is a fixed
                # 35672-35682 range that a free port picked above could fall into), loopback.
                "RABBITMQ_CTL_DIST_PORT_MIN": "0",
                "RABBITMQ_CTL_DIST_PORT_MAX": "0",
                "RABBITMQ_CTL_ERL_ARGS": loopback_dist,
                # ALLOW_INPUT makes the script `exec erl` (no shell in between), so our child
                # *is* the node's VM and SIGTERM reaches RabbitMQ's own graceful stop. Input
                # is still disabled (-noinput) and SIGINT ignored (+B i).
                "RABBITMQ_ALLOW_INPUT": "1",
                "RABBITMQ_SERVER_START_ARGS": "-noinput +B i",
            },
        )
        self._commands["epmd"] = _Command(
            args=["epmd", "-address", "127.0.0.1", "-port", str(self.epmd_port)],
            env=self._env,
            log=self.logs_dir / "epmd.log",
        )
        self._commands["rabbitmq"] = _Command(
            args=[str(RABBITMQ_BIN / "rabbitmq-server")],
            env=self._env,
            log=self.logs_dir / "rabbitmq.log",
        )
        epmd = self._spawn("epmd")
        wait_until(
            lambda: epmd_names(self.epmd_port) is not None,
            timeout=10,
            what=f"epmd on port {self.epmd_port}",
            failed=lambda: _exit_reason(epmd, self.logs_dir / "epmd.log"),
        )

        rabbit = self._spawn("rabbitmq")
        short_name = self.rabbit_short_name
        try:
            # Cheap check first (no CLI VM per try): the node registered with our epmd.
            wait_until(
                lambda: short_name in (epmd_names(self.epmd_port) or {}),
                timeout=RABBIT_BOOT_TIMEOUT,
                what=f"RabbitMQ node {self.rabbit_node}",
                failed=lambda: _exit_reason(rabbit),
            )
            timeout = str(int(RABBIT_BOOT_TIMEOUT))
            result = self.rabbitmqctl(
                "await_startup", "--timeout", timeout, timeout=RABBIT_BOOT_TIMEOUT + 10
            )
            if result.returncode != 0:
                raise InfraError(
                    f"RabbitMQ node {self.rabbit_node}: await_startup failed "
                    f"({_exit_reason(rabbit) or f'exit {result.returncode}'}):\n{result.stdout}"
                )
        except (InfraError, subprocess.TimeoutExpired) as e:
            raise InfraError(f"{e}\n{self._rabbit_log_tails()}") from None
        self._node_registration = epmd_registration(self.epmd_port, short_name)
        self._drop_guest()
        return management_port

    def _drop_guest(self) -> None:
        """A kept node (make run) made before devstack imported definitions has `guest`
        (guest / guest): delete it, once (one CLI call, about 1 s; then the marker file)."""
        marker = self.rabbit_dir / NO_GUEST_MARKER
        if marker.exists():
            return
        result = self.rabbitmqctl("delete_user", "guest")
        if result.returncode != 0 and "does not exist" not in result.stdout:
            raise InfraError(f"RabbitMQ: deleting the user guest failed:\n{result.stdout}")
        marker.touch()

    def _spawn(self, name: str) -> Popen:
        command = self._commands[name]
        proc = spawn(command.args, env=command.env, log=command.log)
        self._procs[name] = proc
        return proc

    def _rabbit_log_tails(self) -> str:
        return log_tails(self.log_path("rabbitmq"), self.logs_dir / "rabbitmq.log")

    def rabbitmqctl(self, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """Run `rabbitmqctl -n <node> ARGS` against this node (output in .stdout)."""
        return rabbitmqctl(self.rabbit_node, self._env, *args, timeout=timeout)

    # -- start again (for a supervisor) ----------------------------------------------------

    def start_process(self, name: str) -> Popen:
        """Start one server again after its process exited, exactly as the first time: the
        same command line and environment, hence the same ports, node name, mnesia and data
        folders. Does not wait; `.probe(name)` tells when it serves again."""
        self._check_name(name)
        current = self._procs.get(name)
        if current is not None and current.poll() is None:
            raise InfraError(f"{name} is still running (pid {current.pid})")
        if name == "rabbitmq":
            # A node killed by a signal leaves its pid file; epmd forgot it by itself (the
            # registration lives as long as the node's connection to epmd).
            self._drop_stand_in()
            with contextlib.suppress(FileNotFoundError):
                (self.rabbit_dir / "rabbitmq.pid").unlink()
        elif name == "epmd":
            self._end_stray_epmds()
        elif name == "mongo":
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir / "mongo.pid").unlink()
        return self._spawn(name)

    def waiting_for(self, name: str) -> str | None:
        """What `name` must wait for before it may start again, or None. The node waits for
        epmd: started without one, it would start an epmd of its own on our port."""
        if name == "rabbitmq" and epmd_names(self.epmd_port) is None:
            return "epmd"
        return None

    def probe(self, name: str) -> bool:
        """Whether a server serves now; answers within about a second. epmd: answers a NAMES
        request. rabbitmq: answers the AMQP protocol header (its listener opens at the end
        of its boot). mongo: answers `ping`."""
        self._check_name(name)
        if name == "epmd":
            return epmd_names(self.epmd_port) is not None
        if name == "rabbitmq":
            return amqp_answers(self.amqp_port)
        return mongo_answers(self.mongo_port)

    def process_exited(self, name: str) -> None:
        """A supervisor saw `name` exit."""
        if name in ("rabbitmq", "epmd"):
            self._drop_stand_in()
        if name == "rabbitmq":
            self._node_registration = None

    def process_ready(self, name: str) -> str | None:
        """A supervisor saw `name` serve again. Returns a note for its log, or None.

        The node registers with epmd once, when it boots: after epmd was restarted it would
        stay unknown to it (so to rabbitmqctl) until RabbitMQ's epmd monitor re-registers it,
        60 s later in 3.10. So we register it on its behalf at once, with the very fields it
        registered itself; the registration lasts as long as our connection to epmd, which we
        close when the node exits (its next boot registers itself)."""
        if name == "rabbitmq":
            self._node_registration = epmd_registration(self.epmd_port, self.rabbit_short_name)
        if name not in ("rabbitmq", "epmd") or self._node_registration is None:
            return None
        rabbit = self._procs.get("rabbitmq")
        names = epmd_names(self.epmd_port)
        if rabbit is None or rabbit.poll() is not None or names is None:
            return None
        if self.rabbit_short_name in names or self._stand_in is not None:
            return None
        self._stand_in = epmd_register(self.epmd_port, self._node_registration)
        return f"registered {self.rabbit_node} with epmd on its behalf"

    def _drop_stand_in(self) -> None:
        if self._stand_in is not None:
            self._stand_in.close()
            self._stand_in = None

    def _end_stray_epmds(self) -> None:
        """While our epmd is down, the node itself may start one (RabbitMQ's epmd monitor
        does, and so does any Erlang VM started with our environment): it carries our marker
        and holds our port. End it, so that ours can bind again."""
        strays = [pid for pid in owned_processes(self.run_dir) if _comm(pid) == "epmd"]
        _signal_all(strays, signal.SIGKILL)
        with contextlib.suppress(InfraError):
            wait_until(lambda: not any(map(_is_alive, strays)), timeout=2, what="stray epmd")

    def _check_name(self, name: str) -> str:
        if name not in INFRA_PROCESSES:
            raise ValueError(f"unknown server {name!r}; one of {', '.join(INFRA_PROCESSES)}")
        return name

    # -- stop ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop everything started here. Persistent: RabbitMQ's clean shutdown (SIGTERM; about
        1 s, 6 s with the management plugin). Throwaway: SIGKILL, then delete the folder.
        Idempotent; safe after a failed start."""
        if self._stopped:
            return
        self._stopped = True
        grace = 30.0 if self.persistent else 0.0
        with deferred_signals():
            self._stop(grace)

    def _stop(self, grace: float) -> None:
        try:
            for name in ("rabbitmq", "mongo", "epmd"):
                if name in self._procs:
                    stop_process(self._procs[name], grace=grace)
            self._drop_stand_in()
            if self._lock is not None:  # only the owner may sweep the folder
                terminate_owned(self.run_dir, grace=0)
                if not self.persistent and os.environ.get(KEEP_ENV) != "1":
                    shutil.rmtree(self.run_dir, ignore_errors=True)
        finally:
            if self._lock is not None:
                self._lock.close()  # releases the flock
                self._lock = None


def broker_definitions(
    admin: str, password: str, services: dict[str, str] | None = None
) -> dict[str, object]:
    """RabbitMQ definitions of a node with an administrator (every permission on `/`, the
    management UI) and, for each service's user in `services` (user: password), that
    service's permissions only (services/common/bus/access.py); passwords hashed as RabbitMQ
    does (rabbit_password_hashing_sha256: base64 of a 4-byte salt and SHA-256 of salt +
    password)."""
    service_of = {user_of(name): name for name in SERVICES}
    users, permissions, topic_permissions = [], [], []
    for user, secret in {admin: password, **(services or {})}.items():
        service = service_of.get(user) if user != admin else None
        salt = secrets.token_bytes(4)
        digest = hashlib.sha256(salt + secret.encode()).digest()
        users.append(
            {
                "name": user,
                "password_hash": base64.b64encode(salt + digest).decode(),
                "hashing_algorithm": "rabbit_password_hashing_sha256",
                "tags": ["administrator"] if service is None else [],
            }
        )
        allowed = ADMIN_PERMISSIONS if service is None else PERMISSIONS[service]
        permissions.append(
            {
                "user": user,
                "vhost": "/",
                "configure": allowed.configure,
                "write": allowed.write,
                "read": allowed.read,
            }
        )
        topic = TOPIC_PERMISSIONS.get(service) if service is not None else None
        if topic is not None:
            topic_permissions.append(
                {
                    "user": user,
                    "vhost": "/",
                    "exchange": topic.exchange,
                    "write": topic.write,
                    "read": topic.read,
                }
            )
    return {
        "users": users,
        "vhosts": [{"name": "/"}],
        "permissions": permissions,
        "topic_permissions": topic_permissions,
    }


def _slim_plugins_dir(folder: Path, plugins: list[str]) -> Path:
    """A plugins folder with symlinks to every library but only the RabbitMQ plugins we
    enable. The node scans every application in that folder while it boots: with the 70 of
    Debian's package it takes about 0.8 s longer (measured 5.8 s vs 5.0 s)."""
    installed = sorted(RABBITMQ_LIB.glob("rabbitmq_server-*/plugins"))
    if not installed:
        raise InfraError(f"no {RABBITMQ_LIB}/rabbitmq_server-*/plugins: run `make install`")
    wanted = {app for plugin in ["", *plugins] for app in [plugin, *RABBITMQ_APPS[plugin]]}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    for app in installed[-1].iterdir():
        name = app.name.rsplit("-", 1)[0]  # "rabbitmq_management-3.10.8"
        if not name.startswith("rabbitmq_") or name in wanted:
            (folder / app.name).symlink_to(app)
    return folder


def _exit_reason(proc: Popen, log: Path | None = None) -> str | None:
    code = proc.poll()
    if code is None:
        return None
    reason = f"process {proc.pid} exited with {code}"
    return f"{reason}\n{log_tails(log)}" if log else reason


def rabbitmqctl(
    node: str, env: dict[str, str], *args: str, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """`rabbitmqctl -n <node> ARGS` with the node's environment (cookie, epmd), output in
    .stdout; its exit status is the caller's to judge."""
    return subprocess.run(
        [str(RABBITMQ_BIN / "rabbitmqctl"), "-n", node, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def epmd_names(port: int) -> dict[str, int] | None:
    """Ask an epmd for its registered nodes (NAMES_REQ); None if it does not answer."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(struct.pack(">HB", 1, 110))  # length 1, NAMES_REQ ('n')
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return None
    if len(data) < 4:
        return None
    names = {}
    for line in data[4:].decode(errors="replace").splitlines():
        # "name canopy at port 41234"
        parts = line.split()
        if len(parts) == 5 and parts[0] == "name":
            names[parts[1]] = int(parts[4])
    return names


def epmd_registration(port: int, short_name: str) -> bytes | None:
    """What a node registered with an epmd (PORT_PLEASE2_REQ): the body of the answer (dist
    port, node type, protocol, versions, name, extra), the very fields of its ALIVE2_REQ; None
    if epmd does not answer or does not know the node."""
    name = short_name.encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            sock.sendall(struct.pack(">HB", 1 + len(name), 122) + name)  # PORT_PLEASE2_REQ
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
    except OSError:
        return None
    if len(data) < 2 or data[0] != 119 or data[1] != 0:  # PORT2_RESP, result 0 = known
        return None
    return data[2:]


def epmd_register(port: int, registration: bytes) -> socket.socket:
    """Register a node with an epmd on its behalf (ALIVE2_REQ with `registration`, as read by
    `epmd_registration`). The registration lasts as long as the returned socket is open."""
    request = bytes([120]) + registration  # ALIVE2_REQ
    sock = socket.create_connection(("127.0.0.1", port), timeout=1)
    try:
        sock.sendall(struct.pack(">H", len(request)) + request)
        answer = sock.recv(8)  # ALIVE2_RESP (121) or ALIVE2_X_RESP (118), result, creation
    except OSError as e:
        sock.close()
        raise InfraError(f"epmd on port {port}: registering failed: {e}") from None
    if len(answer) < 2 or answer[0] not in (118, 121) or answer[1] != 0:
        sock.close()
        raise InfraError(f"epmd on port {port} refused the registration: {answer!r}")
    return sock


def amqp_answers(port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if an AMQP 0-9-1 server on `port` answers the protocol header with a frame (its
    Connection.Start); we close before logging in."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"AMQP\x00\x00\x09\x01")
            return sock.recv(1) == b"\x01"  # a method frame
    except OSError:
        return False


def mongo_answers(port: int, timeout: float = PROBE_TIMEOUT) -> bool:
    """True if a MongoDB-wire server on `port` accepts a connection and answers `ping`."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=timeout).close()
    except OSError:
        return False
    ms = int(timeout * 1000)
    client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
        f"mongodb://127.0.0.1:{port}/", serverSelectionTimeoutMS=ms, connectTimeoutMS=ms
    )
    try:
        client.admin.command("ping")
    except pymongo.errors.PyMongoError:
        return False
    finally:
        client.close()
    return True


# --------------------------------------------------------------------------------------------
# Entry point


def start_infra(
    run_dir: Path,
    *,
    persistent: bool,
    management: bool | None = None,
    mongo_storage: MongoStorage | None = None,
    prometheus: bool = False,
) -> InfraHandle:
    """Start RabbitMQ and nx-27017 and wait until both answer.

    persistent=True (`make run`): everything lives in `run_dir` itself and survives a restart
    (node `canopy@localhost`, mnesia, one SQLite file per database); a second owner of the
    same folder gets `InfraBusy`. persistent=False (tests): a fresh `run_dir/test-<pid>-<hex>`
    folder, in-memory MongoDB, deleted at stop; leftovers of crashed test runs are cleared.
    management: enable the RabbitMQ management UI (default: only when persistent, since it
    makes a clean stop 5 s slower and tests kill the node anyway).
    mongo_storage: "file" (SQLite files in `<folder>/mongo/`: a restarted nx-27017 finds its
    data again) or "memory"; default "file" when persistent, else "memory".
    prometheus: enable rabbitmq_prometheus (`Infra.prometheus_url`), for monitoring.
    """
    run_dir = run_dir.resolve()
    if management is None:
        management = persistent
    if mongo_storage is None:
        mongo_storage = "file" if persistent else "memory"
    if persistent:
        folder = run_dir
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        clear_stale_test_folders(run_dir)
        folder = run_dir / f"test-{os.getpid()}-{secrets.token_hex(3)}"
        folder.mkdir()
    handle = InfraHandle(
        folder,
        persistent=persistent,
        management=management,
        mongo_storage=mongo_storage,
        prometheus=prometheus,
    )
    try:
        handle._start()
    except BaseException:
        handle.stop()
        raise
    return handle


def clear_stale_test_folders(base: Path, pattern: str = "test-*") -> None:
    """Remove test folders (`pattern` in `base`) whose owner is gone (their lock is free),
    with their processes."""
    for folder in base.glob(pattern):
        lock_path = folder / LOCK_NAME
        try:
            lock = lock_path.open("r+")
        except OSError:
            continue
        with lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # alive
            if not lock.read().strip():
                continue  # being created right now: its owner writes its pid once locked
            terminate_owned(folder, grace=0)
            if os.environ.get(KEEP_ENV) != "1":  # a kept folder outlives its owner's sweep
                shutil.rmtree(folder, ignore_errors=True)
