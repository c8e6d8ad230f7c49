"""A plug-in whose name is taken already (by the built-in `bimatrix`): refused at load, logged,
left out. tests/unit/test_plugins.py."""

from __future__ import annotations

from canopy_min_effort import MinEffort


class Taken(MinEffort):
    name = "bimatrix"
