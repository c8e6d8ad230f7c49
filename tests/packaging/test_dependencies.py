"""What the package declares against what it imports and what the lock files pin: every
third-party module that services/ imports comes from a declared dependency; every pin of
pyproject.toml is the lock's; the runtime lock is the dev lock's runtime part, same versions
and hashes. Offline and fast: the slow proof (a real install) is test_wheel.py."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME = [Requirement(r) for r in PROJECT["dependencies"]]
DEV = [Requirement(r) for r in PROJECT["optional-dependencies"]["dev"]]
OWN = {"services", "devstack", "bench", "tests"}


def locked(name: str) -> dict[str, tuple[str, frozenset[str]]]:
    """A pip-compile lock file: package → (version, its hashes)."""
    pins: dict[str, tuple[str, frozenset[str]]] = {}
    text = (ROOT / name).read_text()
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", block)
        if match:
            hashes = frozenset(re.findall(r"--hash=(sha256:[0-9a-f]{64})", block))
            pins[canonicalize_name(match[1])] = (match[2], hashes)
    return pins


def third_party_imports(tree: str) -> set[str]:
    modules = set()
    for path in (ROOT / tree).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {
        m for m in modules if m not in sys.stdlib_module_names and m not in OWN | {"__future__"}
    }


def test_every_runtime_import_is_declared() -> None:
    """yarl and websockets were imported by services/ but only arrived through other
    packages: a release of those that dropped them would break the installed wheel."""
    declared = {canonicalize_name(r.name) for r in RUNTIME}
    providers = packages_distributions()
    undeclared = {
        module: providers.get(module)
        for module in third_party_imports("services")
        if not {canonicalize_name(d) for d in providers.get(module, [])} & declared
    }
    assert undeclared == {}


def test_every_pin_is_the_locks() -> None:
    dev_lock, runtime_lock = locked("requirements-dev.lock"), locked("requirements.lock")
    for requirement in RUNTIME + DEV:
        (spec,) = requirement.specifier
        assert spec.operator == "==", requirement
        name = canonicalize_name(requirement.name)
        assert dev_lock[name][0] == spec.version, f"{requirement}: run `make lock`"
    for requirement in RUNTIME:
        assert canonicalize_name(requirement.name) in runtime_lock, f"{requirement}: make lock"


def test_runtime_lock_is_the_dev_locks_runtime_part() -> None:
    dev_lock, runtime_lock = locked("requirements-dev.lock"), locked("requirements.lock")
    assert len(runtime_lock) > len(RUNTIME)  # transitive dependencies are pinned too
    for name, (version, hashes) in runtime_lock.items():
        assert hashes, name
        assert dev_lock[name] == (version, hashes), name


def test_cli_names_agree_with_devstack() -> None:
    """services/cli.py writes two of devstack's names instead of importing devstack (which the
    installed wheel does not have)."""
    from devstack.stack import PROJECT_ROOT
    from devstack.supervisor import STATE_FILE
    from services import cli

    assert cli.STATE_FILE == STATE_FILE
    assert cli.RUN_DIR == PROJECT_ROOT / ".run"
