"""Session fixtures shared by every test folder: the real infrastructure and the whole stack.

Owns: `infra` (a throwaway RabbitMQ node + in-memory nx-27017 for the whole session;
`infra_handle` is the same with `.rabbitmqctl()`),
`stack` (the four services on free ports against it, with a database of their own),
`run_dir` (a scratch folder under `.run/` for tests that start their own), and the report
hook that appends the services' log tails to a failing test that used the stack.
Nothing starts unless a test asks for it: `pytest tests/unit` needs no RabbitMQ.
"""

from __future__ import annotations

import secrets
import shutil
import tempfile
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from devstack.infra import Infra, InfraHandle, free_port, start_infra
from devstack.stack import PROJECT_ROOT, SERVICES, StackHandle, start_stack

RUN_DIR = PROJECT_ROOT / ".run"
PLUGINS_SITE = PROJECT_ROOT / "tests" / "plugins" / "site"
LOG_TAIL_LINES = 40


@pytest.fixture(scope="session")
def infra_handle() -> Iterator[InfraHandle]:
    """The session's infrastructure, for tests that need `.rabbitmqctl(...)` too."""
    with start_infra(RUN_DIR, persistent=False) as handle:
        yield handle


@pytest.fixture(scope="session")
def infra(infra_handle: InfraHandle) -> Infra:
    return infra_handle.infra


@pytest.fixture(scope="session")
def stack(infra: Infra) -> Iterator[StackHandle]:
    ports = {name: free_port() for name in SERVICES}
    overrides = {
        "CANOPY_MONGO_DB": f"test_{secrets.token_hex(4)}",
        # An experiment plug-in "installed" for the services (tests/plugins/site is laid out
        # as pip lays out a package): tests/e2e/test_plugins.py plays it.
        "PYTHONPATH": str(PLUGINS_SITE),
    }
    with start_stack(infra, infra.run_dir, env_overrides=overrides, ports=ports) as handle:
        yield handle


@pytest.fixture
def run_dir() -> Iterator[Path]:
    RUN_DIR.mkdir(exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="tmp-", dir=RUN_DIR))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    funcargs = getattr(item, "funcargs", {})
    handle = funcargs.get("stack")
    if report.failed and isinstance(handle, StackHandle):
        for name in SERVICES:
            report.sections.append(
                (
                    f"{name} log (last {LOG_TAIL_LINES} lines of {handle.log_path(name)})",
                    handle.log_tail(name, LOG_TAIL_LINES),
                )
            )
    return report
