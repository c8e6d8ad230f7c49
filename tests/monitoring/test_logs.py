"""The log format's pieces (services.common.logs): participant codes blanked out of uvicorn's
handshake lines, identifiers as JSON fields. The whole stack's logs: test_metrics.py."""

from __future__ import annotations

import io
import json
import logging

import pytest
from pythonjsonlogger.json import JsonFormatter

from services.common.logs import REDACTED, RedactCodes, context, redact_path


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/ws/17dfe23c41902770c9a5", f"/ws/{REDACTED}"),
        ("/p/17dfe23c41902770c9a5?lang=de", f"/p/{REDACTED}?lang=de"),
        ("/ws/", "/ws/"),
        ("/api/sessions/abc", "/api/sessions/abc"),
        ("/static/p/app.js", "/static/p/app.js"),
    ],
)
def test_redact_path(path: str, expected: str) -> None:
    assert redact_path(path) == expected


def _emit(logger: str, message: str, *args: object, **extra: str) -> dict[str, str]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("%(levelname)s %(name)s %(message)s"))
    handler.addFilter(RedactCodes())
    log = logging.getLogger(logger)
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning(message, *args, extra=extra)
    finally:
        log.removeHandler(handler)
        log.propagate = True
    line: dict[str, str] = json.loads(stream.getvalue())
    return line


def test_uvicorn_handshake_lines_lose_the_code() -> None:
    line = _emit("uvicorn.error", '%s - "WebSocket %s" [accepted]', "127.0.0.1:5", "/ws/secret42")
    assert line["message"] == '127.0.0.1:5 - "WebSocket /ws/<key>" [accepted]'


def test_our_lines_keep_their_fields() -> None:
    fields = context("s1", "g1", "p1", message_id=None)
    assert fields == {"session": "s1", "group": "g1", "participant": "p1"}
    line = _emit("services.gateway.api", "participant connected", **fields)
    assert (line["message"], line["session"], line["group"], line["participant"]) == (
        "participant connected",
        "s1",
        "g1",
        "p1",
    )
