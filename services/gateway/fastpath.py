"""The gateway's fast path for participant sockets: a thin layer over uvicorn's own WebSocket
protocol that lets the app write ready-made frames without ASGI messages.

Through ASGI every frame costs a `send` coroutine (uvicorn's checks, websockets' framing) one
way, and a queue, a task wake-up and a `receive` the other; a broadcast to a group is encoded
as text, then re-encoded and framed once per member. `SocketProtocol` is uvicorn's
`WebSocketsSansIOProtocol` (the implementation uvicorn picks for us anyway) that also puts
itself in the WebSocket scope as the `canopy.socket` extension (`FastSocket`).

`write(frame)` puts an already-framed text frame on the transport, when the socket is open,
not closing and not paused (a server frame is unmasked: `text_frame` builds it once per
broadcast and the same bytes go to every member). When it cannot, it says so and the app
sends through ASGI as before, which waits for a paused transport.

Everything else (handshake, Origin refusals, pings, close codes, uvicorn's 1012 on shutdown,
frames discarded after a close) stays uvicorn's. The app keeps working without the extension
(another ASGI server, Starlette's TestClient): it then uses ASGI for everything.
"""

from __future__ import annotations

import struct
from typing import Any, Protocol

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

SOCKET_EXTENSION = "canopy.socket"  # the key of `FastSocket` in scope["extensions"]

_FIN_TEXT = 0x81  # FIN set, opcode 0x1 (text); no RSV bits: no extension was negotiated
_PACK_16 = struct.Struct("!BBH").pack
_PACK_64 = struct.Struct("!BBQ").pack


def text_frame(payload: bytes) -> bytes:
    """A complete, unmasked WebSocket text frame (RFC 6455 §5.2) holding `payload` (UTF-8)."""
    size = len(payload)
    if size < 126:
        return bytes((_FIN_TEXT, size)) + payload
    if size < 65536:
        return _PACK_16(_FIN_TEXT, 126, size) + payload
    return _PACK_64(_FIN_TEXT, 127, size) + payload


class FastSocket(Protocol):
    """What the app may use of a socket served by `SocketProtocol` (see the module docstring)."""

    def write(self, frame: bytes) -> bool: ...


def fast_socket(scope: Any) -> FastSocket | None:
    """The fast path of a WebSocket's ASGI scope, if its server offers one."""
    extensions = scope.get("extensions") if isinstance(scope, dict) else None
    return extensions.get(SOCKET_EXTENSION) if extensions else None


class SocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with the `canopy.socket` extension."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frames_written = 0  # frames `write` put on the transport (tests look)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)  # set only for an upgrade uvicorn hands the app
        if scope is not None:
            scope["extensions"][SOCKET_EXTENSION] = self

    # -- writes -----------------------------------------------------------------------------

    def write(self, frame: bytes) -> bool:
        """Put a frame built by `text_frame` on the transport; False (nothing written) if the
        socket is not open, is closing, is paused, or has an extension that frames differ for
        (permessage-deflate): the caller then sends through ASGI, which knows what to do."""
        if (
            self.close_sent
            or self.disconnected
            or not self.writable.is_set()
            or self.conn.state is not State.OPEN
            or self.conn.extensions
            or self.transport.is_closing()
        ):
            return False
        self.transport.write(frame)
        self.frames_written += 1
        return True
