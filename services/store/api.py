"""The researchers' HTTP API (PROTOCOL.md) and the internal look-ups other services use.

Access: every `/api/*` and `/internal/*` route needs `Authorization: Bearer <admin token>`,
compared in constant time, and checked before the request body is even read (a stranger's
body is never parsed). Errors: always `{"error": {"code", "message"}}` (422 adds `field`, the
dotted name of the first offending field, when there is one), never a stack trace:

    401 unauthorized         no or a wrong token (with `WWW-Authenticate: Bearer`)
    404 not_found            no such session / route
    405 method_not_allowed
    422 invalid_request      a body or query that breaks PROTOCOL.md, or a body that is not
                             JSON at all (not UTF-8, NaN in a number field, nested too deep);
                             unknown_experiment for an unknown experiment
    429 too_many_requests    more than CANOPY_MAX_SESSIONS_PER_MINUTE sessions created in the
                             last 60 s (with `Retry-After`)
    500 internal_error       anything else; logged with its traceback, answered with a fixed text
"""

from __future__ import annotations

import csv
import io
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Annotated, Any, Literal

import orjson
from aio_pika.exceptions import AMQPError, PublishError
from fastapi import APIRouter, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common import outcomes
from services.common.errors import ApiCode, ApiError
from services.common.experiments import Registry
from services.store.deadletters import DeadLetterKeeper, NotRedrivable
from services.store.domain import (
    EXPORT_COLUMNS,
    CreateSession,
    group_config,
    iso_ts,
    layout_session,
    lobby_config,
)
from services.store.metrics import StoreMetrics
from services.store.replay import replay_session
from services.store.repository import Repository

log = logging.getLogger(__name__)

EXPORT_BATCH = 500
INTERNAL_ERROR_BODY = orjson.dumps(
    {"error": {"code": ApiCode.INTERNAL_ERROR, "message": "internal error"}}
)


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None


class ErrorBody(BaseModel):
    """Every error answer of the store."""

    error: ErrorDetail


def _documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    descriptions = {
        401: "no or a wrong admin token",
        404: "no such session",
        422: "the request breaks the contract",
        429: "too many sessions created in the last minute",
    }
    return {
        status: {"model": ErrorBody, "description": descriptions[status]} for status in statuses
    }


def _error(status: int, code: str, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, **extra}}, status_code=status)


class _InternalErrors:
    """Outermost handler: an exception nobody answered becomes a logged 500 `internal_error`.

    (Starlette's own last resort answers in plain text and re-raises into the server's log.)
    A streamed response that fails after it started can only be cut short: logged, re-raised.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                raise
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(INTERNAL_ERROR_BODY)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": INTERNAL_ERROR_BODY})


def install_error_handlers(app: FastAPI) -> None:
    """Every error is `{"error": {"code", "message"}}` (module docstring), never a stack trace."""
    app.add_middleware(_InternalErrors)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        response = _error(exc.status, exc.code, exc.message)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts, fields = [], []
        for error in exc.errors():
            if error.get("type") == "json_invalid":
                parts.append("the body is not valid JSON")
                continue
            loc = list(error.get("loc", ()))
            if loc and loc[0] in ("body", "query", "path", "header", "cookie"):
                loc = loc[1:]
            where = ".".join(str(p) for p in loc)
            message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
            parts.append(f"{where}: {message}" if where else message)
            if where:
                fields.append(where)
        code = (
            ApiCode.UNKNOWN_EXPERIMENT
            if any("unknown experiment" in p for p in parts)
            else ApiCode.INVALID_REQUEST
        )
        extra = {"field": fields[0]} if fields else {}
        return _error(422, code, "; ".join(parts)[:2000] or "invalid request", **extra)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot decode at all (not UTF-8, nested past the
            # parser's recursion limit): to a client that is just JSON it cannot send, as is
            # a syntax error (422).
            return _error(422, ApiCode.INVALID_REQUEST, "the body is not valid JSON")
        codes = {
            401: ApiCode.UNAUTHORIZED,
            404: ApiCode.NOT_FOUND,
            405: ApiCode.METHOD_NOT_ALLOWED,
        }
        response = _error(
            exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)
        )
        response.headers.update(exc.headers or {})
        return response


# Declares the scheme in the OpenAPI schema; the check itself is `token_matches`.
_BEARER = HTTPBearer(
    auto_error=False, scheme_name="adminToken", description="the admin token (CANOPY_ADMIN_TOKEN)"
)


# The token a route accepts, or several: `/internal` takes the internal token and the admin
# token (a superset role); `/api` takes only the admin token (docs/operations.md).
Tokens = str | tuple[str, ...]


def token_matches(authorization: str | None, token: Tokens) -> bool:
    """Whether an `Authorization` header carries `Bearer <token>` (one of them), compared in
    constant time."""
    scheme, _, credentials = (authorization or "").partition(" ")
    given = scheme.lower().encode() + b" " + credentials.strip().encode()
    found = False
    for one in (token,) if isinstance(token, str) else token:
        found |= bool(one) and secrets.compare_digest(given, b"bearer " + one.encode())
    return found


def _unauthorized() -> ApiError:
    return ApiError(
        401,
        ApiCode.UNAUTHORIZED,
        "missing or wrong 'Authorization: Bearer <token>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


def bearer_auth(token: Tokens) -> Any:
    """The token check as a router dependency (and the security scheme in the OpenAPI schema)."""

    async def check(
        request: Request,
        _: Annotated[HTTPAuthorizationCredentials | None, Security(_BEARER)],
    ) -> None:
        if not token_matches(request.headers.get("authorization"), token):
            raise _unauthorized()

    return Depends(check)


def token_first_route(token: Tokens) -> type[APIRoute]:
    """A route class that checks the token before FastAPI reads and parses the body: without
    it, a stranger's malformed body would get a 422 (and be parsed) before the 401."""

    class TokenFirstRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def checked(request: Request) -> Response:
                if not token_matches(request.headers.get("authorization"), token):
                    raise _unauthorized()
                return await handler(request)

            return checked

    return TokenFirstRoute


class CreationLimit:
    """At most `per_minute` sessions created in any 60 s (a sliding window of their times)."""

    WINDOW = 60.0

    def __init__(self, per_minute: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_minute = per_minute
        self._clock = clock
        self._times: deque[float] = deque()

    def take(self) -> float | None:
        """Count one creation now; or, if the limit is reached, seconds until the next may."""
        now = self._clock()
        while self._times and self._times[0] <= now - self.WINDOW:
            self._times.popleft()
        if len(self._times) >= self._per_minute:
            return self._times[0] + self.WINDOW - now
        self._times.append(now)
        return None


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
                "key": p.get("key"),
                "group": p["group"],
                "id_in_group": p["id_in_group"],
                "url": p["url"],
                "connected": bool(p.get("connected")),
                # A bot plays (or played) this seat: a free seat the lobby gave a bot, or a
                # member's seat while they were away (on_disconnect bots).
                "bot": bool(p.get("bot") or p.get("bot_played")),
                # PROTOCOL v2 "Online studies": the seat's external id, where its person is.
                "label": p.get("label"),
                "status": seat_status(p),
                "outcome": p.get("outcome"),
                "finished_at": iso_ts(p["finished_at"]) if p.get("finished_at") else None,
                # Arrival grouping: when the person first came to the lobby.
                "lobby_since": iso_ts(p["lobby_since"]) if p.get("lobby_since") else None,
                # Ended periods' payoffs (PROTOCOL v1.1), keyed by the period's number.
                "payoffs": {
                    period: _finite_or_none(payoff)
                    for period, payoff in sorted(
                        p.get("payoffs", {}).items(), key=lambda kv: int(kv[0])
                    )
                },
                "total_payoff": _total(p.get("payoffs", {}).values()),
            }
            for p in participants
        ],
        "connected": len(connected),
    }


def seat_status(participant: dict[str, Any]) -> str:
    """`finished` (it has an outcome); `lobby` (arrival grouping: given to someone, no group
    yet); `playing` (seen connected, or given by the study link); else `unassigned`."""
    if participant.get("outcome"):
        return "finished"
    taken = participant.get("seen") or participant.get("taken")
    if taken and "group" in participant and participant["group"] is None:
        return "lobby"
    if taken:
        return "playing"
    return "unassigned"


PAYMENT_COLUMNS = (
    "label", "code", "outcome", "total_payoff", "bonus", "show_up_fee", "currency",
)  # fmt: skip


def payment_rows(
    session: dict[str, Any], participants: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The payments file (PROTOCOL v2 "Payments"): one row per seat with a label or an
    outcome, in seat order (`participants` as `Repository.session_participants` gives them);
    the total payoff is the session detail's `total_payoff`."""
    payment = session.get("payment") or {}
    rate = float(payment.get("exchange_rate", 1.0))
    rows = []
    for p in participants:
        if p.get("label") is None and not p.get("outcome"):
            continue
        total = _total(p.get("payoffs", {}).values())
        rows.append(
            {
                "label": p.get("label"),
                "code": p["_id"],
                "outcome": p.get("outcome"),
                "total_payoff": total,
                "bonus": outcomes.bonus(total, rate),
                "show_up_fee": float(payment.get("show_up_fee", 0.0)),
                "currency": payment.get("currency"),
            }
        )
    return rows


def payments_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(PAYMENT_COLUMNS)
    for row in rows:
        writer.writerow(["" if row[c] is None else row[c] for c in PAYMENT_COLUMNS])
    return buffer.getvalue()


def payments_prolific(rows: list[dict[str, Any]]) -> str:
    """Prolific's bulk-bonus text: `<label>,<bonus>` a line, no header, labelled seats with
    a bonus over 0 only."""
    return "".join(
        f"{row['label']},{row['bonus']:.2f}\n" for row in rows if row["label"] and row["bonus"] > 0
    )


def _finite_or_none(value: Any) -> float | None:
    """A stored payoff as JSON can hold it: a payoff that is not a finite number (one logged
    as `null`, or stored by an older version as infinite) is `null`, never a 500."""
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return value
    return None


def _total(payoffs: Iterable[Any]) -> float | None:
    """The sum of a participant's period payoffs; `null` if one of them, or the sum, is not a
    finite number."""
    values = [_finite_or_none(v) for v in payoffs]
    if any(v is None for v in values):
        return None
    total = sum(v for v in values if v is not None)
    return total if math.isfinite(total) else None


# Group sizes probed with an experiment's default params for the console's hints.
PROBED_GROUP_SIZES = range(1, 9)


def experiment_info(name: str, registry: Registry) -> dict[str, Any]:
    """What the console's form needs to know of one experiment (`GET /api/experiments`).

    `description`: the experiment's `description` attribute when it has one (a string), else
    its class docstring (docs/experiments.md); the console shows its first paragraph.
    `decision`: what it declares a decision to be, for its default params (null when it
    declares none, or its params have no defaults)."""
    experiment = registry.get(name)
    model = experiment.params_model
    doc = experiment.description
    rules: list[str] = []
    allowed: list[int] = []
    try:
        defaults = model()
    except ValueError:
        defaults = None  # params without defaults: nothing to probe with
    if defaults is not None:
        for size in PROBED_GROUP_SIZES:
            problem = experiment.check_group(defaults, size)
            if problem is None:
                allowed.append(size)
            elif problem[1] not in rules:
                rules.append(problem[1])
    return {
        "name": name,
        "description": doc,
        "source": registry.source(name),  # "built-in", "entry point …" (with its version)
        "channels": sorted(experiment.channels),
        "params_schema": model.model_json_schema(),
        "min_group_size": min(allowed) if allowed else None,
        "group_size_rules": rules,
        "decision": (
            None if defaults is None else experiment.declared_json(defaults.model_dump(mode="json"))
        ),
    }


def api_router(
    repository: Repository,
    metrics: StoreMetrics,
    public_url: str,
    token: str,
    seat_secret: bytes,
    *,
    max_sessions_per_minute: int,
    registry: Registry | None = None,
) -> APIRouter:
    """The researchers' API; `registry`: the experiments it serves (the store's, made at its
    start; the built-ins alone when none is given)."""
    registry = Registry.builtin() if registry is None else registry
    sessions = CreateSession.of(registry)  # the body of POST /api/sessions
    router = APIRouter(
        prefix="/api",
        dependencies=[bearer_auth(token)],
        route_class=token_first_route(token),
        responses=_documented(401, 422),
    )
    creations = CreationLimit(max_sessions_per_minute)

    async def load(session_id: str) -> dict[str, Any]:
        session = await repository.session(session_id)
        if session is None:
            raise ApiError(404, ApiCode.NOT_FOUND, f"no session {session_id[:100]!r}")
        return session

    async def create_session(request: CreateSession) -> dict[str, Any]:
        wait = creations.take()
        if wait is not None:
            raise ApiError(
                429,
                ApiCode.TOO_MANY_REQUESTS,
                f"more than {max_sessions_per_minute} sessions created in the last minute "
                f"(CANOPY_MAX_SESSIONS_PER_MINUTE); retry in {math.ceil(wait)} s",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )
        layout = layout_session(request, public_url, seat_secret)
        await repository.create_session(layout)
        metrics.sessions_created.inc()
        return {
            "session": layout["session"]["_id"],
            # The study link: one link for everyone (PROTOCOL v2 "Online studies").
            "join_url": layout["session"]["join_url"],
            "groups": [{"group": g["_id"], "participants": g["members"]} for g in layout["groups"]],
            "participants": [
                {
                    "code": p["_id"],
                    "key": p["key"],
                    "group": p["group"],
                    "id_in_group": p["id_in_group"],
                    "url": p["url"],
                    "label": p.get("label"),
                }
                for p in layout["participants"]
            ],
        }

    # The body is validated by this store's model (its registry's experiments): an annotation
    # of the class itself, not a name that FastAPI would look up in this module.
    create_session.__annotations__["request"] = sessions
    router.post("/sessions", status_code=201, responses=_documented(429))(create_session)

    @router.get("/experiments")
    async def list_experiments() -> dict[str, Any]:
        """Every registered experiment (plug-ins included) with its params' JSON schema, the
        JSON schema of a session's settings (the body of `POST /api/sessions`), and the
        plug-ins that failed to load here, with their errors (`failures`)."""
        return {
            "experiments": [experiment_info(name, registry) for name in registry.names()],
            "session_schema": sessions.model_json_schema(),
            "failures": [
                {"plugin": spec, "error": error}
                for spec, error in sorted(registry.failures().items())
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

    @router.get("/sessions/{session_id}/replay", responses=_documented(404))
    async def session_replay(session_id: str) -> dict[str, Any]:
        """Every group's ended periods, rebuilt from the event log (PROTOCOL v1.1)."""
        return await replay_session(repository, await load(session_id), registry)

    @router.get("/sessions/{session_id}", responses=_documented(404))
    async def session_detail(session_id: str) -> dict[str, Any]:
        session = await load(session_id)
        return session_summary(
            session,
            await repository.session_groups(session_id),
            await repository.session_participants(session_id),
        )

    @router.get(
        "/sessions/{session_id}/events",
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "the session's events, sorted by ts",
                "content": {
                    "text/csv": {"schema": {"type": "string"}},
                    "application/x-ndjson": {"schema": {"type": "string"}},
                },
            },
            **_documented(404),
        },
    )
    async def export_events(
        session_id: str, format: Annotated[Literal["csv", "jsonl"], Query()] = "csv"
    ) -> StreamingResponse:
        await load(session_id)
        metrics.exports.labels(format).inc()
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

    @router.get(
        "/sessions/{session_id}/payments",
        responses={
            200: {
                "description": "one row per seat with a label or an outcome, in seat order",
                "content": {
                    "text/csv": {"schema": {"type": "string"}},
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["payments"],
                            "properties": {"payments": {"type": "array", "items": {}}},
                        }
                    },
                    "text/plain": {"schema": {"type": "string"}},
                },
            },
            **_documented(404),
        },
    )
    async def payments(
        session_id: str, format: Annotated[Literal["csv", "json", "prolific"], Query()] = "csv"
    ) -> Response:
        """The payments file: `label`, `code`, `outcome`, `total_payoff`, `bonus`,
        `show_up_fee`, `currency` per seat (csv, json), or Prolific's bulk-bonus text
        (`<label>,<bonus>` a line, seats with a label and a bonus over 0)."""
        session = await load(session_id)
        rows = payment_rows(session, await repository.session_participants(session_id))
        if format == "json":
            return JSONResponse({"payments": rows})
        if format == "csv":
            text, media, suffix = payments_csv(rows), "text/csv; charset=utf-8", "csv"
        else:
            text, media, suffix = payments_prolific(rows), "text/plain; charset=utf-8", "txt"
        filename = f"canopy-{session_id}-payments.{suffix}"
        return Response(
            text,
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


def internal_router(repository: Repository, token: Tokens) -> APIRouter:
    """Look-ups for the gateway and decisions services (cached on their side)."""
    router = APIRouter(
        prefix="/internal",
        dependencies=[bearer_auth(token)],
        route_class=token_first_route(token),
        include_in_schema=False,
    )

    @router.get("/seats/{key}")
    async def seat(key: str) -> dict[str, Any]:
        """The participant whose seat key this is (the gateway checked its tag already)."""
        document = await repository.seat(key)
        if document is None:
            raise ApiError(404, ApiCode.NOT_FOUND, "unknown seat")
        return seat_info(document)

    @router.get("/groups/{group_id}")
    async def group(group_id: str) -> dict[str, Any]:
        document = await repository.group(group_id)
        session = await repository.session(document["session"]) if document else None
        if document is None or session is None:
            raise ApiError(404, ApiCode.NOT_FOUND, "unknown group")
        labels = await repository.group_labels(session["_id"], group_id)
        return group_config(session, document, labels).model_dump()

    @router.get("/lobbies/{session_id}")
    async def lobby(session_id: str) -> dict[str, Any]:
        """An arrival session's lobby (services.common.lobby.LobbyConfig), as it is now."""
        session = await repository.session(session_id)
        if session is None or session.get("grouping") != "arrival":
            raise ApiError(404, ApiCode.NOT_FOUND, "no lobby")
        groups = await repository.session_groups(session_id)
        labels = await repository.session_labels(session_id)
        return lobby_config(session, groups, labels).model_dump()

    @router.post("/lobbies/{session_id}/groups/{group_id}")
    async def form_group(session_id: str, group_id: str, request: FormGroup) -> dict[str, Any]:
        """Form a group of the lobby (decisions, once `group_size` people wait): the members
        it has now, the request's or those of whoever formed it first."""
        formed = await repository.form_group(session_id, group_id, request.members, request.bots)
        if formed is None:
            if request.bots and await repository.group(group_id) is not None:
                raise ApiError(409, "no_free_seats", "not enough free seats for the bots")
            raise ApiError(404, ApiCode.NOT_FOUND, "unknown group")
        members, bots = formed
        return {"group": group_id, "members": members, "bots": bots}

    @router.post("/join/{join_key}")
    async def join(join_key: str, request: JoinRequest) -> dict[str, Any]:
        """A seat for someone who opened the study link (the gateway checked the join key's
        tag already): `{"key", "finished", "label", "seat"}`, or `{"full": true, "redirect",
        "code"}`."""
        session = await repository.session_by_join_key(join_key)
        if session is None:
            raise ApiError(404, ApiCode.NOT_FOUND, "unknown join key")
        label = request.label_in(str(session.get("label_param") or "label"))
        seat = await repository.join(session["_id"], label, request.seat)
        if seat is None:
            redirect, code = outcomes.destination(
                "full",
                session.get("completion") or {},
                label=label,
                code="",
                session=session["_id"],
            )
            return {"full": True, "redirect": redirect, "code": code}
        # `seat`: what `/internal/seats/{key}` would answer, so the gateway that sends the
        # person there knows the seat when their socket opens, without asking again.
        return {
            "key": seat["key"],
            "finished": bool(seat.get("outcome")),
            "label": label,
            "seat": seat_info(seat),
        }

    return router


def seat_info(document: dict[str, Any]) -> dict[str, Any]:
    """A seat as the gateway knows it (services.common.directory.ParticipantInfo)."""
    return {
        "participant": document["_id"],
        "session": document["session"],
        "group": document["group"],
        "id_in_group": document["id_in_group"],
        "experiment": document["experiment"],
    }


MAX_LABEL = 128  # as a label in `labels` (CreateSession)


class FormGroup(BaseModel):
    """Body of `POST /internal/lobbies/{session}/groups/{group}`: the members, in order."""

    model_config = ConfigDict(extra="forbid", strict=True)

    members: Annotated[
        list[Annotated[str, Field(max_length=64)]], Field(min_length=1, max_length=1_000)
    ]
    bots: Annotated[int, Field(ge=0, le=1_000)] = 0  # free seats to fill with bots


class JoinRequest(BaseModel):
    """Body of `POST /internal/join/{join_key}`: the label the link carried (`label`, null:
    none), or the link's whole query (`query`: only the store knows the session's
    `label_param`, so the gateway may pass it all), and the seat key of the browser's cookie
    (`seat`, for label-less arrivals). An empty label is none; a longer one than a label can
    be is a 422."""

    model_config = ConfigDict(extra="forbid", strict=True)

    label: Annotated[str, Field(max_length=MAX_LABEL)] | None = None
    query: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=256)]],
            Field(max_length=20),
        ]
        | None
    ) = None
    seat: Annotated[str, Field(max_length=64)] | None = None

    def label_in(self, label_param: str) -> str | None:
        """The label this arrival carries: `label`, else the query's `label_param`."""
        label = self.label
        if label is None and self.query is not None:
            label = self.query.get(label_param)
        if not label:
            return None
        if len(label) > MAX_LABEL:
            error = {
                "loc": ("body", "query", label_param),
                "msg": f"a label is at most {MAX_LABEL} characters",
                "type": "value_error",
            }
            raise RequestValidationError([error])
        return label


def monitor_page() -> Response:
    """The researcher console (static/console.html; its script and styles under /static/console)."""
    from importlib.resources import files

    html = files("services.store").joinpath("static/console.html").read_text()
    return Response(html, media_type="text/html; charset=utf-8")


def dead_letters_router(dead_letters: DeadLetterKeeper, token: str) -> APIRouter:
    """Dead letters (services/store/deadletters.py): what consumers gave up on, and a redrive.

    `GET /api/dead-letters?state=dead|redriven&limit=N`: `{"total", "dead", "dead_letters"}`,
    newest first, each body cut to 4 KiB of text. `POST /api/dead-letters/{id}/redrive`:
    publishes it again where it came from; 404 unknown, 409 `not_redrivable`, 503
    `unavailable` when the broker did not take it."""
    router = APIRouter(
        prefix="/api",
        dependencies=[bearer_auth(token)],
        route_class=token_first_route(token),
        responses=_documented(401, 422),
    )

    @router.get("/dead-letters")
    async def list_dead_letters(
        state: Annotated[Literal["dead", "redriven"] | None, Query()] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        found = await dead_letters.list(limit=limit, state=state)
        return {**await dead_letters.summary(), "dead_letters": found}

    @router.post(
        "/dead-letters/{dead_letter_id}/redrive",
        responses={
            status: {"model": ErrorBody, "description": description}
            for status, description in (
                (404, "no such dead letter"),
                (409, "it cannot be published as it was, or nothing takes it there now"),
                (503, "the broker did not take it"),
            )
        },
    )
    async def redrive_dead_letter(dead_letter_id: str) -> dict[str, Any]:
        try:
            redriven = await dead_letters.redrive(dead_letter_id)
        except NotRedrivable as exc:
            raise ApiError(409, "not_redrivable", str(exc)) from exc
        except PublishError as exc:  # unroutable: no queue is bound there any more
            raise ApiError(409, "not_redrivable", f"unroutable now: {exc!r}"[:300]) from exc
        except (AMQPError, ConnectionError, RuntimeError, TimeoutError) as exc:
            log.warning("redrive of dead letter %s failed: %r", dead_letter_id, exc)
            raise ApiError(
                503, "unavailable", f"the broker did not take it: {exc!r}"[:300]
            ) from exc
        if redriven is None:
            raise ApiError(404, ApiCode.NOT_FOUND, f"no dead letter {dead_letter_id[:100]!r}")
        return redriven

    return router
