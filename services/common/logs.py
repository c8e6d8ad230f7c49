"""JSON logging for every service: one object per line, with the service and instance names.

A line about one session, group, participant or bus message carries them as fields
(`extra=context(...)`): `session`, `group`, `participant`, `message_id`. What is logged at INFO
is one line per lifecycle event (a start, a connection, a rebuild, a period) and per error,
never one per decision or frame: those are counted in `/metrics` instead.

uvicorn logs each WebSocket handshake at INFO with its path, and `/ws/{code}` (like `/p/{code}`)
holds a participant's code, the credential of their seat: `RedactCodes` blanks it out.
"""

from __future__ import annotations

import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

# A participant page or WebSocket path, up to the code's end (query strings included).
_CODE_PATH = re.compile(r"^(/(?:ws|p)/)[^/?\s]+")
REDACTED = "<code>"


def context(
    session: str | None = None,
    group: str | None = None,
    participant: str | None = None,
    message_id: str | None = None,
) -> dict[str, str]:
    """The `extra` of a log call: the identifiers that are known, as JSON fields."""
    fields = {
        "session": session,
        "group": group,
        "participant": participant,
        "message_id": message_id,
    }
    return {key: value for key, value in fields.items() if value}


def redact_path(path: str) -> str:
    """`/ws/<code>` and `/p/<code>` without the code; other paths unchanged."""
    return _CODE_PATH.sub(rf"\1{REDACTED}", path)


class RedactCodes(logging.Filter):
    """Blank participant codes out of uvicorn's handshake lines (`"WebSocket /ws/<code>"`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn") and isinstance(record.args, tuple):
            record.args = tuple(
                redact_path(arg) if isinstance(arg, str) else arg for arg in record.args
            )
        return True


def configure_logging(service: str, instance: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter(
            "%(asctime)s %(levelname)s %(name)s %(message)s",
            rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            static_fields={"service": service, "instance": instance},
        )
    )
    handler.addFilter(RedactCodes())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiormq / aio_pika are chatty at INFO on reconnects, httpx logs every request (with
    # participant codes in look-up URLs): keep their warnings.
    for noisy in ("aiormq", "aio_pika", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
