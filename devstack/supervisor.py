"""Keeps what `make run` started running, as Kubernetes keeps the containers of a pod: a
process that exits without being asked to is started again the same way (command line,
environment, hence ports and data folders), after a delay that doubles while it keeps failing.

Owns: the restart policy (`restart_delay`, `next_attempt`: pure functions), the supervision
loop, the state file `<run_dir>/devstack-state.json` and the log `<run_dir>/logs/devstack.log`.
How each process is started again and probed is the business of `devstack.infra` and
`devstack.stack`; `children()` wires them in.

The loop is one thread and never waits on one process: it sleeps until a signal arrives
(SIGCHLD: a child exited; SIGINT / SIGTERM / SIGHUP: stop, return the signal's name), until a
restart is due, or for POLL_INTERVAL while a restarted process is not ready yet; each probe
answers within about a second. Signals reach it through `signal.set_wakeup_fd`, so one that
arrives while it works is read at the next wait, never lost. Once a stop signal was read it
starts nothing more: the caller stops what runs.

States of a child::

    running ──exits──▶ backoff ──delay over──▶ (waiting: for another process) ──▶ starting
       ▲                                                                            │
       └───────────────────────────────ready (its probe passed)─────────────────────┘
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from devstack.infra import INFRA_PROCESSES, InfraError, InfraHandle, Popen
from devstack.stack import SERVICES, StackError, StackHandle

INITIAL_DELAY = 0.5  # before the first restart of a process that was stable
MAX_DELAY = 30.0
STABLE_AFTER = 60.0  # a process up this long counts as stable: its next restart is attempt 1
POLL_INTERVAL = 0.05  # while a process is starting: how often to probe it
SLOW_POLL_INTERVAL = 1.0  # ... once it has been starting for SLOW_POLL_AFTER s
SLOW_POLL_AFTER = 30.0
STATE_FILE = "devstack-state.json"
LOG_FILE = "devstack.log"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

State = Literal["running", "starting", "backoff", "waiting"]


# --------------------------------------------------------------------------------------------
# The policy (pure)


def restart_delay(attempt: int) -> float:
    """Seconds to wait before restart `attempt` (1 = the first since the process was last
    stable): 0.5, 1, 2, 4, ... capped at MAX_DELAY."""
    if attempt < 1:
        raise ValueError(f"attempt must be at least 1, not {attempt}")
    return min(MAX_DELAY, INITIAL_DELAY * 2.0 ** min(attempt - 1, 32))


def next_attempt(attempt: int, uptime: float) -> int:
    """The attempt number of the restart after a process exited having run `uptime` s, when
    `attempt` started it (0: its first start). Up STABLE_AFTER s or more: back to 1."""
    return 1 if uptime >= STABLE_AFTER else attempt + 1


def describe_exit(returncode: int) -> str:
    """`killed by SIGKILL` or `exited with 3`, from a Popen returncode."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with {returncode}"


# --------------------------------------------------------------------------------------------
# Children


def _nothing() -> str | None:
    return None


@dataclass
class Child:
    """One supervised process: how to start it again and how to tell that it serves."""

    name: str
    proc: Popen
    start: Callable[[], Popen]  # start it again (same command, env); must not wait
    ready: Callable[[], bool]  # a quick probe (about a second at most)
    waiting_for: Callable[[], str | None] = _nothing  # what must serve before it may start
    on_exit: Callable[[], None] = lambda: None
    on_ready: Callable[[], str | None] = _nothing  # may return a note for the log
    exit_note: str | None = None  # said with every exit (e.g. "its data was in memory")
    # Bookkeeping of the supervisor.
    state: State = "running"
    restarts: int = 0
    attempt: int = 0  # the attempt that started the current process (0: the first start)
    started_at: float = field(default_factory=time.time)  # Unix time
    started_mono: float = field(default_factory=time.monotonic)
    due: float = 0.0  # monotonic time the next start is due (backoff)
    last_exit: str | None = None

    @property
    def pid(self) -> int | None:
        """The pid of the current process; None while there is none (backoff, waiting)."""
        return self.proc.pid if self.state in ("running", "starting") else None


def process_age(pid: int) -> float | None:
    """Seconds since process `pid` started (from /proc), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
    except (OSError, ValueError):
        return None
    start_ticks = int(stat.rpartition(")")[2].split()[19])  # field 22, starttime
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def adopt(child: Child) -> Child:
    """Date `child` from its process's real start (it started before supervision did)."""
    age = process_age(child.proc.pid)
    if age is not None:
        child.started_at, child.started_mono = time.time() - age, time.monotonic() - age
    return child


def children(infra: InfraHandle, stack: StackHandle) -> list[Child]:
    """Every process of a dev stack as a Child: the servers first (epmd before the node),
    then the services."""
    procs = infra.processes
    result = []
    for name in INFRA_PROCESSES:
        note = None
        if name == "mongo" and infra.mongo_storage == "memory":
            note = "its data was in memory and is gone (use --mongo-file to keep it)"
        result.append(
            Child(
                name,
                procs[name],
                start=partial(infra.start_process, name),
                ready=partial(infra.probe, name),
                waiting_for=partial(infra.waiting_for, name),
                on_exit=partial(infra.process_exited, name),
                on_ready=partial(infra.process_ready, name),
                exit_note=note,
            )
        )
    for name in SERVICES:

        def start_service(name: str = name) -> Popen:
            stack.start_service(name)
            return stack.processes[name]

        result.append(Child(name, stack.processes[name], start_service, partial(stack.probe, name)))
    return [adopt(child) for child in result]


# --------------------------------------------------------------------------------------------
# The loop


def _wake(signum: int, frame: FrameType | None) -> None:
    """A Python-level handler must exist for the wakeup fd to be written; the loop reads it."""


class Supervisor:
    """Restarts `children` that exit, until a stop signal; see the module docstring.

    `describe` adds the stack's URLs etc. to the state file; `say` prints a line (default:
    stdout)."""

    def __init__(
        self,
        children: list[Child],
        run_dir: Path,
        *,
        describe: Callable[[], dict[str, Any]] = dict,
        say: Callable[[str], None] = lambda line: print(line, flush=True),
    ) -> None:
        self.children = children
        self.run_dir = run_dir
        self.state_path = run_dir / STATE_FILE
        self.log_path = run_dir / "logs" / LOG_FILE
        self._describe = describe
        self._say = say
        self._stopping = False
        self.state_written = False

    # -- public --------------------------------------------------------------------------

    def run(self) -> str:
        """Supervise until a stop signal; return its name (e.g. "SIGINT"). Afterwards stop
        signals are ignored (a second Ctrl-C must not cut the caller's clean stop short)."""
        with self._signals() as wakeup:
            self.write_state()
            pids = ", ".join(f"{c.name} {c.proc.pid}" for c in self.children)
            self._log(f"supervising: {pids}")
            while True:
                # Drain the wakeups before the step, never after it: a child that dies while
                # the step runs (after its poll) leaves its SIGCHLD in the pipe, so the select
                # below returns at once and the next step sees the exit. Draining after the
                # step too lost that wakeup, and with every child running the loop then slept
                # until the next signal.
                stop = self._read_stop(wakeup)
                if stop is None:
                    self._step(time.monotonic())
                if stop is not None:
                    self._stopping = True
                    self._log(f"{stop}: stopping; nothing is restarted from now on")
                    self.write_state()
                    return stop
                with contextlib.suppress(InterruptedError):
                    select.select([wakeup], [], [], self._next_wake(time.monotonic()))

    def write_state(self) -> None:
        """Write the state file atomically (a reader sees the old or the new one, whole)."""
        state = {
            "pid": os.getpid(),
            "run_dir": str(self.run_dir),
            "updated_at": time.time(),
            "stopping": self._stopping,
            "processes": {
                c.name: {
                    "pid": c.pid,
                    "state": c.state,
                    "ready": c.state == "running",
                    "restarts": c.restarts,
                    "started_at": c.started_at,
                    "last_exit": c.last_exit,
                }
                for c in self.children
            },
            **self._describe(),
        }
        tmp = self.state_path.with_name(f".{self.state_path.name}.{os.getpid()}.tmp")
        # 0600: it holds the admin token.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_path)
        self.state_written = True

    def remove_state(self) -> None:
        """Remove the state file if this supervisor wrote it (call when everything stopped)."""
        if self.state_written:
            self.state_path.unlink(missing_ok=True)
            self.state_written = False

    # -- one step ------------------------------------------------------------------------

    def _step(self, now: float) -> None:
        changed = False
        for child in self.children:
            if child.state in ("running", "starting") and child.proc.poll() is not None:
                self._exited(child, now)
                changed = True
        for child in self.children:
            if child.state in ("backoff", "waiting") and now >= child.due:
                changed |= self._try_start(child, now)
            if child.state == "starting" and self._probe(child):
                child.state = "running"
                note = self._hook(child, "on_ready", child.on_ready)
                took = time.monotonic() - child.started_mono
                self._log(
                    f"{child.name}: ready again (pid {child.proc.pid}), {took:.1f} s after "
                    f"its start" + (f"; {note}" if note else "")
                )
                changed = True
        if changed:
            self.write_state()

    def _exited(self, child: Child, now: float) -> None:
        returncode = child.proc.returncode
        uptime = now - child.started_mono
        child.attempt = next_attempt(child.attempt, uptime)
        delay = restart_delay(child.attempt)
        child.state, child.due = "backoff", now + delay
        child.last_exit = describe_exit(returncode)
        self._hook(child, "on_exit", child.on_exit)
        note = f"; {child.exit_note}" if child.exit_note else ""
        self._log(
            f"{child.name} (pid {child.proc.pid}) {child.last_exit} after {uptime:.1f} s up: "
            f"restart attempt {child.attempt} in {delay:.1f} s{note}"
        )

    def _try_start(self, child: Child, now: float) -> bool:
        """Start `child` unless it must wait; True if its state changed."""
        try:
            reason = child.waiting_for()
        except Exception as e:  # a probe that fails means: not there yet
            reason = f"({e.__class__.__name__}: {e})"
        if reason is not None:
            if child.state == "waiting":
                return False
            child.state = "waiting"
            self._log(f"{child.name}: waiting for {reason} before its restart")
            return True
        try:
            child.proc = child.start()
        except (OSError, InfraError, StackError) as e:
            # As if it had exited at once: it backs off like a crash.
            child.attempt += 1
            delay = restart_delay(child.attempt)
            child.state, child.due = "backoff", now + delay
            child.last_exit = f"could not start: {e}"
            self._log(
                f"{child.name}: could not start ({e}): restart attempt {child.attempt} "
                f"in {delay:.1f} s"
            )
            return True
        child.state = "starting"
        child.restarts += 1
        child.started_at, child.started_mono = time.time(), time.monotonic()
        self._log(
            f"{child.name}: started again as pid {child.proc.pid} (restart {child.restarts}, "
            f"attempt {child.attempt})"
        )
        return True

    def _probe(self, child: Child) -> bool:
        if child.proc.poll() is not None:
            return False  # exited: the next step sees it
        try:
            return child.ready()
        except Exception:  # a probe that fails means: not ready
            return False

    def _hook(self, child: Child, label: str, hook: Callable[[], object]) -> str | None:
        try:
            result = hook()
        except Exception as e:  # a hook must not take the supervisor down
            self._log(f"{child.name}: {e.__class__.__name__} in {label}: {e}")
            return None
        return result if isinstance(result, str) else None

    def _next_wake(self, now: float) -> float | None:
        """Seconds until the loop must look again without a signal; None: only on a signal."""
        waits = []
        for child in self.children:
            if child.state == "backoff":
                waits.append(max(0.0, child.due - now))
            elif child.state == "waiting":
                waits.append(POLL_INTERVAL)
            elif child.state == "starting":
                slow = now - child.started_mono > SLOW_POLL_AFTER
                waits.append(SLOW_POLL_INTERVAL if slow else POLL_INTERVAL)
        return min(waits) if waits else None

    # -- signals and output ----------------------------------------------------------------

    @contextlib.contextmanager
    def _signals(self) -> Iterator[int]:
        """SIGCHLD and the stop signals write their number to a pipe the loop waits on."""
        read_fd, write_fd = os.pipe()
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        try:
            for sig in (signal.SIGCHLD, *STOP_SIGNALS):
                signal.signal(sig, _wake)
            yield read_fd
        finally:
            for sig in STOP_SIGNALS:
                signal.signal(sig, signal.SIG_IGN)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            signal.set_wakeup_fd(previous_fd)
            os.close(read_fd)
            os.close(write_fd)

    @staticmethod
    def _read_stop(read_fd: int) -> str | None:
        """Drain the wakeup pipe; the name of the first stop signal in it, or None."""
        stop = None
        while True:
            try:
                data = os.read(read_fd, 512)
            except BlockingIOError:
                return stop
            if not data:
                return stop
            for signum in data:
                if stop is None and signum in STOP_SIGNALS:
                    stop = signal.Signals(signum).name

    def _log(self, message: str) -> None:
        """One line on the terminal and in devstack.log, with the time."""
        line = f"{datetime.now(UTC).isoformat(timespec='milliseconds')} {message}"
        self._say(line)
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as f:
                f.write(line + "\n")
        except OSError as e:
            print(f"devstack: cannot write {self.log_path}: {e}", file=sys.stderr, flush=True)
