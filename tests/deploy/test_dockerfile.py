"""The Dockerfile, checked offline: a pinned slim Python base matching pyproject's, a non-root
numeric USER, no build tools or pip in the final image, the project's own dependency list
(pyproject.toml) and nothing else installed, and a build context that holds only the code."""

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


def test_image_installs_pyprojects_dependencies_and_nothing_else() -> None:
    """The builder installs the project itself (so pyproject.toml's pinned list, without the
    dev extra) and no requirement named beside it."""
    dockerfile = Dockerfile.read()
    (builder,) = [stage for stage in dockerfile.stages if stage.name == "builder"]
    assert "pyproject.toml ./" in builder.all("COPY")
    installs = [
        command
        for command in dockerfile.run_commands(builder)
        if "pip" in command[0] and ({"install", "wheel"} & set(command))
    ]
    assert installs, "the builder must build wheels and install them"
    for command in installs:
        verb = "wheel" if "wheel" in command else "install"
        rest = command[command.index(verb) + 1 :]
        requirements, skip = [], False
        for word in rest:
            if skip:
                skip = False
            elif word.startswith("-"):
                skip = word in {"--wheel-dir", "-w", "--find-links", "-f", "--python"}
            else:
                requirements.append(word)
        # `.` is the project (pyproject.toml); `canopy` is its wheel from /wheels.
        assert requirements in (["."], [PYPROJECT["project"]["name"]]), command
    assert all("[dev]" not in " ".join(command) for command in installs)
    # Every dependency is pinned exactly, so the image resolves what the tests ran.
    for requirement in PYPROJECT["project"]["dependencies"]:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+(\[[a-z,]+\])?==[0-9][0-9A-Za-z.]*", requirement)


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
