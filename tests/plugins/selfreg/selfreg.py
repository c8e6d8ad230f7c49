"""A plug-in module that registers its experiment itself when imported (named without
`:Attribute` in CANOPY_EXPERIMENT_MODULES): tests/unit/test_plugins.py."""

from __future__ import annotations

from canopy_min_effort import MinEffort

from services.common.experiments import register


class SelfRegistered(MinEffort):
    name = "self_registered"


register(SelfRegistered())
