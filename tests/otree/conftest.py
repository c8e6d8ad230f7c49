"""Fixtures of the oTree tests: a real oTree 6 server (`otree prodserver`, web process and
timeout worker, from `.venv-otree`) running a copy of the example project against this test
session's Canopy stack, and the browser fixtures of tests/browser/.

oTree cannot be imported here (its pins clash with Canopy's venv): the server is a process
group of its own, talked to over HTTP like a lab's browser and scripts would.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.infra import free_port
from devstack.stack import PROJECT_ROOT, StackHandle
from tests.browser.conftest import browser, new_context

__all__ = ["browser", "new_context"]

OTREE_BIN = PROJECT_ROOT / ".venv-otree" / "bin"
EXAMPLE = PROJECT_ROOT / "integrations" / "otree" / "example"
READY_TIMEOUT_S = 40


@dataclass
class OTreeServer:
    url: str
    rest_key: str
    log: Path

    def rest(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.request(
            method,
            f"{self.url}{path}",
            json=body,
            headers={"otree-rest-key": self.rest_key},
            timeout=10,
        )
        assert response.status_code == 200, f"{method} {path}: {response.text[:2000]}"
        return response.json()

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def otree_env(stack: StackHandle, **extra: str) -> dict[str, str]:
    """The environment of an oTree process: Canopy's API and token, nothing of the test
    session's own CANOPY_* / OTREE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CANOPY_", "OTREE_"))}
    env["PATH"] = f"{OTREE_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(CANOPY_URL=stack.urls.store_url, CANOPY_TOKEN=stack.urls.admin_token, **extra)
    return env


@pytest.fixture(scope="module")
def otree_server(
    stack: StackHandle, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OTreeServer]:
    assert (OTREE_BIN / "otree").exists(), "`make otree-check` creates .venv-otree"
    project = tmp_path_factory.mktemp("otree") / "project"
    # A copy: the server's db.sqlite3 then lives with the test, not in the repository.
    shutil.copytree(EXAMPLE, project, ignore=shutil.ignore_patterns("db.sqlite3", "__pycache__"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    rest_key = secrets.token_urlsafe(16)
    env = otree_env(
        stack,
        CANOPY_RETURN_URL=url,
        OTREE_AUTH_LEVEL="STUDY",
        OTREE_ADMIN_PASSWORD=secrets.token_urlsafe(16),
        OTREE_REST_KEY=rest_key,
    )
    log = project / "otree.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [str(OTREE_BIN / "otree"), "prodserver", f"127.0.0.1:{port}"],
            cwd=project,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its timeout worker is a child: stopped with it
        )
    server = OTreeServer(url=url, rest_key=rest_key, log=log)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            assert process.poll() is None, f"otree prodserver exited:\n{server.log_tail()}"
            try:
                if httpx.get(f"{url}/api/otree_version", timeout=2).status_code < 500:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"oTree not up:\n{server.log_tail()}"
            time.sleep(0.2)  # polling for the port, bounded by the deadline
        yield server
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (web process and timeout worker), then SIGKILL."""
    for sig, wait_s in ((signal.SIGTERM, 10.0), (signal.SIGKILL, None)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(timeout=wait_s)
            if sig == signal.SIGTERM:
                # the worker may outlive the web process by a moment: make sure it goes too
                os.killpg(process.pid, signal.SIGKILL)
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            pass
        break
