"""docs/experiments.md is kept true by running it: every Python block runs as written (each on
its own, in a fresh interpreter, with only Canopy on the path), every TOML block parses, the
step-by-step example is the package the tests install, and that example, loaded as the page
says (CANOPY_EXPERIMENT_MODULES), registers and validates a session through the API's model.
Also: no link in the README or docs/ leaves the repository (issue 21)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import PLUGINS_SITE

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "experiments.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str, doc: Path = DOC) -> list[str]:
    return [body for lang, body in FENCE.findall(doc.read_text()) if lang == language]


def run(
    code: str, tmp: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`code` as a script in a fresh interpreter: Canopy importable, no plug-in installed."""
    script = tmp / "snippet.py"
    script.write_text(code)
    base = {k: v for k, v in os.environ.items() if not k.startswith("CANOPY_")}
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp,
        env=base | {"PYTHONPATH": str(ROOT)} | (env or {}),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def the_example() -> str:
    (example,) = [code for code in blocks("python") if "class MinEffort:" in code]
    return example


CONTINUES = "# (continues the module above)"


def runnable(index: int) -> str:
    """Block `index` as it runs: a block that says it continues the module above (the
    walk-through's "try it") runs after that block, in the same interpreter."""
    code = blocks("python")[index]
    if code.startswith(CONTINUES):
        return runnable(index - 1) + "\n" + code
    return code


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_every_python_block_runs_as_written(index: int, tmp_path: Path) -> None:
    result = run(runnable(index), tmp_path)
    assert result.returncode == 0, result.stderr


def test_there_are_blocks_to_run_and_toml_blocks_parse() -> None:
    assert len(blocks("python")) >= 2
    for block in blocks("toml"):
        tomllib.loads(block)


def test_the_example_is_the_package_the_tests_install() -> None:
    """Every line of the page's module is in the package, in order (the package adds its
    docstring, `from __future__ import annotations` and its `page`)."""
    package = (PLUGINS_SITE / "canopy_min_effort" / "__init__.py").read_text().splitlines()
    lines = iter(package)
    for line in filter(str.strip, the_example().splitlines()):
        assert line in lines, f"not in canopy_min_effort (or out of order): {line!r}"


def test_the_walk_through_module_is_the_cournot_package_the_tests_install() -> None:
    """docs/experiments.md "From nothing to a session with bots": its module is the package's
    (all but the package's docstring), line for line, and its entry point is the package's."""
    (module,) = [code for code in blocks("python") if "class Cournot:" in code]
    package = (PLUGINS_SITE / "canopy_cournot" / "__init__.py").read_text()
    assert package.endswith(module), "the docs' Cournot module is not canopy_cournot's"
    installed = (PLUGINS_SITE / "canopy_cournot-0.1.0.dist-info" / "entry_points.txt").read_text()
    (toml,) = [tomllib.loads(b) for b in blocks("toml") if "canopy_cournot" in b]
    points = toml["project"]["entry-points"]["canopy.experiments"]
    assert points == {"cournot": "canopy_cournot:Cournot"}
    assert "cournot = canopy_cournot:Cournot" in installed
    assert toml["project"]["name"] == "canopy-cournot"


def test_the_walk_through_commands_are_the_clis() -> None:
    """Every `canopy` command of the docs' shell blocks names a command and options the CLI
    has (tests/e2e/test_plugin_bots.py runs the same ones against the stack)."""
    import shlex

    from services.cli import main

    commands = [
        shlex.split(line)
        for block in blocks("sh")
        for line in block.replace("\\\n", " ").splitlines()
        if line.lstrip().startswith((".venv/bin/canopy ", "canopy "))
    ]
    assert len(commands) >= 2
    for words in commands:
        name = words[1]
        command = main.commands[name]
        known = {opt for param in command.params for opt in param.opts}
        given = {word for word in words[2:] if word.startswith("--")}
        assert given <= known, (name, given - known)


PROBE = """
import json
from pydantic import ValidationError
from services.common.experiments import Registry
from services.store.domain import CreateSession

registry = Registry.standard()  # as a store makes it: the built-ins, then the plug-ins
sessions = CreateSession.of(registry)
body = {"experiment": "min_effort", "num_participants": 4, "group_size": 2,
        "period_length": 60}
created = sessions.model_validate(body | {"params": {"max_effort": 5}})
refused = []
for params, size in (({"max_effort": 1}, 2), ({}, 1), ({"max_effrot": 5}, 2)):
    try:
        sessions.model_validate(body | {"params": params, "num_participants": size,
                                        "group_size": size})
    except ValidationError as exc:
        refused.append([".".join(map(str, e["loc"])) for e in exc.errors()])
game = registry.get("min_effort")
print(json.dumps({
    "source": registry.source("min_effort"),
    "params": created.params,
    "refused": refused,
    "payoffs": game.payoffs({"a": 3, "b": 5}, {"a": 1, "b": 2}, created.params),
}))
"""


def test_the_example_registers_and_a_session_validates_with_it(tmp_path: Path) -> None:
    (tmp_path / "docs_min_effort.py").write_text(the_example())
    env = {"CANOPY_EXPERIMENT_MODULES": "docs_min_effort:MinEffort"}
    env["PYTHONPATH"] = f"{tmp_path}{os.pathsep}{ROOT}"
    result = run(PROBE, tmp_path, env)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["source"] == "CANOPY_EXPERIMENT_MODULES docs_min_effort:MinEffort"
    # What every hook gets: a dict, defaults filled in (docs: "params is a dict").
    assert found["params"] == {"max_effort": 5, "a": 2.0, "b": 1.0, "c": 6.0}
    assert found["refused"] == [["params.max_effort"], ["group_size"], ["params.max_effrot"]]
    assert found["payoffs"] == {"a": 2 * 3 - 3 + 6, "b": 2 * 3 - 5 + 6}


LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")


def test_no_link_in_the_readme_or_the_docs_leaves_the_repository() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    outside = []
    for page in pages:
        for target in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path = (page.parent / target).resolve()
            if not path.is_relative_to(ROOT) or not path.exists():
                outside.append(f"{page.relative_to(ROOT)}: {target}")
    assert outside == []
