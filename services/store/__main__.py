"""`python -m services.store`: run the store service."""

from services.common.serve import serve
from services.store.app import create_app
from services.store.settings import StoreSettings

settings = StoreSettings()
# A console's live monitor (SSE) never ends by itself: without a bound, a stopping store would
# wait for every open console to close.
serve(
    create_app(settings),
    settings,
    service="store",
    port=settings.store_port,
    timeout_graceful_shutdown=5,
)
