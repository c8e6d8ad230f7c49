"""The Content-Security-Policy of the pages Canopy serves: the researcher console (store, `/`)
and the participant pages (gateway: `/p/{key}`, the study link's pages).

Both pages are made of same-origin files only: ES modules (`<script type="module" src>`),
style sheets, uPlot vendored under `/static/vendor`, and one inline `<script
type="application/json" id="canopy-config">` that is data, never executed (so `script-src`
need not allow inline code). Their sockets and requests go back to the server that served them
(`connect-src 'self'`, which covers ws: and wss: to the same host). What a policy forbids is
everything else: a script injected into a page could neither run inline nor load from, nor
send to, another origin.

Style attributes are allowed on participant pages only (see PAGES_POLICY). The console may not
be framed (`frame-ancestors 'none'`: its buttons act with the admin token); participant pages
may (a survey tool may show a page in a frame), so their policy says nothing about ancestors.
FastAPI's own `/docs` and `/redoc` (inline script, a CDN) keep no policy: they are tools for
the API, not Canopy's pages.
"""

from __future__ import annotations

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_COMMON = (
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",  # a page's favicon is `data:,`
    "connect-src 'self'",
    "font-src 'self'",
    "base-uri 'none'",
    "form-action 'self'",
)
CONSOLE_POLICY = "; ".join([*_COMMON, "frame-ancestors 'none'"])
# Pages may set style attributes (`h("span", {style: …})` in page.js, and experiment pages of
# plug-ins written that way): an attribute's CSS runs no script, and whatever it could load
# from elsewhere (url()) the other directives refuse.
PAGES_POLICY = "; ".join([*_COMMON, "style-src-attr 'unsafe-inline'"])
UNPOLICED = ("/docs", "/redoc")


class ContentSecurityPolicy:
    """ASGI middleware: `policy` on every HTML response (but FastAPI's API docs)."""

    def __init__(self, app: ASGIApp, policy: str) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(UNPOLICED):
            await self.app(scope, receive, send)
            return

        async def with_policy(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                if headers.get("content-type", "").startswith("text/html"):
                    headers["Content-Security-Policy"] = self.policy
            await send(message)

        await self.app(scope, receive, with_policy)
