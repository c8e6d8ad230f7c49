"""Plug-in experiments are found through the `canopy.experiments` entry-point group or
CANOPY_EXPERIMENT_MODULES, in a fresh interpreter each (discovery happens once per process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import PLUGINS_SITE

PROBE = (
    "import json; from services.common import experiments as e; "
    "x = e.get('min_effort'); "
    "print(json.dumps({'names': e.names(), 'payoffs': x.payoffs({'a': 3, 'b': 5}, {}, {})}))"
)


def probe(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        env={k: v for k, v in os.environ.items() if k != "CANOPY_EXPERIMENT_MODULES"} | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_installed_package_is_found_by_its_entry_point() -> None:
    result = probe({"PYTHONPATH": f"{PLUGINS_SITE}{os.pathsep}."})
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["names"] == [
        "bimatrix",
        "decisions",
        "double_auction",
        "fragile",  # tests/plugins/site/canopy_fragile: tests/hostile/test_experiment_failures.py
        "min_effort",
        "public_goods",
    ]
    assert found["payoffs"] == {"a": 2 * 3 - 3 + 6, "b": 2 * 3 - 5 + 6}


def test_a_module_named_in_the_setting_is_found_too() -> None:
    env = {
        "PYTHONPATH": f"{PLUGINS_SITE}{os.pathsep}.",
        "CANOPY_EXPERIMENT_MODULES": "canopy_min_effort:MinEffort",
    }
    result = probe(env)  # named twice (entry point and setting): registered once
    assert result.returncode == 0, result.stderr


def test_a_broken_plug_in_says_which_and_why() -> None:
    result = probe({"PYTHONPATH": ".", "CANOPY_EXPERIMENT_MODULES": "no_such_module:Game"})
    assert result.returncode != 0
    assert "experiment plug-in 'no_such_module:Game' failed to load" in result.stderr
