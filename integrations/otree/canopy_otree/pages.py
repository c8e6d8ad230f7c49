"""The oTree page of the Canopy stage: subclass it in your app (`class Stage(StagePage): pass`).

Each time the page is shown it asks Canopy where the player's seat is: still to play, it sends
the player to their Canopy page; finished (Canopy's redirect brought them back through
`/InitializeParticipant/<code>`, which lands on this page again), it submits itself, and
`before_next_page` collects the payoffs. oTree's `timeout_seconds` (from `stage_timeout`)
moves on a player who does not come back, through oTree's timeout worker, so nobody waits for
them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from otree.api import Page

from . import CanopyError, collect_payoffs, stage_state, stage_timeout

TEMPLATE = str(Path(__file__).with_name("Stage.html"))


class StagePage(Page):
    # oTree's loader joins template names onto its search folders; an absolute path stays
    # itself, so the template ships inside this package.
    template_name = TEMPLATE
    timer_text = "Time left for the real-time stage:"

    @staticmethod
    def get_timeout_seconds(player: Any) -> float:
        return stage_timeout(player)

    @staticmethod
    def vars_for_template(player: Any) -> dict[str, Any]:
        try:
            seat = stage_state(player)
        except CanopyError:
            seat = {}  # Canopy away for a moment: show the link, the page reloads itself
        return {
            "canopy_url": player.participant.vars.get("canopy_url", ""),
            "canopy_finished": seat.get("status") == "finished",
            "canopy_reachable": bool(seat),
        }

    @staticmethod
    def before_next_page(player: Any, timeout_happened: bool) -> None:
        collect_payoffs(player, timeout_happened)
