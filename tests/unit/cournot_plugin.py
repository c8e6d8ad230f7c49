"""The example Cournot plug-in (tests/plugins/site/canopy_cournot) for in-process tests, loaded
from its file without putting the plug-ins' site on `sys.path`: the registry of the test
process must not find it (tests/unit/test_bots_plugin_range.py plays a plug-in that is not
installed), so it is never registered here, only handed to what takes an experiment."""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from tests.conftest import PLUGINS_SITE

MODULE = "canopy_cournot_under_test"  # not the package's own name: no entry point finds it


def cournot() -> Any:
    """A fresh `Cournot` instance of the example package."""
    module = sys.modules.get(MODULE)
    if module is None:
        path = PLUGINS_SITE / "canopy_cournot" / "__init__.py"
        spec = importlib.util.spec_from_file_location(MODULE, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[MODULE] = module  # pydantic resolves the params' annotations through it
        spec.loader.exec_module(module)
    return module.Cournot()
