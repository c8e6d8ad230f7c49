"""`python -m services.timers`: run the timers service."""

from services.common.serve import serve
from services.timers.app import create_app
from services.timers.settings import TimersSettings

settings = TimersSettings()
serve(create_app(settings), settings, service="timers", port=settings.timers_port)
