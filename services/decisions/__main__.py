"""`python -m services.decisions`: run the decisions service."""

from services.common.serve import serve
from services.decisions.app import create_app
from services.decisions.settings import DecisionsSettings

settings = DecisionsSettings()
serve(create_app(settings), settings, service="decisions", port=settings.decisions_port)
