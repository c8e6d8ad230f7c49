"""The researchers' HTTP API (PROTOCOL.md) and the internal look-ups other services use."""

from __future__ import annotations

import csv
import io
import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import ApiError
from services.store.domain import EXPORT_COLUMNS, CreateSession, iso_ts, layout_session
from services.store.metrics import StoreMetrics
from services.store.repository import Repository

EXPORT_BATCH = 500


def install_error_handlers(app: FastAPI) -> None:
    """Every error is `{"error": {"code", "message"}}` with a 4xx status, never a stack trace."""

    def body(status: int, code: str, message: str) -> JSONResponse:
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return body(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                parts.append("the body is not valid JSON")
                continue
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
        code = (
            "unknown_experiment"
            if any("unknown experiment" in p for p in parts)
            else ("invalid_request")
        )
        return body(422, code, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
        return body(exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail))


def bearer_auth(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    async def check(authorization: Annotated[str | None, Header()] = None) -> None:
        if authorization is None or not secrets.compare_digest(authorization.encode(), expected):
            raise ApiError(401, "unauthorized", "missing or wrong 'Authorization: Bearer <token>'")

    return Depends(check)


def session_summary(
    session: dict[str, Any], groups: list[dict[str, Any]], participants: list[dict[str, Any]]
) -> dict[str, Any]:
    config = {k: v for k, v in session.items() if k not in ("_id", "groups", "created_at")}
    connected = {p["_id"] for p in participants if p.get("connected")}
    return {
        "session": session["_id"],
        **config,
        "created_at": session["created_at"].isoformat(),
        "groups": [
            {
                "group": g["_id"],
                "participants": g["members"],
                "period": g.get("period"),
                "connected": sum(1 for m in g["members"] if m in connected),
            }
            for g in sorted(groups, key=lambda g: session["groups"].index(g["_id"]))
        ],
        "participants": [
            {
                "code": p["_id"],
                "group": p["group"],
                "id_in_group": p["id_in_group"],
                "url": p["url"],
                "connected": bool(p.get("connected")),
            }
            for p in participants
        ],
        "connected": len(connected),
    }


def api_router(
    repository: Repository, metrics: StoreMetrics, public_url: str, token: str
) -> APIRouter:
    router = APIRouter(prefix="/api", dependencies=[bearer_auth(token)])

    async def load(session_id: str) -> dict[str, Any]:
        session = await repository.session(session_id)
        if session is None:
            raise ApiError(404, "not_found", f"no session {session_id!r}")
        return session

    @router.post("/sessions", status_code=201)
    async def create_session(request: CreateSession) -> dict[str, Any]:
        layout = layout_session(request, public_url)
        await repository.create_session(layout)
        metrics.sessions.inc()
        return {
            "session": layout["session"]["_id"],
            "groups": [{"group": g["_id"], "participants": g["members"]} for g in layout["groups"]],
            "participants": [
                {
                    "code": p["_id"],
                    "group": p["group"],
                    "id_in_group": p["id_in_group"],
                    "url": p["url"],
                }
                for p in layout["participants"]
            ],
        }

    @router.get("/sessions")
    async def list_sessions() -> dict[str, Any]:
        sessions = []
        for session in await repository.list_sessions():
            sessions.append(
                session_summary(
                    session,
                    await repository.session_groups(session["_id"]),
                    await repository.session_participants(session["_id"]),
                )
            )
        return {"sessions": sessions}

    @router.get("/sessions/{session_id}")
    async def session_detail(session_id: str) -> dict[str, Any]:
        session = await load(session_id)
        return session_summary(
            session,
            await repository.session_groups(session_id),
            await repository.session_participants(session_id),
        )

    @router.get("/sessions/{session_id}/events")
    async def export_events(
        session_id: str, format: Annotated[Literal["csv", "jsonl"], Query()] = "csv"
    ) -> StreamingResponse:
        await load(session_id)
        if format == "csv":
            media, filename = "text/csv; charset=utf-8", f"canopy-{session_id}-events.csv"
            chunks = _csv_chunks(repository.session_events(session_id))
        else:
            media, filename = "application/x-ndjson", f"canopy-{session_id}-events.jsonl"
            chunks = _jsonl_chunks(repository.session_events(session_id))
        return StreamingResponse(
            chunks,
            media_type=media,
            headers={"Content-Disposition": f'attachment; filename="{filename}"'},
        )

    return router


def _row(document: dict[str, Any]) -> list[Any]:
    return [
        iso_ts(document["ts"]),
        document["session"],
        document["group"],
        document.get("participant") or "",
        document["direction"],
        document["channel"],
        "" if document.get("seq") is None else document["seq"],
        document["value"],
    ]


async def _csv_chunks(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(EXPORT_COLUMNS)
    rows = 0
    async for document in events:
        writer.writerow(_row(document))
        rows += 1
        if rows % EXPORT_BATCH == 0:
            yield buffer.getvalue().encode()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue().encode()


async def _jsonl_chunks(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    lines: list[bytes] = []
    async for document in events:
        row = dict(zip(EXPORT_COLUMNS, _row(document), strict=True))
        row["participant"] = document.get("participant") or ""  # "empty" for a group broadcast
        row["seq"] = document.get("seq")
        row["value"] = orjson.Fragment(document["value"])  # already JSON text
        lines.append(orjson.dumps(row) + b"\n")
        if len(lines) >= EXPORT_BATCH:
            yield b"".join(lines)
            lines = []
    yield b"".join(lines)


def internal_router(repository: Repository, token: str) -> APIRouter:
    """Look-ups for the gateway and decisions services (cached on their side)."""
    router = APIRouter(
        prefix="/internal", dependencies=[bearer_auth(token)], include_in_schema=False
    )

    @router.get("/participants/{code}")
    async def participant(code: str) -> dict[str, Any]:
        document = await repository.participant(code)
        if document is None:
            raise ApiError(404, "not_found", "unknown participant")
        return {
            "participant": document["_id"],
            "session": document["session"],
            "group": document["group"],
            "id_in_group": document["id_in_group"],
            "experiment": document["experiment"],
        }

    @router.get("/groups/{group_id}")
    async def group(group_id: str) -> dict[str, Any]:
        document = await repository.group(group_id)
        session = await repository.session(document["session"]) if document else None
        if document is None or session is None:
            raise ApiError(404, "not_found", "unknown group")
        return {
            "session": session["_id"],
            "group": group_id,
            "experiment": session["experiment"],
            "members": document["members"],
            "num_periods": session["num_periods"],
            "period_length": session["period_length"],
            "num_subperiods": session["num_subperiods"],
            "rate_limit": session["rate_limit"],
            "params": session["params"],
        }

    return router


def monitor_page() -> Response:
    from importlib.resources import files

    html = files("services.store").joinpath("static/monitor.html").read_text()
    return Response(html, media_type="text/html; charset=utf-8")
