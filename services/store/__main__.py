"""`python -m services.store`: run the store service."""

from services.common.serve import serve
from services.store.app import create_app
from services.store.settings import StoreSettings

settings = StoreSettings()
serve(create_app(settings), settings, service="store", port=settings.store_port)
