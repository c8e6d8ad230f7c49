"""The participant pages: `GET /p/{key}` serves the page of the seat's experiment.

One HTML shell (static/participant.html) for every experiment; what differs is the module it
loads (static/<experiment>.js, built on static/page.js and static/canopy.js) and the page's
configuration, embedded in the HTML as JSON: the participant (their public code; the seat key
is only in the page's own address, which the page's client reads), the experiment, its params with
their defaults filled in (the bimatrix's payoff matrix resolved from `game`), the members and
the period settings, the experiment's declared decision (`decision`: the generic page's
control), all from the store's internal look-ups (cached, see
services.common.directory). A plug-in experiment may ship a page module of its own (an
optional `page` attribute: the path of an ES module, relative to the file that defines its
class), served at `/static/plugins/<experiment>.js` (docs/pages.md; under /static, which the
ingress already sends to the gateway); one without gets the generic page.
An unknown key (or a participant's code, which is public and never a key) is answered with 404
and the generic page without any seat data, whose WebSocket is then refused (4403) and which
says so; if the store cannot be reached the answer is a 503 page that reloads itself.
"""

from __future__ import annotations

import inspect
import logging
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse

from services.common.directory import Directory, GroupConfig, NotFound
from services.common.experiments import BimatrixParams, Registry
from services.common.lobby import LobbyConfig
from services.common.messages import is_lobby
from services.common.seats import well_formed
from services.gateway.view import add_view_route

log = logging.getLogger(__name__)

# Built-in experiments with a page of their own: experiment name -> module in static/.
PAGES = {
    "decisions": "decisions.js",
    "bimatrix": "bimatrix.js",
    "public_goods": "public_goods.js",
    "double_auction": "double_auction.js",
}
GENERIC_PAGE = "generic.js"
CONFIG_SLOT = "<!--canopy:config-->"
MODULE_SLOT = "<!--canopy:module-->"
RETRY_PAGE = (
    '<!doctype html><html lang="en"><head><meta charset="utf-8">'
    '<meta http-equiv="refresh" content="3"><title>Canopy</title></head>'
    "<body><p>The experiment server is busy. This page tries again in a few seconds.</p>"
    "</body></html>"
)


def plugin_page(experiments: Registry, experiment: str) -> Path | None:
    """The page module a plug-in ships (its `page` attribute), if it names an existing file."""
    try:
        found = experiments.get(experiment)
    except KeyError:
        return None
    page = found.page
    if page is None:
        return None
    path = Path(inspect.getfile(type(found.plugin))).parent / page
    return path if path.is_file() else None


def module_url(experiments: Registry, experiment: Any) -> str:
    name = str(experiment)
    if name in PAGES:
        return f"/static/{PAGES[name]}"
    if experiment is not None and plugin_page(experiments, name) is not None:
        return f"/static/plugins/{quote(name, safe='')}.js"
    return f"/static/{GENERIC_PAGE}"


def page_params(experiments: Registry, experiment: str, params: dict[str, Any]) -> dict[str, Any]:
    """The session's params with the experiment's defaults filled in, as the page shows them."""
    try:
        model = experiments.get(experiment).params_model.model_validate(params)
    except (KeyError, ValueError):
        return dict(params)  # validated when the session was created; shown as given
    shown: dict[str, Any] = model.model_dump(mode="json")
    if isinstance(model, BimatrixParams):
        shown["payoff_matrix"] = model.matrix()  # one place knows the named games
    return shown


def declared_decision(
    experiments: Registry, experiment: str, params: dict[str, Any]
) -> dict[str, Any] | None:
    """What the experiment declares a decision to be for these params (the generic page's
    control, docs/pages.md), as JSON; None when it declares none."""
    try:
        found = experiments.get(experiment)
        hook_params = found.params_model.model_validate(params).model_dump(mode="json")
    except (KeyError, ValueError):
        return None
    return found.declared_json(hook_params)


async def page_config(
    directory: Directory, key: str, seat_secret: bytes, experiments: Registry
) -> dict[str, Any] | None:
    """What the page of seat `key` needs to know before its WebSocket opens; None for a key
    that names no seat. Raises httpx.HTTPError when the store cannot be reached."""
    if not well_formed(key, seat_secret):
        return None
    try:
        info = await directory.seat(key)
        group: GroupConfig | LobbyConfig
        if is_lobby(info.group):  # no group yet: the session's settings, from its lobby
            group = await directory.lobby_settings(info.session)
        else:
            group = await directory.group(info.group)
    except NotFound:
        return None
    if isinstance(group, LobbyConfig):
        return {
            "participant": info.participant,
            "experiment": group.experiment,
            "grouping": "arrival",
            "id_in_group": None,
            "members": [],
            "group_size": group.group_size,
            "lobby_timeout": group.lobby_timeout,
            "num_periods": group.num_periods,
            "period_length": group.period_length,
            "num_subperiods": group.num_subperiods,
            "on_disconnect": group.on_disconnect,
            "params": page_params(experiments, group.experiment, group.params),
            "decision": declared_decision(experiments, group.experiment, group.params),
        }
    config: dict[str, Any] = {"participant": info.participant}
    config.update(
        experiment=group.experiment,
        id_in_group=info.id_in_group,
        members=group.members,
        num_periods=group.num_periods,
        period_length=group.period_length,
        num_subperiods=group.num_subperiods,
        on_disconnect=group.on_disconnect,
        params=page_params(experiments, group.experiment, group.params),
        decision=declared_decision(experiments, group.experiment, group.params),
    )
    return config


def render_page(shell: str, config: dict[str, Any], experiments: Registry) -> str:
    module = module_url(experiments, config.get("experiment"))
    # Inside <script>, "</" and "<!--" must not appear: escape "<" (and & > for good measure).
    data = (
        orjson.dumps(config)
        .decode()
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
    )
    return shell.replace(
        CONFIG_SLOT, f'<script type="application/json" id="canopy-config">{data}</script>'
    ).replace(MODULE_SLOT, f'<script type="module" src="{module}"></script>')


def page_router(
    directory: Directory, seat_secret: bytes, experiments: Registry | None = None
) -> APIRouter:
    """The pages; `experiments`: the gateway's registry (the built-ins alone when not given)."""
    registry = Registry.builtin() if experiments is None else experiments
    router = APIRouter()
    shell = files("services.gateway").joinpath("static", "participant.html").read_text()

    @router.get("/p/{key}", response_class=HTMLResponse, include_in_schema=False)
    async def participant_page(key: str) -> HTMLResponse:
        try:
            config = await page_config(directory, key, seat_secret, registry)
        except httpx.HTTPError as exc:
            # The exception's text may hold the look-up's URL, and so the key: its type only.
            log.warning("participant page: store unreachable (%s)", type(exc).__name__)
            return HTMLResponse(RETRY_PAGE, status_code=503, headers={"Retry-After": "3"})
        headers = {"Cache-Control": "no-store"}
        if config is None:  # no seat data at all: the page says the link is not valid
            unknown = {"participant": None, "experiment": None}
            page = render_page(shell, unknown, registry)
            return HTMLResponse(page, status_code=404, headers=headers)
        return HTMLResponse(render_page(shell, config, registry), headers=headers)

    add_view_route(router, directory, seat_secret, registry)  # POST /p/{key}/view: live values

    # Matched before the app's /static mount, which is added after this router.
    @router.get("/static/plugins/{experiment}.js", include_in_schema=False, response_model=None)
    async def plugin_module(experiment: str) -> FileResponse | PlainTextResponse:
        path = plugin_page(registry, experiment)
        if path is None:
            return PlainTextResponse("no page for this experiment\n", status_code=404)
        return FileResponse(path, media_type="text/javascript")

    return router
