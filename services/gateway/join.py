"""The study link (PROTOCOL v2 "Online studies"): `GET /join/{join_key}` gives a person a seat.

One link for everyone in a session: the gateway checks the join key's tag (a made-up key costs
one HMAC and no look-up, like a seat key), then asks the store `POST /internal/join/{join_key}`
with the link's whole query (only the store knows which parameter is the session's
`label_param`) and the seat key from this browser's cookie. The store picks the seat
(the same label always gets the same one; without a label the cookie's, else the first free
seat) and the gateway sends the person there: 303 to `/p/{key}`. A seat that already finished
goes there too, and its page shows the finished screen again. No seat left: a "this study is
full" page with the `full` outcome's code, or its redirect after a visible countdown.

The seat cookie is `canopy_seat` with `Path=/join/{join_key}`: one per study link, sent on that
link only (the gateway must read it before it knows the session, so the name cannot hold the
session id). It is set only for label-less arrivals: a person with a label finds their seat
by the label from any browser. Neither key is ever logged (services.common.logs redacts
`/join/<key>`); pages answered here send no Referer, so a completion site never sees a key.
"""

from __future__ import annotations

import html
import logging
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from services.common.directory import Directory, NotFound
from services.common.seats import well_formed
from services.gateway.pages import RETRY_PAGE

log = logging.getLogger(__name__)

SEAT_COOKIE = "canopy_seat"
COOKIE_MAX_AGE = 7 * 24 * 3600  # a week: a person may come back to an unfinished study
REDIRECT_SECONDS = 5  # the same countdown as the participant page's finished screen
# What of a query is passed on: a study link is opened by a recruiting site with a handful of
# parameters (Prolific: PROLIFIC_PID, STUDY_ID, SESSION_ID); anything much larger is not one.
MAX_PARAMS = 20
MAX_NAME = 64
MAX_VALUE = 256
NO_STORE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


def query_of(request: Request) -> dict[str, str] | None:
    """The link's query, first value of each name; None when it is too large to be a link's."""
    query: dict[str, str] = {}
    for name, value in request.query_params.multi_items():
        if len(name) > MAX_NAME or len(value) > MAX_VALUE:
            return None
        query.setdefault(name, value)
    return query if len(query) <= MAX_PARAMS else None


def page(
    title: str, body: str, *, status: int = 200, head: str = "", outcome: str = ""
) -> HTMLResponse:
    """A small page in the participant pages' style (static/participant.css), no seat data."""
    text = (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="robots" content="noindex"><meta name="referrer" content="no-referrer">'
        f'<title>{html.escape(title)} · Canopy</title><link rel="icon" href="data:,">'
        f'<link rel="stylesheet" href="/static/participant.css">{head}</head>'
        '<body data-phase="study-link"><header class="topbar"><h1><span>Canopy</span></h1>'
        f'</header><main><section class="card finished" data-outcome="{outcome}" '
        'aria-labelledby="study-heading">'
        f'<h2 id="study-heading" class="finished-heading" tabindex="-1">{html.escape(title)}'
        f"</h2>{body}</section></main></body></html>"
    )
    return HTMLResponse(text, status_code=status, headers=NO_STORE)


def not_valid() -> HTMLResponse:
    return page(
        "This study link is not valid",
        "<p>Check the address, or ask the researchers for the link to their study.</p>",
        status=404,
    )


def too_long() -> HTMLResponse:
    return page(
        "This study link is not valid",
        "<p>The address carries more than a study link can (too many or too long parameters). "
        "Open the link exactly as the study's site gave it.</p>",
        status=400,
    )


def full_page(redirect: str | None, code: str | None) -> HTMLResponse:
    """No seat left: the `full` outcome's code to show, and/or where to go after 5 s."""
    parts = [
        "<p>All places in this study are taken, so you cannot take part this time. "
        "Thank you for your interest.</p>"
    ]
    if code:
        parts.append(
            '<p>Your completion code:</p><p class="completion-code-row">'
            f'<output id="completion-code" class="completion-code">{html.escape(code)}'
            "</output></p>"
        )
    head = ""
    if redirect and urlsplit(redirect).scheme in ("http", "https"):
        target = html.escape(redirect, quote=True)
        parts.append(
            f'<p id="leaving" class="leaving" data-redirect="{target}" '
            f'data-seconds="{REDIRECT_SECONDS}">You will be taken back in '
            f'<span class="leaving-seconds">{REDIRECT_SECONDS}</span> s. '
            f'<a id="leave-now" href="{target}" rel="noreferrer">Go now</a></p>'
        )
        # The countdown is static/leave.js; without scripts, a plain refresh does the same.
        head = (
            '<script type="module" src="/static/leave.js"></script><noscript>'
            f'<meta http-equiv="refresh" content="{REDIRECT_SECONDS};url={target}"></noscript>'
        )
    if not code and not head:
        parts.append("<p>You can close this page.</p>")
    return page("This study is full", "".join(parts), head=head, outcome="full")


def to_seat(key: str, join_key: str, *, remember: bool, secure: bool) -> Response:
    response = RedirectResponse(f"/p/{quote(key, safe='')}", status_code=303, headers=NO_STORE)
    if remember:
        response.set_cookie(
            SEAT_COOKIE,
            key,
            max_age=COOKIE_MAX_AGE,
            path=f"/join/{join_key}",
            httponly=True,
            samesite="lax",
            secure=secure,
        )
    return response


def join_router(directory: Directory, seat_secret: bytes) -> APIRouter:
    router = APIRouter()

    @router.get("/join/{join_key}", include_in_schema=False, response_model=None)
    async def study_link(join_key: str, request: Request) -> Response:
        if not well_formed(join_key, seat_secret):
            return not_valid()  # a guess, a truncated link: no look-up at all
        query = query_of(request)
        if query is None:
            return too_long()
        cookie = request.cookies.get(SEAT_COOKIE)
        seat = cookie if cookie and well_formed(cookie, seat_secret) else None
        try:
            answer: dict[str, Any] = await directory.join(join_key, query, seat)
        except NotFound:
            return not_valid()
        except httpx.HTTPStatusError as exc:
            if 400 <= exc.response.status_code < 500:
                # The store refused what the link carries (a label longer than a label can
                # be): the link is wrong, and trying again would not help.
                return too_long()
            log.warning("study link: the store answered %d", exc.response.status_code)
            return HTMLResponse(RETRY_PAGE, status_code=503, headers={"Retry-After": "3"})
        except httpx.HTTPError as exc:
            # The exception's text may hold the look-up's URL, and so the key: its type only.
            log.warning("study link: store unreachable (%s)", type(exc).__name__)
            return HTMLResponse(RETRY_PAGE, status_code=503, headers={"Retry-After": "3"})
        if answer.get("full"):
            redirect, code = answer.get("redirect"), answer.get("code")
            return full_page(
                redirect if isinstance(redirect, str) else None,
                code if isinstance(code, str) else None,
            )
        key = answer.get("key")
        if not isinstance(key, str) or not well_formed(key, seat_secret):
            log.warning("study link: the store's answer names no seat")
            return HTMLResponse(RETRY_PAGE, status_code=503, headers={"Retry-After": "3"})
        # Only a label-less arrival is remembered by this browser (a store that does not say
        # which label it used: always, which a labelled arrival does not need but is harmless).
        return to_seat(
            key,
            join_key,
            remember=answer.get("label") is None,
            secure=request.url.scheme == "https",
        )

    return router
