"""The store's error answers and session-creation limit, on the real routes in-process.

The routes and error handlers of services/store/api.py, mounted on a bare app with a fake
repository (no MongoDB): every error is `{"error": {"code", "message"}}`, a failure inside a
route is a logged 500 `internal_error` without a trace of the internals, and
`POST /api/sessions` past CANOPY_MAX_SESSIONS_PER_MINUTE answers 429.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from services.store.api import CreationLimit, api_router, install_error_handlers, internal_router
from services.store.metrics import StoreMetrics

TOKEN = "in-process-test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
BODY = {"experiment": "decisions", "num_participants": 2, "group_size": 2, "period_length": 5}
INTERNAL_NAMES = ("Traceback", "RuntimeError", "repository", ".py", "secret-detail", "line ")


class FakeRepository:
    """Sessions in a dict; `fail` makes every call raise, as a database outage would."""

    def __init__(self) -> None:
        self.sessions: dict[str, dict[str, Any]] = {}
        self.fail = False

    def _check(self) -> None:
        if self.fail:
            raise RuntimeError("secret-detail: connection to mongodb://db.internal:27017 lost")

    async def create_session(self, layout: dict[str, Any]) -> None:
        self._check()
        self.sessions[layout["session"]["_id"]] = layout["session"]

    async def list_sessions(self) -> list[dict[str, Any]]:
        self._check()
        return []

    async def session(self, session_id: str) -> dict[str, Any] | None:
        self._check()
        return self.sessions.get(session_id)

    async def seat(self, key: str) -> dict[str, Any] | None:
        self._check()
        return None


@pytest.fixture
def repository() -> FakeRepository:
    return FakeRepository()


@pytest.fixture
async def client(repository: FakeRepository) -> AsyncIterator[httpx.AsyncClient]:
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(
        api_router(
            repository,  # type: ignore[arg-type]
            StoreMetrics(),
            "http://gateway.test",
            TOKEN,
            b"k" * 32,
            max_sessions_per_minute=3,
        )
    )
    app.include_router(internal_router(repository, TOKEN))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://store.test") as client:
        yield client


def assert_error_body(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert {"code", "message"} <= set(body["error"]) <= {"code", "message", "field"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    for name in INTERNAL_NAMES:
        assert name not in response.text, response.text
    error: dict[str, Any] = body["error"]
    return error


async def test_a_failure_inside_a_route_is_a_logged_500(
    client: httpx.AsyncClient, repository: FakeRepository, caplog: pytest.LogCaptureFixture
) -> None:
    repository.fail = True
    with caplog.at_level(logging.ERROR, logger="services.store.api"):
        for method, path in [
            ("GET", "/api/sessions"),
            ("GET", "/api/sessions/abc"),
            ("POST", "/api/sessions"),
            ("GET", "/internal/seats/abc"),
        ]:
            response = await client.request(
                method, path, headers=AUTH, json=BODY if method == "POST" else None
            )
            error = assert_error_body(response, 500, "internal_error")
            assert error["message"] == "internal error"
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(logged) == 4
    assert all(r.exc_info and "secret-detail" in str(r.exc_info[1]) for r in logged)


async def test_every_error_has_the_contract_body(client: httpx.AsyncClient) -> None:
    assert_error_body(await client.get("/api/sessions"), 401, "unauthorized")
    assert_error_body(await client.get("/nowhere", headers=AUTH), 404, "not_found")
    assert_error_body(await client.get("/api/sessions/none", headers=AUTH), 404, "not_found")
    assert_error_body(await client.delete("/api/sessions", headers=AUTH), 405, "method_not_allowed")
    error = assert_error_body(
        await client.post("/api/sessions", headers=AUTH, json=BODY | {"num_participants": "2"}),
        422,
        "invalid_request",
    )
    assert error["field"] == "num_participants"
    assert_error_body(
        await client.post("/api/sessions", headers=AUTH, json=BODY | {"experiment": "nope"}),
        422,
        "unknown_experiment",
    )
    assert_error_body(
        await client.post(
            "/api/sessions", headers=AUTH | {"content-type": "application/json"}, content=b"{"
        ),
        422,
        "invalid_request",
    )
    error = assert_error_body(
        await client.get("/api/sessions/x/events?format=xml", headers=AUTH), 422, "invalid_request"
    )
    assert error["field"] == "format"


async def test_401_comes_before_the_body_is_read(client: httpx.AsyncClient) -> None:
    """A stranger's malformed body gets 401, not a 422 that would tell it how it is parsed."""
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}]:
        response = await client.post(
            "/api/sessions",
            headers=headers | {"content-type": "application/json"},
            content=b'{"experiment": NaN, ',
        )
        assert_error_body(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        TOKEN,
        f"Basic {TOKEN}",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN.upper()}",
        f"Bearer {TOKEN} {TOKEN}",
        f"Token {TOKEN}",
    ],
)
async def test_wrong_tokens_are_refused(
    client: httpx.AsyncClient, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    assert_error_body(await client.get("/api/sessions", headers=headers), 401, "unauthorized")
    assert_error_body(await client.get("/internal/seats/x", headers=headers), 401, "unauthorized")


@pytest.mark.parametrize(
    "authorization", [f"Bearer {TOKEN}", f"bearer {TOKEN}", f"Bearer  {TOKEN}"]
)
async def test_the_token_passes(client: httpx.AsyncClient, authorization: str) -> None:
    response = await client.get("/api/sessions", headers={"Authorization": authorization})
    assert response.status_code == 200, response.text


async def test_session_creation_is_limited(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        assert (await client.post("/api/sessions", headers=AUTH, json=BODY)).status_code == 201
    # Refused bodies do not count, and are refused as such, not as too many.
    bad = await client.post("/api/sessions", headers=AUTH, json=BODY | {"group_size": 3})
    assert_error_body(bad, 422, "invalid_request")
    response = await client.post("/api/sessions", headers=AUTH, json=BODY)
    error = assert_error_body(response, 429, "too_many_requests")
    assert "CANOPY_MAX_SESSIONS_PER_MINUTE" in error["message"]
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert (await client.get("/api/sessions", headers=AUTH)).status_code == 200


def test_creation_limit_is_a_sliding_minute() -> None:
    now = [1000.0]
    limit = CreationLimit(2, clock=lambda: now[0])
    assert limit.take() is None
    now[0] += 30
    assert limit.take() is None
    assert limit.take() == pytest.approx(30.0)
    now[0] += 30  # the first one left the window
    assert limit.take() is None
    assert limit.take() == pytest.approx(30.0)
    now[0] += 61
    assert limit.take() is None
    assert limit.take() is None
    assert limit.take() is not None
