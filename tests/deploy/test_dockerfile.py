"""The Dockerfile, checked offline: a pinned slim Python base matching pyproject's, a non-root
numeric USER, no build tools or pip in the final image, the runtime lock (requirements.lock,
with hashes) and then the project's wheel without its dependencies installed, nothing else,
and a build context that holds only the code and the lock."""

from __future__ import annotations

import re
import tomllib

from tests.deploy.dockerfile import ROOT, Dockerfile

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
BUILD_TOOLS = ("gcc", "g++", "build-essential", "make", "cc", "clang", "git")


def test_base_is_a_pinned_slim_python_of_pyprojects_version() -> None:
    dockerfile = Dockerfile.read()
    bases = {stage.base for stage in dockerfile.stages}
    # Builder and runtime on one interpreter: the virtualenv copied between them points at it.
    assert len(bases) == 1
    (base,) = bases
    match = re.fullmatch(
        r"python:(\d+)\.(\d+)\.(\d+)-slim(-bookworm|-trixie)?(@sha256:[0-9a-f]{64})?", base
    )
    assert match, f"{base}: pin python:<major>.<minor>.<patch>-slim[-<debian>][@digest]"
    requires = PYPROJECT["project"]["requires-python"]  # ">=3.11,<3.12"
    low = re.search(r">=\s*(\d+)\.(\d+)", requires)
    high = re.search(r"<\s*(\d+)\.(\d+)", requires)
    assert low and high
    version = (int(match[1]), int(match[2]))
    assert (int(low[1]), int(low[2])) <= version < (int(high[1]), int(high[2]))


def test_final_image_runs_as_a_numeric_non_root_user_without_build_tools() -> None:
    dockerfile = Dockerfile.read()
    assert len(dockerfile.stages) >= 2, "multi-stage: wheels are built in a builder stage"
    assert dockerfile.user_id >= 1000
    final = dockerfile.final
    for command in dockerfile.run_commands(final):
        assert not {"apt-get", "apt", "pip"} & set(command[:1]), command
        if command[:3] == ["python", "-m", "pip"]:
            assert command[3] == "uninstall", command  # pip only leaves the final image
    assert any(
        c[:4] == ["python", "-m", "pip", "uninstall"] for c in dockerfile.run_commands(final)
    )
    # What the final stage takes from the builder: the virtualenv only.
    copies = final.all("COPY")
    assert copies == ["--from=builder /opt/canopy /opt/canopy"]
    for stage in dockerfile.stages:
        for command in dockerfile.run_commands(stage):
            assert not set(BUILD_TOOLS) & set(command), (stage.name, command)
    assert final.all("CMD") == ['["python", "-m", "services.gateway"]']


def _requirements(command: list[str], verb: str) -> list[str]:
    """The requirements a `pip install` / `pip wheel` names (not the values of its options)."""
    requirements, skip = [], False
    for word in command[command.index(verb) + 1 :]:
        if skip:
            skip = False
        elif word.startswith("-"):
            skip = word in {"--wheel-dir", "-w", "--find-links", "-f", "--python", "-r"}
        else:
            requirements.append(word)
    return requirements


def test_image_installs_the_runtime_lock_then_the_wheel_without_its_dependencies() -> None:
    """Exactly the locked versions: the builder installs requirements.lock (every file's hash
    checked, nothing resolved beyond it) into the virtualenv, then builds the project's wheel
    alone and installs it with --no-deps from the wheels built here, then `pip check`s that the
    lock meets what the wheel declares. Nothing else is installed."""
    dockerfile = Dockerfile.read()
    (builder,) = [stage for stage in dockerfile.stages if stage.name == "builder"]
    copies = builder.all("COPY")
    assert "requirements.lock ./" in copies and "pyproject.toml ./" in copies
    # The lock's layer before the code's: a change of the code alone reuses it.
    assert copies.index("requirements.lock ./") < copies.index("services ./services")
    commands = dockerfile.run_commands(builder)
    installs = [c for c in commands if c[:1] == ["pip"] and "install" in c]
    builds = [c for c in commands if c[:1] == ["pip"] and "wheel" in c]
    assert len(installs) == 2 and len(builds) == 1, commands
    lock, wheel = installs
    assert {"--require-hashes", "--no-deps"} <= set(lock), lock
    assert lock[lock.index("-r") + 1] == "requirements.lock" and not _requirements(lock, "install")
    (build,) = builds
    assert "--no-deps" in build and _requirements(build, "wheel") == ["."], build
    assert {"--no-index", "--no-deps"} <= set(wheel), wheel
    assert _requirements(wheel, "install") == [PYPROJECT["project"]["name"]], wheel
    check = ["pip", "--python", "/opt/canopy/bin/python", "check"]
    assert all(c[:3] == check[:3] for c in installs), "every install goes into the virtualenv"
    assert check in commands
    order = [commands.index(c) for c in (lock, build, wheel, check)]
    assert order == sorted(order), "the lock, then the wheel, then the check"
    assert all("[dev]" not in " ".join(command) for command in commands)
    # Every dependency is pinned exactly, so the image resolves what the tests ran.
    for requirement in PYPROJECT["project"]["dependencies"]:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.]*", requirement)


def test_the_runtime_lock_pins_pyprojects_dependencies_with_hashes() -> None:
    """requirements.lock (`make lock`) is the runtime's: each of pyproject.toml's dependencies
    at its pinned version, every package pinned with its hashes, no dev tool."""
    pins: dict[str, str] = {}
    hashed: set[str] = set()
    current = ""
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        pinned = re.match(r"([A-Za-z0-9_.\-]+)==(\S+)", line)
        if pinned:
            current = _normal(pinned[1])
            pins[current] = pinned[2]
        elif line.strip().startswith("--hash=sha256:") and current:
            hashed.add(current)
    assert pins and hashed == set(pins), set(pins) - hashed
    for requirement in PYPROJECT["project"]["dependencies"]:
        name, version = re.sub(r"\[.*\]", "", requirement).split("==")
        assert pins.get(_normal(name)) == version, requirement
    assert not {"pytest", "ruff", "mypy"} & set(pins)


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_build_context_is_the_code_only() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "deny everything, then allow what the image needs"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    sources = {
        word.rstrip("/").removeprefix("./")
        for stage in Dockerfile.read().stages
        for copy in stage.all("COPY")
        if not copy.startswith("--from")
        for word in copy.split()[:-1]
    }
    assert sources == allowed
    for path in sources:
        assert (ROOT / path).exists(), path
