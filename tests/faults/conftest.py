"""Fault injection against the real `make run` supervisor.

The harness runs ``python -m devstack run --run-dir .run/faults-<pid>-<hex> --no-demo
--mongo-file`` as a subprocess, exactly what `make run` runs, on free ports
(CANOPY_<SERVICE>_PORT), without the RabbitMQ management UI, with nx-27017 on files (a killed
one finds its data again). It reads the supervisor's state file
(``<run dir>/devstack-state.json``) to find each process, and its log
(``<run dir>/logs/devstack.log``) to see what the supervisor did.

Fixtures
--------
``supervised`` (module scope) -> ``Supervised``
    One stack for the whole test module (starting one takes about 10 s), ready when yielded:
    the state file exists and the gateway and store answer /readyz with 200. Tests of one
    module share it, so leave it serving: wait for what you killed to come back
    (`wait_restarted`) before the test ends.
``start_supervised(env=None)`` (a context manager, not a fixture)
    A stack of your own, e.g. to stop it: ``with start_supervised() as s: ...``.

``Supervised``, the handle
--------------------------
Process names (``PROCESSES``): ``store gateway decisions timers rabbitmq epmd mongo``.

``urls``
    ``{"gateway": "http://127.0.0.1:<port>", "store": ..., "decisions": ..., "timers": ...}``
``admin_token``, ``amqp_url``, ``mongo_url``, ``run_dir``, ``supervisor`` (its Popen)
``state() -> dict``
    The state file, parsed: ``{"pid", "processes": {name: {"pid", "state", "ready",
    "restarts", "started_at", "last_exit"}}, "urls", "admin_token", "amqp_url",
    "mongo_url", ...}``. ``pid`` is None while the process is down (backing off); ``state``
    is running / starting / backoff / waiting; ``started_at`` is Unix time.
``pid(name) -> int``
    The current pid of that process (LookupError while it is down).
``kill(name, sig=signal.SIGKILL) -> int``
    Signal that process (pid from the state file); returns the pid.
``wait_restarted(name, previous_pid, timeout=30.0) -> float``
    Wait until the state file names a new pid for `name` that the supervisor found ready
    (for a service: also its /readyz answers 200 here); returns the seconds since
    `kill(name)` of `previous_pid` (or since the call, if it was not killed through the
    handle). Raises AssertionError with the logs' tails after `timeout`.
``wait_started(name, previous_pid, timeout=30.0) -> int``
    Wait until the state file names a new pid for `name` (started, maybe not ready yet);
    return it.
``wait_state(predicate, *, timeout, what) -> dict``
    Wait until `predicate(state())` holds; return that state.
``respawn_delay(name, previous_pid) -> float``
    Seconds from `kill()` of `previous_pid` to the start of its successor (after
    `wait_restarted`).
``wait_ready(names=SERVICES, timeout=60.0)``
    Wait until every named service answers /readyz with 200 (after a broker restart the
    services reconnect by themselves, a few seconds later).
``log_path(name) -> Path``
    That process's log: ``logs/<service>.log``, ``logs/mongo.log``, ``logs/epmd.log``, the
    node's ``logs/rabbitmq/<node>.log``; ``"devstack"``: the supervisor's restart log;
    ``"supervisor"``: its terminal output.
``devstack_log() -> str``, ``log_lines(name) -> list[str]``
    The supervisor's log; its lines about one process (exits, starts, readiness).
``stop(sig=signal.SIGTERM, timeout=60.0) -> int``
    Signal the supervisor and wait for it to stop everything; its exit code. Teardown does
    this if the test did not.

A process killed again within 60 s of its restart is restarted after a longer delay (0.5, 1,
2, 4 ... s: the supervisor backs off); give `wait_restarted` a timeout that allows for it.
Set DEVSTACK_KEEP_RUN_DIR=1 to keep the run folder (logs) after the tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.infra import (
    KEEP_ENV,
    LOCK_NAME,
    MARKER_ENV,
    clear_stale_test_folders,
    free_port,
    log_tail,
    terminate_owned,
)
from devstack.stack import PROJECT_ROOT, SERVICES, port_variable
from devstack.supervisor import LOG_FILE, STATE_FILE

RUN_DIR = PROJECT_ROOT / ".run"
FOLDER_PREFIX = "faults-"
PROCESSES = (*SERVICES, "rabbitmq", "epmd", "mongo")
BOOT_TIMEOUT = 90.0  # the supervisor's own start: RabbitMQ (about 5 s) + the services
STOP_TIMEOUT = 60.0
POLL = 0.02
PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)  # loaded here: after fork, only call into it


class Supervised:
    """A running supervisor and its stack; see the module docstring."""

    def __init__(self, run_dir: Path, supervisor: subprocess.Popen[bytes]) -> None:
        self.run_dir = run_dir
        self.supervisor = supervisor
        self.state_path = run_dir / STATE_FILE
        self._kills: dict[int, tuple[float, float]] = {}  # pid -> (monotonic, Unix time)
        state = self.state()
        self.urls: dict[str, str] = state["urls"]
        self.admin_token: str = state["admin_token"]
        self.amqp_url: str = state["amqp_url"]
        self.mongo_url: str = state["mongo_url"]
        self.launch_env: dict[str, str] = {}  # the supervisor's environment (see `relaunch`)

    # -- the state file ------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(self.state_path.read_text())
        return state

    def pid(self, name: str) -> int:
        pid = self.state()["processes"][_check(name)]["pid"]
        if pid is None:
            raise LookupError(f"{name} is down (restart pending): {self.state()['processes']}")
        return int(pid)

    # -- faults --------------------------------------------------------------------------

    def kill(self, name: str, sig: signal.Signals = signal.SIGKILL) -> int:
        pid = self.pid(name)
        self._kills[pid] = (time.monotonic(), time.time())
        os.kill(pid, sig)
        return pid

    def wait_restarted(self, name: str, previous_pid: int, timeout: float = 30.0) -> float:
        since = self._kills.get(previous_pid, (time.monotonic(), 0.0))[0]
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while True:
                self._check_alive()
                entry = self._entry(name)
                if (
                    entry is not None
                    and entry["pid"] not in (None, previous_pid)
                    and entry["ready"]
                    and (name not in SERVICES or _ready(client, self.urls[name]))
                ):
                    return time.monotonic() - since
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"{name} (was pid {previous_pid}) not back and ready after "
                        f"{timeout:.0f} s; state: {entry}\n{self.diagnostics(name)}"
                    )
                time.sleep(POLL)

    def wait_started(self, name: str, previous_pid: int, timeout: float = 30.0) -> int:
        state = self.wait_state(
            lambda st: st["processes"][name]["pid"] not in (None, previous_pid),
            timeout=timeout,
            what=f"a new {name} process (was pid {previous_pid})",
        )
        pid: int = state["processes"][name]["pid"]
        return pid

    def wait_state(
        self, predicate: Callable[[dict[str, Any]], bool], *, timeout: float, what: str
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(FileNotFoundError):
                state = self.state()
                if predicate(state):
                    return state
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} after {timeout:.0f} s\n{self.diagnostics()}")
            time.sleep(POLL)

    def respawn_delay(self, name: str, previous_pid: int) -> float:
        killed_at = self._kills[previous_pid][1]
        started_at: float = self.state()["processes"][_check(name)]["started_at"]
        return started_at - killed_at

    def wait_ready(self, names: tuple[str, ...] = SERVICES, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        pending = list(names)
        with httpx.Client(timeout=1.0) as client:
            while pending:
                self._check_alive()
                pending = [n for n in pending if not _ready(client, self.urls[n])]
                if not pending:
                    return
                if time.monotonic() > deadline:
                    details = "\n".join(self.diagnostics(n) for n in pending)
                    raise AssertionError(f"not ready after {timeout:.0f} s: {pending}\n{details}")
                time.sleep(POLL)

    # -- logs ----------------------------------------------------------------------------

    def log_path(self, name: str) -> Path:
        logs = self.run_dir / "logs"
        if name == "devstack":
            return logs / LOG_FILE
        if name == "supervisor":
            return self.run_dir / "supervisor.out"
        if name == "rabbitmq":
            return logs / "rabbitmq" / f"{self.state()['rabbit_node']}.log"
        return logs / f"{_check(name)}.log"

    def devstack_log(self) -> str:
        try:
            return self.log_path("devstack").read_text()
        except FileNotFoundError:
            return ""

    def log_lines(self, name: str) -> list[str]:
        """The supervisor's log lines about `name` (`<time> <name> (pid ..) killed by ...`,
        `<time> <name>: started again ...`, `<time> <name>: ready again ...`)."""
        lines = [line.split(" ", 2) for line in self.devstack_log().splitlines()]
        return [" ".join(p) for p in lines if len(p) == 3 and p[1].rstrip(":") == name]

    def diagnostics(self, name: str | None = None) -> str:
        parts = [
            f"--- devstack.log ---\n{log_tail(self.log_path('devstack'))}",
            f"--- supervisor output ---\n{log_tail(self.log_path('supervisor'), 20)}",
        ]
        if name is not None:
            with contextlib.suppress(Exception):
                path = self.log_path(name)
                parts.append(f"--- {path} ---\n{log_tail(path, 30)}")
        return "\n".join(parts)

    # -- stop ----------------------------------------------------------------------------

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> int:
        if self.supervisor.poll() is None:
            self.supervisor.send_signal(sig)
        try:
            return self.supervisor.wait(timeout)
        except subprocess.TimeoutExpired:
            self.supervisor.kill()
            self.supervisor.wait()
            raise AssertionError(
                f"the supervisor did not stop within {timeout:.0f} s of {sig.name}\n"
                f"{self.diagnostics()}"
            ) from None

    def relaunch(self) -> float:
        """Stop the supervisor (SIGTERM: as Ctrl-C on `make run`) and run it again on the same
        folder, ports and admin token, as a person does who restarts `make run`; returns the
        seconds the stack was down (from the signal until it serves again)."""
        started = time.monotonic()
        self.stop()
        env = dict(self.launch_env) | {"CANOPY_ADMIN_TOKEN": self.admin_token}
        self.supervisor = _launch(self.run_dir, env)
        _await_boot(self.run_dir, self.supervisor)
        return time.monotonic() - started

    # -- helpers -------------------------------------------------------------------------

    def _entry(self, name: str) -> dict[str, Any] | None:
        try:
            entry: dict[str, Any] = self.state()["processes"][_check(name)]
        except FileNotFoundError:
            return None
        return entry

    def _check_alive(self) -> None:
        code = self.supervisor.poll()
        if code is not None:
            raise AssertionError(f"the supervisor exited with {code}\n{self.diagnostics()}")


def _check(name: str) -> str:
    if name not in PROCESSES:
        raise ValueError(f"unknown process {name!r}; one of {', '.join(PROCESSES)}")
    return name


def _ready(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def _die_with_parent() -> None:
    """In the supervisor, before exec: SIGTERM when the test process dies (a crashed or
    killed pytest), so that its stack does not outlive it."""
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@contextlib.contextmanager
def start_supervised(env: Mapping[str, str] | None = None) -> Iterator[Supervised]:
    """Run the supervisor as `make run` does, in a fresh folder under .run/, on free ports;
    yield once it serves; stop it (SIGTERM), end any leftover, remove the folder.

    `env`: extra environment for the supervisor (and so for every service), e.g.
    {"CANOPY_SHARDS": "2"}. CANOPY_* of the calling environment are not passed on."""
    RUN_DIR.mkdir(exist_ok=True)
    clear_stale_test_folders(RUN_DIR, f"{FOLDER_PREFIX}*")
    run_dir = RUN_DIR / f"{FOLDER_PREFIX}{os.getpid()}-{secrets.token_hex(3)}"
    run_dir.mkdir()
    child_env = {
        k: v for k, v in os.environ.items() if not k.startswith("CANOPY_") and k != MARKER_ENV
    }
    child_env.update({port_variable(name): str(free_port()) for name in SERVICES})
    child_env["DEVSTACK_RABBITMQ_MANAGEMENT"] = "0"
    child_env.update(env or {})
    supervisor = _launch(run_dir, child_env)
    handle: Supervised | None = None
    try:
        handle = _await_boot(run_dir, supervisor)
        handle.launch_env = child_env
        yield handle
    finally:
        if handle is not None:
            supervisor = handle.supervisor  # relaunch() may have replaced it
        try:
            if supervisor.poll() is None:
                supervisor.send_signal(signal.SIGTERM)
                try:
                    supervisor.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    supervisor.kill()
                    supervisor.wait()
        finally:
            if (run_dir / LOCK_NAME).exists():
                terminate_owned(run_dir, grace=0)
            if os.environ.get(KEEP_ENV) != "1":
                shutil.rmtree(run_dir, ignore_errors=True)


def _launch(run_dir: Path, env: Mapping[str, str]) -> subprocess.Popen[bytes]:
    command = [
        sys.executable,
        *("-m", "devstack", "run", "--run-dir", str(run_dir), "--no-demo", "--mongo-file"),
    ]
    with (run_dir / "supervisor.out").open("ab") as out:
        return subprocess.Popen(
            command,
            cwd=PROJECT_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )


def _await_boot(run_dir: Path, supervisor: subprocess.Popen[bytes]) -> Supervised:
    deadline = time.monotonic() + BOOT_TIMEOUT
    output = run_dir / "supervisor.out"
    while not (run_dir / STATE_FILE).exists():
        code = supervisor.poll()
        if code is not None:
            raise RuntimeError(f"the supervisor exited with {code}:\n{log_tail(output)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no {STATE_FILE} after {BOOT_TIMEOUT:.0f} s:\n{log_tail(output)}")
        time.sleep(POLL)
    handle = Supervised(run_dir, supervisor)
    handle.wait_ready(("gateway", "store"), timeout=max(1.0, deadline - time.monotonic()))
    return handle


@pytest.fixture(scope="module")
def supervised() -> Iterator[Supervised]:
    """One supervised stack per test module (see the module docstring)."""
    with start_supervised() as handle:
        yield handle


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    handle = getattr(item, "funcargs", {}).get("supervised")
    if report.failed and isinstance(handle, Supervised):
        report.sections.append(("supervised stack", handle.diagnostics()))
    return report
