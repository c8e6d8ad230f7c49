"""Third-party browser files vendored under services/common/static/vendor (see its README).

The gateway (participant pages) and the store (researcher console) both serve them at
`/static/vendor/`, so a page never loads anything from a CDN.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

VENDOR_PREFIX = "/static/vendor"


def mount_vendor(app: FastAPI) -> None:
    """Mount the vendored files; call before any broader `/static` mount."""
    directory = Path(str(files("services.common").joinpath("static/vendor")))
    app.mount(VENDOR_PREFIX, StaticFiles(directory=directory), name="vendor")
