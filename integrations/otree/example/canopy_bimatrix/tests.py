"""oTree bots for the whole flow: the Canopy stage is played by Canopy's own bots (started
through the store's API), and the results must be Canopy's payoffs."""

import canopy_otree
from otree.api import Bot, Submission, SubmissionMustFail, cu

from . import Instructions, Quiz, Results, Stage


class PlayerBot(Bot):
    def play_round(self):
        yield Instructions
        yield SubmissionMustFail(Quiz, dict(quiz_mix=3, quiz_end=1))
        yield Quiz, dict(quiz_mix=4, quiz_end=1)
        # the wait page created the Canopy session; Canopy's bots play it to its end
        seat = canopy_otree.play_stage_with_bots(self.player)
        assert seat["outcome"] == "completed", seat
        # the page was fetched before the stage ended (it then showed the link to Canopy)
        yield Submission(Stage, check_html=False)
        pp = self.participant
        assert pp.canopy_outcome == "completed"
        assert pp.canopy_total_payoff == seat["total_payoff"]
        assert pp.canopy_payoffs == seat["payoffs"]
        assert self.player.payoff == cu(seat["total_payoff"])
        assert len(seat["payoffs"]) == self.session.config["canopy"]["num_periods"]
        yield Results
