"""How a seat ends (PROTOCOL v2 "Online studies"): outcomes, where each sends the person, and
what they are paid. Pure: used by decisions (the `finished` message), the gateway (the study
link's "full" and "already taken part" pages) and the store (session detail, payments file).

Outcomes: `completed` (the person, not a bot, was connected when the group's last period
ended), `dropout` (away then), `lobby_timeout` (waited in the lobby too long), `full` (the
study link found no seat left).

A session's `completion` maps an outcome to `{"url": template}` (a redirect) or `{"code": s}`
(a code to show). A template may hold `{label}`, `{code}` and `{session}`, filled in with each
value percent-encoded as RFC 3986 says (a space is `%20`, never `+`); nothing else in braces.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from services.common.messages import Finished

Outcome = Literal["completed", "dropout", "lobby_timeout", "full"]
OUTCOMES: tuple[str, ...] = ("completed", "dropout", "lobby_timeout", "full")
PLACEHOLDERS = frozenset({"label", "code", "session"})
MAX_URL = 2_000
MAX_CODE = 100


class Completion(BaseModel):
    """Where one outcome sends the person: a redirect (`url`) or a code to show (`code`)."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    url: Annotated[str, Field(min_length=1, max_length=MAX_URL)] | None = None
    code: Annotated[str, Field(min_length=1, max_length=MAX_CODE)] | None = None

    @field_validator("url")
    @classmethod
    def _template(cls, url: str | None) -> str | None:
        if url is None:
            return None
        problem = template_problem(url)
        if problem is not None:
            raise ValueError(problem)
        return url

    @model_validator(mode="after")
    def _one(self) -> Completion:
        if (self.url is None) == (self.code is None):
            raise ValueError("give either url or code")
        return self


class Payment(BaseModel):
    """How payoffs become money in the payments file."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    exchange_rate: Annotated[float, Field(ge=0, le=1e6)] = 1.0
    show_up_fee: Annotated[float, Field(ge=0, le=1e6)] = 0.0
    currency: Annotated[str, Field(min_length=1, max_length=8)] | None = None

    @field_validator("exchange_rate", "show_up_fee", mode="before")
    @classmethod
    def _number(cls, value: Any) -> Any:
        """JSON has one number type: 1 is 1.0 (strict mode would refuse the int)."""
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


def template_problem(template: str) -> str | None:
    """Why `template` cannot be a completion URL (None: it can)."""
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(template)
            if name is not None
        ]
    except ValueError as exc:
        return f"not a URL template: {exc}"
    unknown = sorted({name for name, _, _ in fields if name not in PLACEHOLDERS})
    if unknown:
        return f"unknown placeholder {{{unknown[0]}}}: only {{label}}, {{code}}, {{session}}"
    if any(spec or conversion for _, spec, conversion in fields):
        return "placeholders take no format spec or conversion"
    example = fill(template, label="x", code="x", session="x")
    parts = urlsplit(example)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return "must be an absolute http(s) URL"
    return None


def fill(template: str, *, label: str | None, code: str, session: str) -> str:
    """The template with `{label}`, `{code}` and `{session}` percent-encoded (RFC 3986)."""
    values = {"label": label or "", "code": code, "session": session}
    return template.format(**{name: quote(value, safe="") for name, value in values.items()})


def destination(
    outcome: str,
    completion: Mapping[str, Mapping[str, Any]],
    *,
    label: str | None,
    code: str,
    session: str,
) -> tuple[str | None, str | None]:
    """(redirect, code) for `outcome` under a session's `completion` (None where it sets none)."""
    target = completion.get(outcome) or {}
    url, shown = target.get("url"), target.get("code")
    redirect = fill(str(url), label=label, code=code, session=session) if url else None
    return redirect, (str(shown) if shown else None)


def finished_payload(
    outcome: str,
    total_payoff: float,
    completion: Mapping[str, Mapping[str, Any]],
    *,
    label: str | None,
    code: str,
    session: str,
) -> dict[str, Any]:
    """The `finished` message for a seat: its outcome, total payoff, redirect and code."""
    redirect, shown = destination(outcome, completion, label=label, code=code, session=session)
    finished = Finished(
        outcome=outcome,
        total_payoff=total_payoff if math.isfinite(total_payoff) else None,
        redirect=redirect,
        code=shown,
    )
    return finished.model_dump()


def bonus(total_payoff: float | None, exchange_rate: float) -> float:
    """`round(max(0, total_payoff) · exchange_rate, 2)` (no payoff: 0)."""
    if total_payoff is None or not math.isfinite(total_payoff):
        return 0.0
    return round(max(0.0, total_payoff) * exchange_rate, 2)
