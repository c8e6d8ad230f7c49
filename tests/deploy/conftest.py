"""Fixtures of the deploy checks: each overlay rendered once per session (no stack needed)."""

from __future__ import annotations

import pytest

from tests.deploy.k8s import OVERLAYS, Resource, render


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[Resource]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}
