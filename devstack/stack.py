"""The four Canopy services (store, gateway, decisions, timers) as child processes.

Owns: each service's command line (`<this python> -m services.<name>`, cwd = project root),
its environment (the `CANOPY_*` variables that are the services' only configuration), its log
file (`<run_dir>/logs/<name>.log`), waiting for `/readyz`, and stopping / restarting. The
infrastructure they talk to comes from `devstack.infra`.

Where a setting comes from, strongest first: `env_overrides` / `ports` given by the caller
(tests), then `CANOPY_*` already in the environment (a user's `CANOPY_ADMIN_TOKEN` or
`CANOPY_GATEWAY_PORT`), then the defaults here. The broker and database URLs always come
from the `Infra` that was started.

Least privilege (docs/operations.md, "Who holds which secret"): `env` holds every secret (the
bots and tests use it), but each service is started with `service_env(name)`, which keeps
only the secrets its settings class lists in `SECRETS`: the gateway gets the internal token
and the seat secret, never the admin token; timers gets no token. The internal token is new
at each start (nothing outlives the processes that share it); the seat secret is kept in
`<run folder>/seat-secret` (owner-only), so participants' links outlive a restart even with a
new admin token. `CANOPY_GATEWAY_HOST` puts the gateway alone on another interface (a lab
network): the other services stay on `CANOPY_HOST` (127.0.0.1). The broker likewise: `env`'s
`CANOPY_AMQP_URL` is the administrator's (tests and tools use it); each service gets, in the
same variable as its Kubernetes Secret holds, its own broker user's, which may do only what
that service does (`Infra.service_amqp_url`, services/common/bus/access.py).
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from devstack.infra import (
    POLL_INTERVAL,
    SECRET_MODE,
    Infra,
    Popen,
    child_env,
    deferred_signals,
    log_tail,
    spawn,
    stop_process,
)
from services.common.settings import CommonSettings
from services.decisions.settings import DecisionsSettings
from services.gateway.settings import GatewaySettings
from services.store.settings import StoreSettings
from services.timers.settings import TimersSettings

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Store first: the others reach it over HTTP (CANOPY_STORE_URL). Order matters only for stop.
SERVICES = ("store", "gateway", "decisions", "timers")
DEFAULT_PORTS = {"gateway": 8000, "store": 8001, "decisions": 8002, "timers": 8003}
SETTINGS: dict[str, type[CommonSettings]] = {
    "store": StoreSettings,
    "gateway": GatewaySettings,
    "decisions": DecisionsSettings,
    "timers": TimersSettings,
}
# Every variable that is some service's secret; a service gets only those of its own SECRETS.
SECRET_VARIABLES = frozenset(
    f"CANOPY_{field.upper()}" for cls in SETTINGS.values() for field in cls.SECRETS
)
GATEWAY_HOST_VARIABLE = "CANOPY_GATEWAY_HOST"
SEAT_SECRET_FILE = "seat-secret"
PROBE_TIMEOUT = 0.5  # one readiness probe (supervisor)
READY_TIMEOUT = 40.0  # with infra's boot waits, below pytest's per-test timeout (120 s)
STOP_GRACE = 10.0


class StackError(RuntimeError):
    """A service did not start or did not become ready (the message carries its log tail)."""


@dataclass(frozen=True)
class StackUrls:
    gateway_url: str
    store_url: str
    decisions_url: str
    timers_url: str
    admin_token: str
    internal_token: str = ""  # what the gateway and decisions hold (/internal only)


def port_variable(service: str) -> str:
    return f"CANOPY_{service.upper()}_PORT"


def reachable_at(host: str) -> str:
    """Where this machine reaches a server bound to `host` (any address: loopback)."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def secrets_of(service: str) -> frozenset[str]:
    """The secret variables `service` is started with (its settings' SECRETS)."""
    return frozenset(f"CANOPY_{field.upper()}" for field in SETTINGS[service].SECRETS)


def resolve_ports(ports: Mapping[str, int] | None = None) -> dict[str, int]:
    """Each service's port: `ports`, else CANOPY_<SERVICE>_PORT, else the default."""
    given = dict(ports or {})
    unknown = set(given) - set(SERVICES)
    if unknown:
        raise ValueError(f"unknown services in ports: {sorted(unknown)}")
    return {
        name: given.get(name) or int(os.environ.get(port_variable(name), DEFAULT_PORTS[name]))
        for name in SERVICES
    }


class StackHandle:
    """The running services. `.urls` to reach them, `.stop()` (or leaving the `with` block) to
    end them; `.stop_service()` / `.start_service()` / `.restart()` for resilience tests and
    the supervisor, `.probe()` for a one-shot readiness check."""

    def __init__(
        self,
        infra: Infra,
        run_dir: Path,
        *,
        env_overrides: Mapping[str, str] | None,
        ports: Mapping[str, int] | None,
        ready_timeout: float,
    ) -> None:
        self.infra = infra
        self.run_dir = run_dir.resolve()
        self.ports = resolve_ports(ports)
        self.ready_timeout = ready_timeout
        self.logs_dir = self.run_dir / "logs"
        self.processes: dict[str, Popen] = {}
        self._probe_client: httpx.Client | None = None
        self.env = self._environment(dict(env_overrides or {}))
        self.hosts = {name: self.env["CANOPY_HOST"] for name in SERVICES}
        self.hosts["gateway"] = self.env.get(GATEWAY_HOST_VARIABLE) or self.env["CANOPY_HOST"]
        self.urls = StackUrls(
            gateway_url=self._url("gateway"),
            store_url=self._url("store"),
            decisions_url=self._url("decisions"),
            timers_url=self._url("timers"),
            admin_token=self.env["CANOPY_ADMIN_TOKEN"],
            internal_token=self.env["CANOPY_INTERNAL_TOKEN"],
        )

    def _url(self, service: str) -> str:
        return f"http://{reachable_at(self.hosts[service])}:{self.ports[service]}"

    def service_env(self, service: str) -> dict[str, str]:
        """The environment `service` is started with: `env` without the secrets it does not
        need, and on the gateway's interface for the gateway."""
        self._check_name(service)
        withheld = SECRET_VARIABLES - secrets_of(service)
        env = {key: value for key, value in self.env.items() if key not in withheld}
        env["CANOPY_HOST"] = self.hosts[service]
        if env["CANOPY_AMQP_URL"] == self.infra.amqp_url:  # not a URL a test chose itself
            env["CANOPY_AMQP_URL"] = self.infra.service_amqp_url(service)
        env.pop(GATEWAY_HOST_VARIABLE, None)
        return env

    def _seat_secret(self) -> str:
        """The seat secret kept in the run folder (made on the first start), owner-only."""
        path = self.run_dir / SEAT_SECRET_FILE
        if not path.exists():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_MODE)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
        return path.read_text().strip()

    def _environment(self, overrides: dict[str, str]) -> dict[str, str]:
        gateway_host = overrides.get(GATEWAY_HOST_VARIABLE) or os.environ.get(
            GATEWAY_HOST_VARIABLE, ""
        )
        # Links must name the address browsers reach the gateway at: its own, when it is a
        # specific one (a lab network); with "any address" set CANOPY_PUBLIC_URL yourself.
        public_host = reachable_at(gateway_host) if gateway_host else "127.0.0.1"
        defaults = {
            "CANOPY_ENV": "development",
            "CANOPY_HOST": "127.0.0.1",
            "CANOPY_MONGO_DB": "canopy",
            "CANOPY_STORE_URL": f"http://127.0.0.1:{self.ports['store']}",
            "CANOPY_PUBLIC_URL": f"http://{public_host}:{self.ports['gateway']}",
            "CANOPY_ADMIN_TOKEN": secrets.token_urlsafe(24),
            "CANOPY_INTERNAL_TOKEN": secrets.token_urlsafe(24),
        }
        if "CANOPY_SEAT_SECRET" not in overrides and not os.environ.get("CANOPY_SEAT_SECRET"):
            defaults["CANOPY_SEAT_SECRET"] = self._seat_secret()
        # The marker ties the services to the infra folder: if their owner dies, the next
        # start_infra() on that folder ends them (see devstack.infra).
        env = child_env(self.infra.run_dir, {})
        for key, value in defaults.items():
            env.setdefault(key, value)
        env.update(
            {
                "CANOPY_AMQP_URL": self.infra.amqp_url,
                "CANOPY_MONGO_URL": self.infra.mongo_url,
                **{port_variable(name): str(port) for name, port in self.ports.items()},
            }
        )
        env.update(overrides)
        return env

    # -- context manager -----------------------------------------------------------------

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- processes -----------------------------------------------------------------------

    def log_path(self, service: str) -> Path:
        return self.logs_dir / f"{service}.log"

    def log_tail(self, service: str, lines: int = 40) -> str:
        return log_tail(self.log_path(service), lines)

    def start_service(self, service: str) -> None:
        """Start one service (not running yet, or stopped) without waiting for it."""
        self._check_name(service)
        current = self.processes.get(service)
        if current is not None and current.poll() is None:
            raise StackError(f"{service} is already running (pid {current.pid})")
        log = self.log_path(service)
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("a") as f:
            f.write(f"=== devstack: starting {service} at {datetime.now(UTC).isoformat()} ===\n")
        self.processes[service] = spawn(
            [sys.executable, "-m", f"services.{service}"],
            env=self.service_env(service),
            log=log,
            cwd=PROJECT_ROOT,
        )

    def stop_service(self, service: str, *, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop one service: SIGTERM with up to STOP_GRACE s to exit (then SIGKILL), or
        sig=SIGKILL to simulate a crash."""
        self._check_name(service)
        proc = self.processes.get(service)
        if proc is None:
            return
        stop_process(proc, grace=0 if sig == signal.SIGKILL else STOP_GRACE)

    def restart(self, service: str, *, sig: signal.Signals = signal.SIGTERM) -> None:
        """Stop one service (see stop_service), start it again, wait until it is ready."""
        self.stop_service(service, sig=sig)
        self.start_service(service)
        self.wait_ready([service])

    def probe(self, service: str) -> bool:
        """Whether `service` answers GET /readyz with 200 now (one try, PROBE_TIMEOUT at most)."""
        self._check_name(service)
        if self._probe_client is None:
            # One client for every probe: building one costs 30 ms of CPU (its SSL context).
            # No keep-alive: a restarted service is a new process behind the same port.
            self._probe_client = httpx.Client(
                timeout=PROBE_TIMEOUT, limits=httpx.Limits(max_keepalive_connections=0)
            )
        try:
            response = self._probe_client.get(f"{self._url(service)}/readyz")
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    def exited(self) -> list[str]:
        """Services whose process has exited (for a foreground supervisor)."""
        return [name for name, p in self.processes.items() if p.poll() is not None]

    def wait_ready(self, services: list[str] | None = None) -> None:
        """Wait until GET /readyz answers 200 on every listed service (default: all)."""
        pending = list(services or SERVICES)
        last: dict[str, str] = dict.fromkeys(pending, "no answer yet")
        deadline = time.monotonic() + self.ready_timeout
        with httpx.Client(timeout=2.0) as client:
            while pending:
                for name in list(pending):
                    proc = self.processes[name]
                    code = proc.poll()
                    if code is not None:
                        raise StackError(
                            f"{name} exited with {code} before it was ready; "
                            f"last lines of {self.log_path(name)}:\n{self.log_tail(name)}"
                        )
                    try:
                        response = client.get(f"{self._url(name)}/readyz")
                    except httpx.TransportError as e:
                        last[name] = f"{e.__class__.__name__}: {e}"
                        continue
                    if response.status_code == 200:
                        pending.remove(name)
                    else:
                        last[name] = f"{response.status_code} {response.text[:500]}"
                if not pending:
                    break
                if time.monotonic() > deadline:
                    details = "\n".join(
                        f"{name}: /readyz {last[name]}; last lines of {self.log_path(name)}:\n"
                        f"{self.log_tail(name)}"
                        for name in pending
                    )
                    raise StackError(
                        f"not ready after {self.ready_timeout:.0f} s: {', '.join(pending)}\n"
                        f"{details}"
                    )
                time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        """SIGTERM every service, wait up to STOP_GRACE s, SIGKILL what is left. Idempotent."""
        if self._probe_client is not None:
            self._probe_client.close()
            self._probe_client = None
        with deferred_signals():
            running = [p for p in self.processes.values() if p.poll() is None]
            for proc in running:
                proc.terminate()
            deadline = time.monotonic() + STOP_GRACE
            for proc in running:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def _check_name(self, service: str) -> None:
        if service not in SERVICES:
            raise ValueError(f"unknown service {service!r}; one of {', '.join(SERVICES)}")


def start_stack(
    infra: Infra,
    run_dir: Path,
    *,
    env_overrides: Mapping[str, str] | None = None,
    ports: Mapping[str, int] | None = None,
    ready_timeout: float = READY_TIMEOUT,
) -> StackHandle:
    """Start the four services against `infra` and wait until all answer /readyz with 200.

    Logs go to `run_dir/logs/<service>.log` (appended). On failure everything started here
    is stopped and StackError carries the log tail of the service that failed.
    """
    handle = StackHandle(
        infra, run_dir, env_overrides=env_overrides, ports=ports, ready_timeout=ready_timeout
    )
    _check_ports_free(handle.ports, handle.hosts)
    try:
        for name in SERVICES:
            handle.start_service(name)
        handle.wait_ready()
    except BaseException:
        handle.stop()
        raise
    return handle


def start_bots_process(handle: StackHandle, sessions: list[str], *, all_but: int = 1) -> Popen:
    """`python -m services.bots <sessions> --all-but N` against this stack: bots in every slot
    of each session but the first N, for a newcomer to play against (`make run BOTS=1`).

    A child like the services, with their environment (so the bots find the store and the
    admin token in CANOPY_STORE_URL / CANOPY_ADMIN_TOKEN), logging to `logs/bots.log`. Not
    restarted: it ends by itself when the sessions' periods are over; stop it with
    `devstack.infra.stop_process`."""
    args = [sys.executable, "-m", "services.bots", *sessions, "--all-but", str(all_but)]
    return spawn(args, env=handle.env, log=handle.logs_dir / "bots.log", cwd=PROJECT_ROOT)


def _check_ports_free(ports: Mapping[str, int], hosts: Mapping[str, str]) -> None:
    """Fail early and clearly when a port is taken (e.g. by another `make run`)."""
    for name, port in ports.items():
        host = hosts[name]
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As uvicorn does, so that a port in TIME_WAIT after a restart counts as free.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as e:
                raise StackError(
                    f"port {port} for {name} on {host} is not available ({e.strerror}); "
                    f"stop what uses it or set {port_variable(name)} to another port"
                ) from None
