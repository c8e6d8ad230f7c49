"""oTree bots for the whole flow. The Canopy stage is played by Canopy's own bots (started
through the store's API), and the results must be Canopy's payoffs. Case `no_show`: the second
member of each group never opens Canopy, so the group's stage never starts; oTree's timeout
moves both on with outcome "unfinished" and nobody is stuck."""

import canopy_otree
from otree.api import Bot, Submission, SubmissionMustFail, cu

from . import Instructions, Quiz, Results, Stage


class PlayerBot(Bot):
    cases = ["played", "no_show"]

    def play_round(self):
        yield Instructions
        yield SubmissionMustFail(Quiz, dict(quiz_mix=3, quiz_end=1))
        yield Quiz, dict(quiz_mix=4, quiz_end=1)
        # The wait page created the group's Canopy session.
        assert self.participant.canopy_session
        assert self.participant.vars["canopy_url"]
        if self.case == "played":
            # Canopy's bots play the whole stage to its end.
            seat = canopy_otree.play_stage_with_bots(self.player)
            assert seat["outcome"] == "completed", seat
            # The page was fetched before the stage ended (then it showed the link to Canopy).
            yield Submission(Stage, check_html=False)
            pp = self.participant  # read afresh: the page's submission changed it
            assert pp.canopy_outcome == "completed"
            assert pp.canopy_total_payoff == seat["total_payoff"]
            assert pp.canopy_payoffs == seat["payoffs"]
            assert self.player.payoff == cu(seat["total_payoff"])
            assert len(seat["payoffs"]) == self.session.config["canopy"]["num_periods"]
        else:
            if self.player.id_in_group == 1:
                # A bot in the first seat only: the group waits in Canopy for the second.
                canopy_otree.play_stage_with_bots(self.player, all_but=1, wait=False)
            yield Submission(Stage, timeout_happened=True, check_html=False)
            pp = self.participant
            assert pp.canopy_outcome == "unfinished", pp.canopy_outcome
            assert pp.canopy_payoffs == {}
            assert self.player.payoff == 0
        yield Results
