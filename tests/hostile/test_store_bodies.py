"""Random and hostile HTTP bodies and paths against the running store (property tests).

`POST /api/sessions` with random JSON, near-valid bodies with one field broken, NaN and
Infinity (which the HTTP layer's JSON parser accepts and JSON does not have), deep nesting,
wrong content types and bytes that are not JSON at all: the answer is 201 or a 4xx with
`{"error": {"code", "message"}}`, never a 5xx and never a stack trace. Bounded: ~250 requests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tests.hostile.conftest import fuzz

pytestmark = [pytest.mark.e2e]

VALID = {
    "experiment": "decisions",
    "num_participants": 1,
    "group_size": 1,
    "num_periods": 1,
    "period_length": 5,
    "num_subperiods": 0,
    "rate_limit": 0.0,
    "params": {},
    "label": "hostile",
}
LEAKS = ("Traceback", 'File "', "services.", "pymongo", "site-packages", "Exception")

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and ±Infinity too: json.dumps writes them as NaN / Infinity
    | st.text(max_size=20)
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=12,
)
weird_numbers = st.sampled_from(
    [0, -1, 2**31, 2**63, 2**64, 10**400, 1.5, -0.0, 1e308, 5e-324, True, False, "8", "", None]
)


@st.composite
def near_valid(draw: st.DrawFn) -> dict[str, Any]:
    """A valid body with one field removed, replaced by anything, or an unknown one added."""
    body = dict(VALID)
    action = draw(st.sampled_from(["remove", "replace", "replace", "number", "add"]))
    field = draw(st.sampled_from(sorted(VALID)))
    if action == "remove":
        body.pop(field)
    elif action == "replace":
        body[field] = draw(values)
    elif action == "number":
        body[field] = draw(weird_numbers)
    else:
        body[draw(st.text(min_size=1, max_size=10).filter(lambda k: k not in VALID))] = draw(values)
    return body


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = {"k": [value]}
    return value


@pytest.fixture(scope="module")
def store(stack: Any) -> Iterator[httpx.Client]:
    """A synchronous client (Hypothesis drives plain functions), authenticated."""
    with httpx.Client(
        base_url=stack.urls.store_url,
        headers={"Authorization": f"Bearer {stack.urls.admin_token}"},
        timeout=30.0,
    ) as client:
        yield client


def check(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body: dict[str, Any] = response.json()
    for leak in LEAKS:
        assert leak not in response.text, response.text[:500]
    if response.status_code >= 400:
        assert set(body) == {"error"}, body
        assert isinstance(body["error"]["code"], str) and body["error"]["code"]
        assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body


def post(store: httpx.Client, content: bytes, content_type: str | None) -> httpx.Response:
    headers = {} if content_type is None else {"content-type": content_type}
    return store.post("/api/sessions", content=content, headers=headers)


@fuzz(150)
@given(near_valid() | values.map(lambda v: v if isinstance(v, dict) else {"body": v}) | values)
@example({**VALID, "period_length": float("nan")})
@example({**VALID, "rate_limit": float("inf")})
@example({**VALID, "params": {"x": float("nan")}})
@example({**VALID, "params": {"x": -float("inf")}})
@example({**VALID, "params": nested(60)})
@example({**VALID, "params": {"$where": 1}})
@example({**VALID, "params": {"a.b": 1}})
@example({**VALID, "params": {"a\x00b": 1}})
@example({**VALID, "params": {"big": 2**64}})
@example({**VALID, "label": "\x00\ud7ff\U0010ffff"})
@example({**VALID, "num_participants": 10**400})
@example({**VALID, "num_participants": True})
@example({**VALID, "experiment": ["decisions"]})
def test_session_bodies(store: httpx.Client, body: Any) -> None:
    response = post(store, json.dumps(body).encode(), "application/json")
    answer = check(response)
    if response.status_code == 201:
        assert len(answer["participants"]) == body["num_participants"]
    else:
        assert response.status_code == 422, response.text


@fuzz(50)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
@example(b"")
@example(b"{")
@example(b"\xff\xfe{}")
@example(b'{"experiment": "decisions"' + b" " * 10_000)
@example(b'{"k": [' * 2000 + b"1" + b"]}" * 2000)  # past Python's JSON recursion limit
def test_bodies_that_are_not_json(store: httpx.Client, content: bytes) -> None:
    response = post(store, content, "application/json")
    assert check(response)["error"]["code"] == "invalid_request"
    assert response.status_code == 422, response.text


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_other_content_types(store: httpx.Client, content_type: str | None) -> None:
    response = post(store, b"experiment=decisions&num_participants=1", content_type)
    check(response)
    assert response.status_code == 422


@fuzz(40)
@given(
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=40),
    st.text(max_size=10),
)
@example("..", "csv")
@example("%2e%2e", "jsonl")
@example("x" * 5000, "csv")
def test_session_paths(store: httpx.Client, session: str, format_: str) -> None:
    segment = quote(session, safe="")
    for path, params in [
        (f"/api/sessions/{segment}", {}),
        (f"/api/sessions/{segment}/events", {"format": format_}),
    ]:
        response = store.get(path, params=params)
        check(response)
        assert response.status_code in (404, 422), response.text
