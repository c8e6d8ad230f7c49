"""The benchmark's own stack: the same code as `make run`, on free loopback ports.

RabbitMQ and nx-27017 come from `devstack.infra.start_infra(.run/, persistent=False)` (a
throwaway `.run/test-<pid>-<hex>/` folder, deleted at the end), the four services from
`devstack.stack.start_stack`. By default (`--store disk`) the store writes to an nx-27017 of
our own with one SQLite file per database in that folder, as `make run` does, so the event
log is durable as in production; `--store memory` uses the infra's in-memory nx-27017.
Everything is stopped when the `with` block ends, also on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import socket
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pymongo

from bench.procstats import ProcessSet
from devstack.infra import (
    Infra,
    InfraHandle,
    Popen,
    child_env,
    free_port,
    log_tails,
    owned_processes,
    spawn,
    start_infra,
    stop_process,
    wait_until,
)
from devstack.stack import PROJECT_ROOT, SERVICES, StackHandle, start_stack

RUN_DIR = PROJECT_ROOT / ".run"
MONGO_BOOT_TIMEOUT = 15.0
StoreKind = Literal["disk", "memory"]


@dataclass
class OwnStack:
    infra_handle: InfraHandle
    infra: Infra  # what the services use (mongo_url may be our disk-backed nx-27017)
    stack: StackHandle
    mongo_pid: int
    queue_type: str
    store: StoreKind

    @property
    def broker_metrics_url(self) -> str | None:
        """RabbitMQ's Prometheus page (its global message counters), when enabled."""
        return self.infra_handle.infra.prometheus_url

    def processes(self) -> ProcessSet:
        pids = {name: proc.pid for name, proc in self.stack.processes.items()}
        pids["rabbitmq"] = rabbit_pid(self.infra_handle.run_dir)
        pids["mongodb"] = self.mongo_pid
        pids["loadgen"] = os.getpid()
        return ProcessSet({k: v for k, v in pids.items() if v})


def raise_fd_limit() -> None:
    """1,000 participants need 1,000 sockets here and 1,000 in the gateway (our child)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def rabbit_pid(run_dir: Path) -> int:
    """The node's VM (`beam.smp`): from the pid file the infra configures, else the owned
    process of that name."""
    candidates: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        candidates.append(int((run_dir / "rabbitmq" / "rabbitmq.pid").read_text().split()[0]))
    candidates += owned_processes(run_dir)
    for pid in candidates:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "beam.smp":
                return pid
    return 0


def mongo_pid(run_dir: Path) -> int:
    try:
        return int((run_dir / "mongo.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _nx_path() -> str:
    nx = Path(sys.executable).parent / "nx-27017"
    return str(nx) if nx.exists() else "nx-27017"


@contextlib.contextmanager
def disk_mongo(infra: Infra) -> Iterator[tuple[str, Popen]]:
    """An nx-27017 with a data folder (SQLite, WAL) inside the infra folder, as `make run`
    uses; carries the infra's ownership marker, so the infra's stop also ends it."""
    port = free_port()
    folder = infra.run_dir / "bench-mongo"
    folder.mkdir(exist_ok=True)
    logs = infra.run_dir / "logs"
    proc = spawn(
        [
            _nx_path(),
            "--data-dir",
            str(folder),
            "--host",
            "127.0.0.1",
            "-p",
            str(port),
            "--log-file",
            str(logs / "bench-mongo.log"),
            "--pid-file",
            str(infra.run_dir / "bench-mongo.pid"),
        ],
        env=child_env(infra.run_dir, {}),
        log=logs / "bench-mongo-console.log",
    )
    url = f"mongodb://127.0.0.1:{port}/"

    def ready() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            client: pymongo.MongoClient[dict[str, object]] = pymongo.MongoClient(
                url, serverSelectionTimeoutMS=1000, connectTimeoutMS=1000
            )
            try:
                client.admin.command("ping")
            finally:
                client.close()
        except (OSError, pymongo.errors.PyMongoError):
            return False
        return True

    try:
        wait_until(
            ready,
            timeout=MONGO_BOOT_TIMEOUT,
            what=f"nx-27017 (disk) on port {port}",
            failed=lambda: None if proc.poll() is None else f"exited with {proc.returncode}",
        )
    except BaseException as e:
        stop_process(proc, grace=0)
        raise RuntimeError(f"{e}\n{log_tails(logs / 'bench-mongo.log')}") from None
    try:
        yield url, proc
    finally:
        stop_process(proc, grace=5)


@contextlib.contextmanager
def own_stack(
    *,
    queue_type: str = "quorum",
    store: StoreKind = "disk",
    say: bool = True,
    broker_stats: bool = True,
    run_dir: Path = RUN_DIR,
) -> Iterator[OwnStack]:
    """Start infra + services; stop them all when the block ends (also on KeyboardInterrupt).
    broker_stats: enable rabbitmq_prometheus, for broker messages per decision
    (bench/brokerstats.py; `OwnStack.broker_metrics_url`). run_dir: where the throwaway
    test-* folder (the broker's and MongoDB's data) goes; a tmpfs such as /dev/shm takes the
    disk's sync latency out of the run (bench/diskprobe.py)."""
    raise_fd_limit()
    with contextlib.ExitStack() as stack:
        if say:
            print(f"starting RabbitMQ and nx-27017 in {run_dir}/test-* ...", file=sys.stderr)
        infra_handle = stack.enter_context(
            start_infra(run_dir, persistent=False, prometheus=broker_stats)
        )
        infra = infra_handle.infra
        pid = mongo_pid(infra_handle.run_dir)
        if store == "disk":
            url, proc = stack.enter_context(disk_mongo(infra))
            infra, pid = dataclasses.replace(infra, mongo_url=url), proc.pid
        if say:
            print(
                f"starting the services (queues: {queue_type}, store: {store}) ...",
                file=sys.stderr,
            )
        services = stack.enter_context(
            start_stack(
                infra,
                infra_handle.run_dir,
                env_overrides={"CANOPY_QUEUE_TYPE": queue_type, "CANOPY_MONGO_DB": "bench"},
                ports={name: free_port() for name in SERVICES},
            )
        )
        yield OwnStack(infra_handle, infra, services, pid, queue_type, store)
        if say:
            print("stopping the stack ...", file=sys.stderr)
