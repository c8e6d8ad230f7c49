"""The installed package, as the container image has it: a wheel built from what the
Dockerfile's builder copies (pyproject.toml, requirements.lock and services/ only), installed
after the runtime lock into a clean virtualenv, then every console script's `--help`, each CLI
module's `--help` and each service's app built from its settings, with nothing of the
repository on the path.

No Docker engine runs here, so this is the image's Python side without the image: the same
sources, the same wheel, the same kind of virtualenv, the same entry points."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

from tests.deploy.dockerfile import ROOT, Dockerfile

pytestmark = [pytest.mark.packaging]

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SCRIPTS = sorted(PYPROJECT["project"]["scripts"])
# Packages under services/ with a composition root (app.py: a service the image runs with
# `python -m services.<name>`), and the ones that are command lines (a __main__ but no app).
SERVICES = sorted(p.parent.name for p in (ROOT / "services").glob("*/app.py"))
CLI_MODULES = sorted(
    f"services.{p.parent.name}"
    for p in (ROOT / "services").glob("*/__main__.py")
    if not (p.parent / "app.py").exists()
)
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]

# Run in the new virtualenv with the image's environment: no PYTHONPATH, no user site, the
# script's own folder not first on sys.path for `-c` / `-m` (PYTHONSAFEPATH), cwd a bare folder.
BUILD_APPS = """
import importlib, sys
import services
assert services.__file__.startswith(sys.prefix), services.__file__
try:
    import devstack
except ModuleNotFoundError:
    pass
else:
    raise AssertionError(f"devstack is importable: {devstack.__file__}")
for name in sys.argv[1:]:
    app = importlib.import_module(f"services.{name}.app")
    settings = importlib.import_module(f"services.{name}.settings")
    app.create_app(getattr(settings, f"{name.capitalize()}Settings")())
    print("built", name)
"""


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, f"{args}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def image_sources(into: Path) -> Path:
    """What the Dockerfile's builder stage COPYs (`COPY requirements.lock ./`, `COPY
    pyproject.toml ./`, `COPY services ./services`), copied to the same places under `into`."""
    builder = Dockerfile.read().stages[0]
    for copy in builder.all("COPY"):
        *sources, target = copy.split()
        for source in sources:
            path = ROOT / source
            dest = into / target / path.name if target.endswith("/") else into / target
            if path.is_dir():
                shutil.copytree(path, dest, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, dest)
    return into


def test_sources_are_what_the_image_copies(tmp_path: Path) -> None:
    """The test builds from the image's sources: a repository folder beside services/ (say
    devstack/) is not in them, which is the point."""
    src = image_sources(tmp_path)
    names = sorted(p.name for p in src.iterdir())
    assert names == ["pyproject.toml", "requirements.lock", "services"]


def test_installed_wheel_starts(tmp_path: Path) -> None:
    src = image_sources(tmp_path / "src")
    wheels = tmp_path / "wheels"
    # The build backend is the venv's (locked setuptools): nothing is fetched to build.
    run([*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."], src)
    (wheel,) = wheels.glob("canopy-*.whl")

    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    install = [*PIP, "--python", str(python), "install", "-q", "--no-warn-script-location"]
    # As the image's builder: the lock alone (hashes checked), then the wheel without deps.
    run([*install, "--require-hashes", "--no-deps", "-r", str(src / "requirements.lock")], src)
    run([*install, "--no-deps", str(wheel)], tmp_path)
    # The wheel's declared dependencies are all met by the runtime lock alone.
    run([*PIP, "--python", str(python), "check"], tmp_path)

    bare = tmp_path / "cwd"
    bare.mkdir()
    env = {
        "PATH": f"{target / 'bin'}:/usr/bin:/bin",
        "HOME": str(bare),
        "LANG": "C.UTF-8",
        "PYTHONSAFEPATH": "1",
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    assert SCRIPTS, "pyproject.toml declares no console script"
    for script in SCRIPTS:
        assert "Usage:" in run([str(target / "bin" / script), "--help"], bare, env), script
    for module in CLI_MODULES:
        assert "Usage:" in run([str(python), "-I", "-m", module, "--help"], bare, env), module
    assert SERVICES == ["decisions", "gateway", "store", "timers"]
    # The one setting without a default (a Secret in deploy/k8s); building connects nothing.
    secrets = {"CANOPY_ADMIN_TOKEN": "packaging-test-token-0123456789abcdef"}
    built = run([str(python), "-I", "-c", BUILD_APPS, *SERVICES], bare, env | secrets)
    assert built.split() == [word for name in SERVICES for word in ("built", name)]
