"""Prometheus for a development stack (`make run MONITORING=1`, and the monitoring tests).

Owns: the scrape config of one stack, made from `deploy/monitoring/prometheus.yml` (the
template's `127.0.0.1:<default port>` targets become the stack's actual ports, its rules path
an absolute one), Debian's `prometheus` as a child process with its own data folder
(`<run_dir>/prometheus/`) on a loopback port, its readiness probe and its stop. Which ports
the services and the broker listen on comes from `devstack.stack` / `devstack.infra`.
"""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import Self

import httpx

from devstack.infra import (
    POLL_INTERVAL,
    InfraError,
    Popen,
    child_env,
    free_port,
    log_tail,
    spawn,
    stop_process,
)
from devstack.stack import PROJECT_ROOT

PROMETHEUS = "prometheus"  # Debian's package puts it on PATH (/usr/bin/prometheus)
MONITORING = PROJECT_ROOT / "deploy" / "monitoring"
TEMPLATE = MONITORING / "prometheus.yml"
RULES = MONITORING / "rules" / "canopy.rules.yml"
DEFAULT_PORT = 9090  # Prometheus's usual port, when free; another free one otherwise
# The targets of the template, by job: what each one is replaced with.
TEMPLATE_PORTS = {
    "gateway": 8000,
    "store": 8001,
    "decisions": 8002,
    "timers": 8003,
    "rabbitmq": 15692,
}
READY_TIMEOUT = 30.0
STOP_GRACE = 10.0


def scrape_config(ports: Mapping[str, int], *, interval: str | None = None) -> str:
    """The template with `ports` (by job: the four services and "rabbitmq") and an absolute
    rules path; `interval` replaces the scrape and evaluation interval (tests: 1s)."""
    text = TEMPLATE.read_text()
    for job, default in TEMPLATE_PORTS.items():
        target = f'"127.0.0.1:{default}"'
        if text.count(target) != 1:
            raise InfraError(f"{TEMPLATE}: expected one target {target} (job {job})")
        text = text.replace(target, f'"127.0.0.1:{ports[job]}"')
    text = text.replace("  - rules/canopy.rules.yml", f"  - {RULES}")
    if interval is not None:
        text = text.replace("scrape_interval: 5s", f"scrape_interval: {interval}")
        text = text.replace("evaluation_interval: 5s", f"evaluation_interval: {interval}")
    return text


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


class PrometheusHandle:
    """A running Prometheus: `.url` (its UI and API), `.proc`; `.start_process()` starts it
    again the same way (the supervisor), `.probe()` says whether it is ready, `.stop()` ends
    it (also on leaving the `with` block)."""

    def __init__(
        self, run_dir: Path, ports: Mapping[str, int], *, port: int | None, interval: str | None
    ) -> None:
        self.folder = run_dir.resolve() / "prometheus"
        self.log = run_dir.resolve() / "logs" / "prometheus.log"
        if port is None:
            port = DEFAULT_PORT if _port_is_free(DEFAULT_PORT) else free_port()
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.config = self.folder / "prometheus.yml"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(scrape_config(ports, interval=interval))
        self._env = child_env(run_dir, {})
        self._proc: Popen | None = None

    @property
    def proc(self) -> Popen:
        if self._proc is None:
            raise RuntimeError("prometheus is not started")
        return self._proc

    def start_process(self) -> Popen:
        """Start Prometheus (not running yet, or exited) without waiting for it."""
        self._proc = spawn(
            [
                PROMETHEUS,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=7d",
                "--log.format=json",
            ],
            env=self._env,
            log=self.log,
        )
        return self._proc

    def probe(self) -> bool:
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=0.5).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.probe():
            code = self.proc.poll()
            if code is not None:
                raise InfraError(f"prometheus exited with {code}:\n{log_tail(self.log)}")
            if time.monotonic() > deadline:
                raise InfraError(
                    f"prometheus not ready after {timeout:.0f} s:\n{log_tail(self.log)}"
                )
            time.sleep(POLL_INTERVAL)  # a process starting: nothing to wait on but its probe

    def stop(self) -> None:
        if self._proc is not None:
            stop_process(self._proc, grace=STOP_GRACE)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_prometheus(
    run_dir: Path,
    ports: Mapping[str, int],
    *,
    port: int | None = None,
    interval: str | None = None,
) -> PrometheusHandle:
    """Start Prometheus scraping `ports` (by job, see `scrape_config`) and wait until ready."""
    if shutil.which(PROMETHEUS) is None:
        raise InfraError("prometheus not found: run `make install` (Debian's prometheus package)")
    handle = PrometheusHandle(run_dir, ports, port=port, interval=interval)
    try:
        handle.start_process()
        handle.wait_ready()
    except BaseException:
        handle.stop()
        raise
    return handle
