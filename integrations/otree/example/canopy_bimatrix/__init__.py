"""Instructions, a two-question quiz, a continuous-time stag hunt played in Canopy by each
group of 2, and the results as Canopy measured them."""

import canopy_otree
from canopy_otree.pages import StagePage
from otree.api import (
    BaseConstants,
    BaseGroup,
    BasePlayer,
    BaseSubsession,
    Page,
    WaitPage,
    models,
    widgets,
)

doc = """
A stag hunt in continuous time: oTree forms the groups, Canopy runs the real-time stage,
oTree shows the results and pays.
"""


class C(BaseConstants):
    NAME_IN_URL = "canopy_bimatrix"
    PLAYERS_PER_GROUP = 2
    NUM_ROUNDS = 1


class Subsession(BaseSubsession):
    pass


class Group(BaseGroup):
    pass


class Player(BasePlayer):
    quiz_mix = models.IntegerField(
        label=(
            "Your slider and the other player's are both at 100% stag."
            " What do you each earn per second?"
        ),
        choices=[[4, "4 points each"], [3, "3 points each"], [0, "0 points each"]],
        widget=widgets.RadioSelect,
    )
    quiz_end = models.IntegerField(
        label="What happens when the real-time stage ends?",
        choices=[
            [1, "I come back here automatically and see my payoffs"],
            [2, "I have to close the window"],
        ],
        widget=widgets.RadioSelect,
    )


QUIZ_ANSWERS = dict(quiz_mix=4, quiz_end=1)


# PAGES
class Instructions(Page):
    pass


class Quiz(Page):
    form_model = "player"
    form_fields = ["quiz_mix", "quiz_end"]

    @staticmethod
    def error_message(player, values):
        wrong = [name for name, answer in QUIZ_ANSWERS.items() if values[name] != answer]
        if wrong:
            return "Not quite: please read the instructions again and correct your answers."


class StartStage(WaitPage):
    title_text = "Waiting for the other player"
    body_text = "The real-time stage starts as soon as your group is complete."

    @staticmethod
    def after_all_players_arrive(group: Group):
        canopy_otree.create_stage(group)


class Stage(StagePage):
    pass


class Results(Page):
    @staticmethod
    def vars_for_template(player: Player):
        pp = player.participant
        payoffs = pp.canopy_payoffs or {}
        return dict(
            periods=[
                dict(number=k, payoff=round(v, 2))
                for k, v in sorted(payoffs.items(), key=lambda kv: int(kv[0]))
            ],
            outcome=pp.canopy_outcome,
        )


page_sequence = [Instructions, Quiz, StartStage, Stage, Results]
