"""JSON logging for every service: one object per line, with the service and instance names.

A line about one session, group, participant or bus message carries them as fields
(`extra=context(...)`): `session`, `group`, `participant`, `message_id`. What is logged at INFO
is one line per lifecycle event (a start, a connection, a rebuild, a period) and per error,
never one per decision or frame: those are counted in `/metrics` instead.

uvicorn logs each WebSocket handshake and HTTP request at INFO with its path, and `/ws/{key}`
(like `/p/{key}`, and the store's internal `/internal/seats/{key}`) holds a participant's seat
key, the credential of their seat (PROTOCOL v2): `RedactCodes` blanks it out. Services log a
participant by its public code, never by its key.
"""

from __future__ import annotations

import logging
import re
import sys

from pythonjsonlogger.json import JsonFormatter

# A participant page, WebSocket or seat look-up path, up to the key's end (query strings
# included).
_CODE_PATH = re.compile(r"^(/(?:ws|p|join|internal/seats)/)[^/?\s]+")
REDACTED = "<key>"


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
    """`/ws/<key>`, `/p/<key>` (and the seat look-up) without the key; others unchanged."""
    return _CODE_PATH.sub(rf"\1{REDACTED}", path)


class RedactCodes(logging.Filter):
    """Blank seat keys out of uvicorn's request lines (`"WebSocket /ws/<key>"`)."""

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
    # seat keys in look-up URLs): keep their warnings.
    for noisy in ("aiormq", "aio_pika", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
