"""Canopy as the real-time stage of an oTree 6 study (docs/otree.md).

One Canopy session per oTree group: a wait page's `after_all_players_arrive` calls
`create_stage(group)`, which creates the session through Canopy's HTTP API with the oTree
participant codes as its `labels` and each participant's oTree resume link
(`/InitializeParticipant/<code>`, which oTree answers with a redirect to the page that
participant is on) as the `completed` and `dropout` redirects. The `StagePage`
(`canopy_otree.pages`) sends each player to their Canopy page and, when Canopy sends them back
(or its timeout fires), `collect_payoffs(player)` reads their payoffs from Canopy's session
detail into `player.payoff` and participant fields.

This module imports nothing from oTree, so settings.py can import it for `PARTICIPANT_FIELDS`.
Everything is kept in `participant.vars` (which is what oTree's participant fields are), so
the helpers work whether or not the project lists the fields.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .client import Canopy, CanopyError

__all__ = [
    "PARTICIPANT_FIELDS",
    "Canopy",
    "CanopyError",
    "StagePage",
    "collect_payoffs",
    "create_stage",
    "play_stage_with_bots",
    "stage_settings",
    "stage_state",
    "stage_timeout",
]

# Add these to settings.PARTICIPANT_FIELDS to see them in oTree's data export and to read
# them as `participant.canopy_total_payoff` in templates and code. `canopy_url` (the seat's
# own Canopy page, a secret link: whoever holds it plays the seat) is kept in
# participant.vars too, but left out here so that it stays out of the data export.
PARTICIPANT_FIELDS = [
    "canopy_session",  # the Canopy session of this participant's group
    "canopy_code",  # their public code in Canopy (the `participant` column of its export)
    "canopy_outcome",  # completed, dropout, or unfinished (timed out before their group ended)
    "canopy_total_payoff",  # Canopy's total_payoff, unrounded
    "canopy_payoffs",  # {period number (str): period payoff}
]

CONFIG_KEY = "canopy"
# Keys of session.config["canopy"] that are this package's, not Canopy's session settings.
OWN_KEYS = ("timeout_seconds", "return_url", "bots")
# Waiting for the whole group to open Canopy, and for the 5 s finished screen before the
# redirect back: added to the periods' own length for the default timeout.
TIMEOUT_GRACE_S = 120
RETURN_PATH = "/InitializeParticipant/{label}"


def stage_settings(session: Any) -> dict[str, Any]:
    """session.config["canopy"], with any top-level `canopy_<name>` key of the session config
    taking precedence (those are editable in oTree's admin when creating a session)."""
    config = session.config
    settings = dict(config.get(CONFIG_KEY) or {})
    for key, value in config.items():
        if key.startswith(CONFIG_KEY + "_") and key != CONFIG_KEY:
            settings[key[len(CONFIG_KEY) + 1 :]] = value
    if "experiment" not in settings:
        raise CanopyError(
            f"session config {config.get('name')!r} has no canopy experiment: "
            'add canopy=dict(experiment="bimatrix", period_length=60, ...) to it'
        )
    return settings


def create_stage(group: Any, client: Canopy | None = None) -> dict[str, Any]:
    """Create one Canopy session for this oTree group; call it from the wait page's
    `after_all_players_arrive`. Seats follow `id_in_group`; each participant's vars get the
    session id, their Canopy url and code. Returns Canopy's answer."""
    client = client or Canopy()
    players = sorted(group.get_players(), key=lambda p: p.id_in_group)
    settings = stage_settings(group.session)
    body = {k: v for k, v in settings.items() if k not in OWN_KEYS}
    base = settings.get("return_url") or os.environ.get("CANOPY_RETURN_URL")
    if not base:
        # No default: a guess (oTree's port 8000 is also Canopy's gateway's) would send
        # participants to the wrong server at the very end of the stage.
        raise CanopyError(
            "CANOPY_RETURN_URL is not set: the public address of this oTree server "
            "(e.g. https://otree.example.org), where Canopy sends participants back"
        )
    back = {"url": base.rstrip("/") + RETURN_PATH}
    body.update(
        num_participants=len(players),
        group_size=len(players),
        labels=[p.participant.code for p in players],
        label=body.get("label")
        or f"oTree {group.session.code} round {group.round_number} group {group.id_in_subsession}",
    )
    # Both outcomes lead back to oTree: someone away at the end who opens Canopy again is
    # sent back too, and the stage page records their outcome.
    body.setdefault("completion", {"completed": back, "dropout": back})
    created = client.create_session(body)
    seats = {p["id_in_group"]: p for p in created["participants"]}
    for player in players:
        seat = seats[player.id_in_group]
        player.participant.vars.update(
            canopy_session=created["session"],
            canopy_url=seat["url"],
            canopy_code=seat["code"],
            canopy_outcome=None,
        )
    return created


def stage_timeout(player: Any) -> float:
    """How long the stage page waits for a player before oTree moves them on: the config's
    `timeout_seconds`, else every period with its post-period delay plus a grace period."""
    settings = stage_settings(player.session)
    if settings.get("timeout_seconds") is not None:
        return float(settings["timeout_seconds"])
    periods = int(settings.get("num_periods", 1))
    length = float(settings.get("period_length", 60)) + float(settings.get("post_period_delay", 0))
    return periods * length + TIMEOUT_GRACE_S


def _seat(detail: dict[str, Any], participant: Any) -> dict[str, Any]:
    for seat in detail.get("participants", []):
        if seat.get("label") == participant.code or seat.get("code") == participant.vars.get(
            "canopy_code"
        ):
            return dict(seat)
    raise CanopyError(f"participant {participant.code} has no seat in Canopy session")


def stage_state(player: Any, client: Canopy | None = None) -> dict[str, Any]:
    """This player's seat in Canopy's session detail (`status`, `outcome`, `payoffs`, ...)."""
    session = player.participant.vars.get("canopy_session")
    if not session:
        raise CanopyError(f"participant {player.participant.code} has no Canopy session yet")
    return _seat((client or Canopy()).session(session), player.participant)


def collect_payoffs(
    player: Any, timeout_happened: bool = False, client: Canopy | None = None
) -> None:
    """Read the player's payoffs from Canopy into `player.payoff` (rounded by oTree's currency
    settings) and participant vars. Never raises for Canopy being away: the player goes on
    with `canopy_outcome` "unavailable" and no payoff rather than being stuck."""
    participant = player.participant
    try:
        seat = stage_state(player, client)
    except CanopyError:
        participant.vars["canopy_outcome"] = "unavailable"
        return
    total = seat.get("total_payoff") or 0
    participant.vars.update(
        canopy_total_payoff=total,
        canopy_payoffs=dict(seat.get("payoffs") or {}),
        # A seat whose group had not ended when oTree's timeout fired has no outcome yet.
        canopy_outcome=seat.get("outcome") or "unfinished",
    )
    player.payoff = total


def play_stage_with_bots(
    player: Any,
    timeout: float | None = None,
    strategy: str = "default",
    rate: float = 2,
    all_but: int = 0,
    wait: bool = True,
) -> dict[str, Any]:
    """For oTree bots (tests.py): fill the group's open Canopy seats (all but `all_but` of
    them) with Canopy's own bots (run by the store) and, with `wait`, return once this player's
    seat has finished. oTree runs its bots one at a time, so the first bot of a group starts
    Canopy bots in every seat and the others find their seats finished already."""
    client = Canopy()
    session = player.participant.vars["canopy_session"]
    seat = stage_state(player, client)
    if seat.get("status") != "finished":
        try:
            client.start_bots(session, {"strategy": strategy, "rate": rate, "all_but": all_but})
        except CanopyError as exc:
            if exc.status != 422:  # 422: no open seat left, the group's bots already run
                raise
    if not wait:
        return seat
    deadline = time.monotonic() + (timeout if timeout is not None else stage_timeout(player))
    while True:
        seat = stage_state(player, client)
        if seat.get("status") == "finished":
            return seat
        if time.monotonic() > deadline:
            raise CanopyError(f"Canopy session {session}: seat not finished in time: {seat}")
        time.sleep(0.5)  # polling the store's detail, bounded by the deadline above


def __getattr__(name: str) -> Any:
    # StagePage subclasses oTree's Page, so it is imported only when asked for: settings.py
    # imports this package before oTree has loaded the project.
    if name == "StagePage":
        from .pages import StagePage

        return StagePage
    raise AttributeError(name)
