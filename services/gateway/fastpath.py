"""The gateway's fast path for participant sockets: a thin layer over uvicorn's own WebSocket
protocol that lets the app write ready-made frames and take frames read without ASGI messages.

Through ASGI every frame costs a `send` coroutine (uvicorn's checks, websockets' framing) one
way, and a queue, a task wake-up and a `receive` the other; a broadcast to a group is encoded
as text, then re-encoded and framed once per member. `SocketProtocol` is uvicorn's
`WebSocketsSansIOProtocol` (the implementation uvicorn picks for us anyway) that also puts
itself in the WebSocket scope as the `canopy.socket` extension (`FastSocket`):

- `write(frame)` puts an already-framed text frame on the transport, when the socket is open,
  not closing and not paused (a server frame is unmasked: `text_frame` builds it once per
  broadcast and the same bytes go to every member). When it cannot, it says so and the app
  sends through ASGI as before, which waits for a paused transport.
- `read(reader)` hands every later text frame to `reader`, called in `data_received` itself,
  instead of queueing an ASGI message for a task to pick up. The reader says when it wants no
  more for now (its connection's inbox is full): reading then stops until `resume_reading()`,
  as uvicorn stops it while its queue holds a message nobody took.

Everything else (handshake, Origin refusals, pings, close codes, uvicorn's 1012 on shutdown,
frames discarded after a close) stays uvicorn's. The app keeps working without the extension
(another ASGI server, Starlette's TestClient): it then uses ASGI for everything.
"""

from __future__ import annotations

import asyncio
import struct
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.http11 import Request
from websockets.protocol import State

SOCKET_EXTENSION = "canopy.socket"  # the key of `FastSocket` in scope["extensions"]

# A reader's argument: a text frame's text, or None for a binary frame. It returns False to
# have reading stop until `resume_reading()`.
Reader = Callable[[str | None], bool]

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

    def read(self, reader: Reader) -> asyncio.Future[None]: ...

    def resume_reading(self) -> None: ...

    def stop_reading(self) -> None: ...


def fast_socket(scope: Any) -> FastSocket | None:
    """The fast path of a WebSocket's ASGI scope, if its server offers one."""
    extensions = scope.get("extensions") if isinstance(scope, dict) else None
    return extensions.get(SOCKET_EXTENSION) if extensions else None


class _Events(asyncio.Queue[Any]):
    """uvicorn's queue of ASGI events for the app, which also tells the protocol of every
    disconnect it queues (uvicorn queues one wherever the socket ends)."""

    def __init__(self, on_disconnect: Callable[[], None]) -> None:
        super().__init__()
        self._on_disconnect = on_disconnect

    def put_nowait(self, item: Any) -> None:
        super().put_nowait(item)
        if item["type"] == "websocket.disconnect":
            self._on_disconnect()


class SocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol with the `canopy.socket` extension."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queue = _Events(self._disconnected)
        # Frames `write` put on the transport, and frames handed to the reader (tests look).
        self.frames_written = 0
        self.frames_read = 0
        self._reader: Reader | None = None
        self._ended: asyncio.Future[None] | None = None
        self._stalled = False  # the reader asked for no more until `resume_reading`
        self._ending = False  # the socket ended: the reader gets what it holds, then `_ended`
        # Frames read while stalled: the rest of what one `data_received` held (the transport
        # is paused, so no more come in meanwhile). Made when first needed (~0.7 KiB).
        self._held: deque[str | None] | None = None

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

    # -- reads ------------------------------------------------------------------------------

    def read(self, reader: Reader) -> asyncio.Future[None]:
        """From now on hand every frame to `reader`, starting with those uvicorn queued for
        the app meanwhile. The future completes when the socket ends (uvicorn queued a
        disconnect) and the reader had every frame read before that, or fails with what
        `reader` raised (it then gets no more frames)."""
        ended = self._ended = self.loop.create_future()
        self._reader = reader
        self._stalled = False
        queued: list[Any] = []
        while not self.queue.empty():
            queued.append(self.queue.get_nowait())
        for event in queued:
            if event["type"] == "websocket.disconnect":
                self._disconnected()
                break
            if event["type"] == "websocket.receive":
                self._hand(event.get("text"))
        if self._reader is not None and not self._stalled:
            self._resume_transport()  # uvicorn paused it when it queued those frames
        return ended

    def stop_reading(self) -> None:
        """Give no more frames to the reader: from now on uvicorn queues them for the app
        again (unread, they keep reading paused, as for an app that stopped reading)."""
        self._reader = None
        self._held = None

    def resume_reading(self) -> None:
        """The reader takes frames again (it had returned False)."""
        if self._reader is None or not self._stalled:
            return
        self._stalled = False
        held = self._held
        while held and not self._stalled and self._reader is not None:
            self._call(held.popleft())
        if not held:
            self._held = None  # a slow reader's backlog is rare: keep no empty deque
        if self._reader is None:
            return
        if self._ending and not self._held:
            self._end()
        elif not self._stalled:
            self._resume_transport()

    def send_receive_event_to_app(self) -> None:
        if self._reader is None:
            super().send_receive_event_to_app()
            return
        data = self.frames[0] if len(self.frames) == 1 else b"".join(self.frames)
        self.frames = []
        if self.close_sent or self._ending:
            return  # past the app's close, or the end: discarded, as uvicorn does
        text: str | None = None
        if self.curr_msg_data_type == "text":
            try:
                text = data.decode()
            except UnicodeDecodeError:  # as uvicorn: close with 1007
                self.logger.exception("Invalid UTF-8 sequence received from client.")
                self.conn.send_close(1007)
                self.handle_parser_exception()
                return
        self._hand(text)

    def _hand(self, text: str | None) -> None:
        if self._stalled:
            if self._held is None:
                self._held = deque()
            self._held.append(text)
        else:
            self._call(text)

    def _call(self, text: str | None) -> None:
        reader = self._reader
        assert reader is not None
        self.frames_read += 1
        try:
            more = reader(text)
        except Exception as exc:
            self.stop_reading()
            if self._ended is not None and not self._ended.done():
                self._ended.set_exception(exc)
            return
        if not more:
            self._stalled = True
            if not self.read_paused and not self.transport.is_closing():
                self.read_paused = True
                self.transport.pause_reading()

    def _resume_transport(self) -> None:
        if self.read_paused and not self.close_sent and not self.disconnected:
            self.read_paused = False
            self.transport.resume_reading()

    def _disconnected(self) -> None:
        if self._reader is None:
            return
        # Frames read before the end are still the reader's (through ASGI the app would
        # receive them before the disconnect), once it has room for them.
        self._ending = True
        if not self._held:
            self._end()

    def _end(self) -> None:
        self.stop_reading()
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)
