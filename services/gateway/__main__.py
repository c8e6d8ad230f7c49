"""`python -m services.gateway`: run the gateway service."""

from services.common.serve import serve
from services.gateway.app import create_app
from services.gateway.fastpath import SocketProtocol
from services.gateway.settings import GatewaySettings

settings = GatewaySettings()
serve(
    create_app(settings),
    settings,
    service="gateway",
    port=settings.gateway_port,
    ws_max_size=settings.max_frame_bytes,
    # Frames are small JSON: deflating each one for each member costs more CPU than it saves.
    ws_per_message_deflate=False,
    # uvicorn's own WebSocket protocol plus a way past ASGI for frames (see the module).
    ws=SocketProtocol,
)
