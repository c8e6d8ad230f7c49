"""The store's pure logic: session layout, event documents, export rows."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, model_validator

from services.common import experiments
from services.common.messages import LogRecord

EXPORT_COLUMNS = ("ts", "session", "group", "participant", "direction", "channel", "seq", "value")


class CreateSession(BaseModel):
    """Body of `POST /api/sessions` (PROTOCOL.md)."""

    model_config = ConfigDict(extra="forbid")

    experiment: str
    num_participants: int = Field(ge=1, le=10_000)
    group_size: int = Field(ge=1, le=1_000)
    num_periods: int = Field(default=1, ge=1, le=1_000)
    period_length: float = Field(gt=0, le=86_400)
    num_subperiods: int = Field(default=0, ge=0, le=100_000)
    rate_limit: float = Field(default=0.0, ge=0, le=3_600)
    params: dict[str, Any] = Field(default_factory=dict)
    label: str = Field(default="", max_length=200)

    @model_validator(mode="after")
    def _check(self) -> CreateSession:
        if self.experiment not in experiments.names():
            raise ValueError(
                f"unknown experiment {self.experiment!r}; known: {', '.join(experiments.names())}"
            )
        if self.num_participants % self.group_size:
            raise ValueError("num_participants must be a multiple of group_size")
        return self


def new_session_id() -> str:
    return secrets.token_hex(6)


def new_group_id() -> str:
    return secrets.token_hex(8)


def new_participant_code() -> str:
    return secrets.token_hex(10)  # 80 random bits: unguessable


def layout_session(request: CreateSession, public_url: str) -> dict[str, Any]:
    """The session, group and participant documents of a new session."""
    session_id = new_session_id()
    created_at = datetime.now(UTC)
    config = request.model_dump()
    groups, participants = [], []
    for _ in range(request.num_participants // request.group_size):
        group_id = new_group_id()
        codes = [new_participant_code() for _ in range(request.group_size)]
        groups.append(
            {
                "_id": group_id,
                "session": session_id,
                "members": codes,
                "period": {"number": 1, "state": "waiting", "ends_at": None},
            }
        )
        for index, code in enumerate(codes, start=1):
            participants.append(
                {
                    "_id": code,
                    "session": session_id,
                    "group": group_id,
                    "id_in_group": index,
                    "experiment": request.experiment,
                    "url": f"{public_url.rstrip('/')}/p/{code}",
                    "connected": False,
                }
            )
    session = {
        "_id": session_id,
        "created_at": created_at,
        **config,
        "groups": [g["_id"] for g in groups],
    }
    return {"session": session, "groups": groups, "participants": participants}


def event_document(record: LogRecord) -> dict[str, Any]:
    """The MongoDB document of a log record; its `_id` makes a re-sent record a duplicate."""
    return {
        "_id": record.id,
        "ts": record.ts,
        "session": record.session,
        "group": record.group,
        "participant": record.participant,
        "direction": record.direction,
        "channel": record.channel,
        "seq": record.seq,
        # JSON text: participants' keys may hold "$" or "." that a document field may not.
        "value": orjson.dumps(record.value).decode(),
    }


def iso_ts(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
