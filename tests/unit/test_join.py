"""The gateway's study link (services/gateway/join.py) against a fake store directory: what it
asks the store (the whole query, the cookie's seat), and how it answers each of the store's
answers (303 to the seat with the cookie for label-less arrivals, the full page, 404, 503).
The real store is in tests/browser/test_online_studies.py."""

from __future__ import annotations

from typing import Any

import httpx
from fastapi import FastAPI

from services.common.directory import NotFound
from services.common.seats import new_key
from services.gateway.join import SEAT_COOKIE, join_router

SECRET = b"s" * 32
JOIN = new_key(SECRET)
SEAT = new_key(SECRET)
OTHER_SEAT = new_key(SECRET)


class FakeDirectory:
    """Answers the join call as the store would (`answer`), recording what it was asked."""

    def __init__(self, answer: dict[str, Any] | None = None, *, down: bool = False) -> None:
        self.answer = answer
        self.down = down
        self.calls: list[tuple[str, dict[str, str], str | None]] = []

    async def join(self, join_key: str, query: dict[str, str], seat: str | None) -> dict[str, Any]:
        self.calls.append((join_key, query, seat))
        if self.down:
            raise httpx.ConnectError("store down")
        if join_key != JOIN or self.answer is None:
            raise NotFound("unknown join key")
        return self.answer


async def get(
    directory: FakeDirectory, path: str, cookies: dict[str, str] | None = None
) -> httpx.Response:
    app = FastAPI()
    app.include_router(join_router(directory, SECRET))  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://gateway", cookies=cookies
    ) as client:
        return await client.get(path)


async def test_a_labelled_arrival_goes_to_its_seat_with_the_whole_query_and_no_cookie() -> None:
    directory = FakeDirectory({"key": SEAT, "finished": False, "label": "P1"})
    response = await get(directory, f"/join/{JOIN}?PROLIFIC_PID=P1&STUDY_ID=s&PROLIFIC_PID=x")
    assert response.status_code == 303
    assert response.headers["location"] == f"/p/{SEAT}"
    assert "set-cookie" not in response.headers
    assert response.headers["cache-control"] == "no-store"
    # The first value of each name; the store picks its label_param out of it.
    assert directory.calls == [(JOIN, {"PROLIFIC_PID": "P1", "STUDY_ID": "s"}, None)]


async def test_a_label_less_arrival_gets_a_cookie_for_this_link_only() -> None:
    directory = FakeDirectory({"key": SEAT, "finished": False, "label": None})
    response = await get(directory, f"/join/{JOIN}")
    assert response.status_code == 303
    cookie = response.headers["set-cookie"]
    assert cookie.startswith(f"{SEAT_COOKIE}={SEAT};")
    for part in ("HttpOnly", f"Path=/join/{JOIN}", "SameSite=lax", "Max-Age=604800"):
        assert part in cookie, cookie
    assert "Secure" not in cookie  # plain http here; https sets it


async def test_the_cookie_seat_is_passed_on_and_a_forged_one_is_not() -> None:
    directory = FakeDirectory({"key": SEAT, "finished": False, "label": None})
    await get(directory, f"/join/{JOIN}", cookies={SEAT_COOKIE: OTHER_SEAT})
    await get(directory, f"/join/{JOIN}", cookies={SEAT_COOKIE: "not-a-key"})
    assert [call[2] for call in directory.calls] == [OTHER_SEAT, None]


async def test_a_made_up_join_key_is_404_without_asking_the_store() -> None:
    directory = FakeDirectory({"key": SEAT, "finished": False})
    forged = JOIN[:-1] + ("A" if JOIN[-1] != "A" else "B")
    for path in (f"/join/{forged}", "/join/short", f"/join/{SEAT}x"):
        response = await get(directory, path)
        assert response.status_code == 404, path
        assert "This study link is not valid" in response.text
    assert directory.calls == []


async def test_an_unknown_join_key_is_404() -> None:
    response = await get(FakeDirectory(None), f"/join/{JOIN}?label=P1")
    assert response.status_code == 404
    assert "not valid" in response.text


async def test_full_shows_the_code() -> None:
    directory = FakeDirectory({"full": True, "redirect": None, "code": "FULL-<1>"})
    response = await get(directory, f"/join/{JOIN}?label=P9")
    assert response.status_code == 200
    assert "This study is full" in response.text
    assert '<output id="completion-code" class="completion-code">FULL-&lt;1&gt;</output>' in (
        response.text
    )
    assert "leave.js" not in response.text  # nowhere to go


async def test_full_with_a_redirect_counts_down_to_it() -> None:
    target = "https://example.org/done?cc=F&who=a%20b"
    directory = FakeDirectory({"full": True, "redirect": target, "code": None})
    response = await get(directory, f"/join/{JOIN}")
    escaped = target.replace("&", "&amp;")
    assert f'data-redirect="{escaped}"' in response.text
    assert f'href="{escaped}"' in response.text
    assert '<script type="module" src="/static/leave.js"></script>' in response.text
    assert response.headers["referrer-policy"] == "no-referrer"


async def test_full_with_a_non_http_redirect_does_not_link_it() -> None:
    directory = FakeDirectory({"full": True, "redirect": "javascript:alert(1)", "code": None})
    response = await get(directory, f"/join/{JOIN}")
    assert "javascript:" not in response.text
    assert "You can close this page." in response.text


async def test_an_unreachable_store_gets_a_page_that_retries() -> None:
    response = await get(FakeDirectory(down=True), f"/join/{JOIN}?label=P1")
    assert response.status_code == 503
    assert 'http-equiv="refresh"' in response.text


async def test_an_oversized_query_is_refused_without_asking_the_store() -> None:
    directory = FakeDirectory({"key": SEAT, "finished": False})
    response = await get(directory, f"/join/{JOIN}?label={'x' * 300}")
    assert response.status_code == 400
    many = "&".join(f"p{i}=v" for i in range(30))
    assert (await get(directory, f"/join/{JOIN}?{many}")).status_code == 400
    assert directory.calls == []


async def test_a_label_the_store_refuses_gets_400_not_a_retry_loop() -> None:
    class Refusing(FakeDirectory):
        async def join(self, join_key: str, query: dict[str, str], seat: str | None) -> Any:
            request = httpx.Request("POST", "http://store/internal/join/x")
            response = httpx.Response(422, request=request)
            raise httpx.HTTPStatusError("422", request=request, response=response)

    response = await get(Refusing(), f"/join/{JOIN}?label={'x' * 200}")
    assert response.status_code == 400
    assert "not valid" in response.text
