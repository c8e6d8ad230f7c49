"""What the generic page shows live beside the decisions: `POST /p/{key}/view`.

The page knows the group's decisions (its `group_decisions` broadcasts), not the experiment's
Python: it posts them here, `{"decisions": {code: value, ...}}`, and gets back what the
experiment's own hooks make of them, `{"payoffs": {code: number}, "shown": {name: number |
{code: number}}}`: the flow payoffs (`payoffs`) and the values its declared decision `shows`
(`shown`), computed with the same hooks and the same validated params as the decisions
service, so the page needs no formula of its own (docs/pages.md, docs/experiments.md).

Pure computation over the seat's group (found by the seat key, as the page itself is): it
changes nothing and is not logged. Bounded: a body over 64 KiB is refused (413), a decision the
experiment would refuse is refused (422), and each key may ask 10 times a second with bursts of
20 (429 beyond: the page asks at most 5 times a second). A hook that fails gives empty values,
as on a tick (services.common.group).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from services.common.directory import Directory, GroupConfig, NotFound
from services.common.experiments import Experiment, Registry
from services.common.messages import is_lobby
from services.common.seats import well_formed

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
RATE_PER_SECOND = 10.0
BURST = 20.0
KEYS_REMEMBERED = 10_000  # buckets and params kept at most (least recently used dropped)


class Buckets:
    """One token bucket per seat key, in a bounded LRU map."""

    def __init__(self, rate: float = RATE_PER_SECOND, burst: float = BURST) -> None:
        self.rate, self.burst = rate, burst
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        allowed = tokens >= 1
        self._buckets[key] = (tokens - 1 if allowed else tokens, now)
        while len(self._buckets) > KEYS_REMEMBERED:
            self._buckets.popitem(last=False)
        return allowed


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


def hook_params(experiment: Experiment, group: GroupConfig) -> dict[str, Any]:
    """The group's params as every hook gets them (validated, defaults filled in)."""
    dumped: dict[str, Any] = experiment.params_model.model_validate(group.params).model_dump(
        mode="json"
    )
    return dumped


def view_of(
    experiment: Experiment, group: GroupConfig, params: dict[str, Any], sent: Any
) -> tuple[int, dict[str, Any]]:
    """(status, body) for the decisions `sent` in this group of `experiment`: see the module's
    docstring."""
    if not isinstance(sent, dict) or not isinstance(sent.get("decisions"), dict):
        return 422, {"error": {"code": "invalid_request", "message": "{decisions: {code: …}}"}}
    roles = {code: i for i, code in enumerate(group.members, start=1)}
    decisions = {code: sent["decisions"].get(code) for code in group.members}
    for code, value in decisions.items():
        if value is None:
            continue  # before a member's first decision, as the group has it
        try:
            problem = experiment.validate(value, params)
        except Exception:
            problem = "the experiment failed on it"
        if problem is not None:
            message = f"{code}: {problem}"
            return 422, {"error": {"code": "invalid_decision", "message": message}}
    try:
        payoffs = {
            str(code): float(value)
            for code, value in experiment.payoffs(decisions, roles, params).items()
        }
    except Exception as exc:
        log.debug("view: payoffs failed in %s: %r", group.group, exc)
        payoffs = {}
    try:
        shown = experiment.shown(decisions, roles, params)
    except Exception as exc:
        log.debug("view: shown failed in %s: %r", group.group, exc)
        shown = {}
    return 200, {"payoffs": payoffs, "shown": shown}


def add_view_route(
    router: APIRouter, directory: Directory, seat_secret: bytes, experiments: Registry
) -> None:
    """Add `POST /p/{key}/view` to the pages' router (the groups' experiments from
    `experiments`, the gateway's)."""
    buckets = Buckets()
    params_of: OrderedDict[str, dict[str, Any]] = OrderedDict()  # group → hook params

    @router.post("/p/{key}/view", include_in_schema=False)
    async def view(key: str, request: Request) -> JSONResponse:
        if not well_formed(key, seat_secret):
            return _error(404, "unknown_seat", "no such seat")
        if not buckets.take(key):
            return _error(429, "too_many_requests", "at most 10 a second")
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY_BYTES:
                return _error(413, "too_large", f"at most {MAX_BODY_BYTES} bytes")
        try:
            info = await directory.seat(key)
            if is_lobby(info.group):
                return _error(409, "no_group", "no group yet: waiting in the lobby")
            group = await directory.group(info.group)
        except NotFound:
            return _error(404, "unknown_seat", "no such seat")
        try:
            sent = orjson.loads(body)
        except orjson.JSONDecodeError:
            return _error(422, "invalid_request", "not JSON")
        experiment = experiments.get(group.experiment)
        params = params_of.pop(group.group, None)
        if params is None:
            params = hook_params(experiment, group)
        params_of[group.group] = params
        while len(params_of) > KEYS_REMEMBERED:
            params_of.popitem(last=False)
        status, answer = view_of(experiment, group, params, sent)
        return JSONResponse(answer, status_code=status)
