"""Makes a Python process that starts after the marker file exists a "newer version" of Canopy
for tests/faults/test_rolling_upgrade.py: every message it puts on the bus carries a field the
current readers do not know (top-level, in each envelope of a batch, in each log record).

On PYTHONPATH of the supervised stack only; the marker is `DEVSTACK_NEWER_MARKER`'s path. The
change is made where every bus message passes (aiormq's `basic_publish`, under aio-pika and
under the bus's own fast publish), so it covers every sender without touching the services."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any

FIELD = "added_by_a_newer_version"
VALUE = {"release": "next", "note": "readers must ignore what they do not know"}


def _with_field(document: Any) -> Any:
    if isinstance(document, list):
        return [_with_field(item) for item in document]
    if isinstance(document, dict):
        document = {**document, FIELD: VALUE}
        if isinstance(document.get("records"), list):
            document["records"] = [_with_field(r) for r in document["records"]]
        return document
    return document


def _install() -> None:
    import aiormq

    original = aiormq.Channel.basic_publish

    async def basic_publish(self: Any, body: bytes, **kwargs: Any) -> Any:
        with contextlib.suppress(ValueError):  # not JSON: left as it is
            body = json.dumps(_with_field(json.loads(body))).encode()
        return await original(self, body, **kwargs)

    aiormq.Channel.basic_publish = basic_publish  # type: ignore[method-assign]
    print(f"newer version: bus messages carry {FIELD!r}", file=sys.stderr, flush=True)


_marker = os.environ.get("DEVSTACK_NEWER_MARKER")
_service = any(arg.startswith("services.") for arg in sys.orig_argv)  # python -m services.X
if _marker and os.path.exists(_marker) and _service:
    _install()
