"""Plug-in experiments are found through the `canopy.experiments` entry-point group or
CANOPY_EXPERIMENT_MODULES, in a fresh interpreter each (discovery happens once per process);
what loaded, and from where, is logged once; a plug-in that fails to load is logged with its
error and left out, the others still served."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import PLUGINS_SITE

PROBE = (
    "import json, logging; logging.basicConfig(level=logging.INFO, format='%(levelname)s "
    "%(message)s'); from services.common import experiments as e; e.load(); "
    "x = e.get('min_effort'); "
    "print(json.dumps({'names': e.load(), 'payoffs': x.payoffs({'a': 3, 'b': 5}, {}, {}), "
    "'sources': {n: e.source(n) for n in e.names()}, 'failures': e.failures()}))"
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
        "cournot",  # tests/plugins/site/canopy_cournot: tests/e2e/test_plugin_contract.py
        "decisions",
        "double_auction",
        "fragile",  # tests/plugins/site/canopy_fragile: tests/hostile/test_experiment_failures.py
        "min_effort",
        "public_goods",
    ]
    assert found["payoffs"] == {"a": 2 * 3 - 3 + 6, "b": 2 * 3 - 5 + 6}
    assert found["sources"]["min_effort"] == (
        "entry point canopy_min_effort:MinEffort, canopy-min-effort 0.1.0"
    )
    assert found["sources"]["bimatrix"] == "built-in"
    # Logged once, however often the registry is asked, naming each and its source.
    logged = [line for line in result.stderr.splitlines() if line.startswith("INFO experiments:")]
    assert len(logged) == 1, result.stderr
    entry = "min_effort (entry point canopy_min_effort:MinEffort, canopy-min-effort 0.1.0)"
    assert entry in logged[0]
    assert "public_goods (built-in)" in logged[0]


def test_a_module_named_in_the_setting_is_found_too() -> None:
    env = {
        "PYTHONPATH": f"{PLUGINS_SITE}{os.pathsep}.",
        "CANOPY_EXPERIMENT_MODULES": "canopy_min_effort:MinEffort",
    }
    result = probe(env)  # named twice (entry point and setting): registered once
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["failures"] == {}


def test_a_module_named_alone_registers_itself_under_the_setting() -> None:
    env = {"PYTHONPATH": f"{PLUGINS_SITE}{os.pathsep}.", "CANOPY_EXPERIMENT_MODULES": "selfreg"}
    module = PLUGINS_SITE.parent / "selfreg"
    env["PYTHONPATH"] += f"{os.pathsep}{module}"
    result = probe(env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["sources"]["self_registered"] == (
        "CANOPY_EXPERIMENT_MODULES selfreg"
    )


def test_a_broken_plug_in_is_logged_with_its_error_and_the_others_are_served() -> None:
    # Three ways to fail: an import error, a class without a hook, a name taken already.
    broken = "no_such_module:Game,services.common.experiments:NoParams,canopy_taken:Taken"
    env = {
        "PYTHONPATH": f"{PLUGINS_SITE}{os.pathsep}{PLUGINS_SITE.parent / 'selfreg'}{os.pathsep}.",
        "CANOPY_EXPERIMENT_MODULES": broken,
    }
    result = probe(env)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert "min_effort" in found["names"] and "public_goods" in found["names"]
    assert set(found["failures"]) == {
        "no_such_module:Game",
        "services.common.experiments:NoParams",
        "canopy_taken:Taken",
    }
    assert "No module named 'no_such_module'" in found["failures"]["no_such_module:Game"]
    assert "has no 'name'" in found["failures"]["services.common.experiments:NoParams"]
    assert "registered already" in found["failures"]["canopy_taken:Taken"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 3, result.stderr
    assert "experiment plug-in 'no_such_module:Game' failed to load, left out" in errors[0]
    assert "Traceback" in result.stderr  # with its traceback, for the plug-in's author
