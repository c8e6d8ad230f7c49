"""An oTree 6 project with a Canopy stage in the middle (docs/otree.md): instructions and a
quiz in oTree, a continuous-time stag hunt in Canopy for each group of 2, the results back in
oTree. Canopy's address and admin token come from CANOPY_URL and CANOPY_TOKEN; the address
participants come back to from CANOPY_RETURN_URL (this oTree server's public base)."""

from os import environ

import canopy_otree

# What every Canopy stage of the session runs: any setting of Canopy's POST /api/sessions
# (experiment, params, num_periods, period_length, num_subperiods, on_disconnect, payment...),
# plus timeout_seconds (how long oTree waits for a player to come back) and return_url. The
# canopy package fills in num_participants, group_size, labels and completion per group.
STAG_HUNT = dict(
    experiment="bimatrix",
    params=dict(game="stag_hunt", initial_decision=0.5),
    num_periods=2,
    period_length=60,
    on_disconnect="continue",
)

SESSION_CONFIGS = [
    dict(
        name="canopy_bimatrix",
        display_name="Stag hunt in continuous time (Canopy stage)",
        app_sequence=["canopy_bimatrix"],
        num_demo_participants=2,
        canopy=STAG_HUNT,
    ),
    dict(
        # The same with two 3-second periods: for trying the flow out, and for the tests.
        name="canopy_bimatrix_quick",
        display_name="Stag hunt, two 3-second periods (Canopy stage)",
        app_sequence=["canopy_bimatrix"],
        num_demo_participants=2,
        canopy=dict(STAG_HUNT, period_length=3, timeout_seconds=90),
    ),
]

SESSION_CONFIG_DEFAULTS = dict(real_world_currency_per_point=0.01, participation_fee=5.00, doc="")

PARTICIPANT_FIELDS = list(canopy_otree.PARTICIPANT_FIELDS)
SESSION_FIELDS = []

LANGUAGE_CODE = "en"
REAL_WORLD_CURRENCY_CODE = "USD"
USE_POINTS = True
# Canopy's payoffs are time averages (e.g. 3.2745...): keep two decimals of them.
POINTS_DECIMAL_PLACES = 2

ADMIN_USERNAME = "admin"
ADMIN_PASSWORD = environ.get("OTREE_ADMIN_PASSWORD")

DEMO_PAGE_INTRO_HTML = "A Canopy stage inside an oTree study."

SECRET_KEY = environ.get("OTREE_SECRET_KEY", "canopy-otree-example-not-secret")
