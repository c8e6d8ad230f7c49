"""A minimal WebSocket client (RFC 6455) on an asyncio `Protocol`, built for load generation.

One participant of the load generator is one `WsClient`. It does the opening handshake itself,
then parses the server's frames straight out of `data_received` (no reader task, no queue per
connection), answers pings, and hands each text message to `on_message(raw, now)` with one
clock reading per TCP read. Sending is a synchronous `transport.write` of a masked frame.

Deliberately small: no extensions are offered (so no compression), no TLS, loopback only.
Fragmented messages, pings and closes are handled; anything else the server must never send
(masked frames, unknown opcodes) closes the connection as a protocol error.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import random
import socket
import time
from collections.abc import Callable
from typing import cast
from urllib.parse import urlsplit

_c_apply_mask: Callable[[bytes, bytes], bytes] | None
try:  # the C helper of the `websockets` package (a dev dependency), if present
    from websockets.speedups import apply_mask as _c_apply_mask
except ImportError:  # pragma: no cover - fallback when websockets is not installed
    _c_apply_mask = None

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_HANDSHAKE_BYTES = 16_384

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def apply_mask(data: bytes, mask: bytes) -> bytes:
    """XOR `data` with the 4-byte `mask` repeated (the C helper when available)."""
    if _c_apply_mask is not None:
        return bytes(_c_apply_mask(data, mask))
    if not data:
        return b""
    n = len(data)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final, masked client frame."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65_536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    mask = random.getrandbits(32).to_bytes(4, "big")
    return header + mask + apply_mask(payload, mask)


class HandshakeError(ConnectionError):
    """The server refused the upgrade (e.g. HTTP 403) or answered something else."""


class WsClient(asyncio.Protocol):
    """One WebSocket connection. Subclasses override `on_message` (and `on_closed`)."""

    def __init__(self, host: str, port: int, path: str) -> None:
        self._host, self._port, self._path = host, port, path
        self._key = base64.b64encode(os.urandom(16))
        self._transport: asyncio.Transport | None = None
        self._handshaking = True
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.closing = False  # we started the close

    # -- to override -------------------------------------------------------------------------

    def on_message(self, raw: bytes, now: float) -> None:
        """A complete text message arrived (`now`: time.perf_counter() at the read)."""

    def on_closed(self, expected: bool) -> None:
        """The connection ended; `expected` is False when we did not ask for it."""

    # -- sending -----------------------------------------------------------------------------

    def send_text(self, payload: bytes) -> None:
        transport = self._transport
        if transport is None or self.closing or transport.is_closing():
            raise ConnectionError("the connection is closed")
        transport.write(encode_frame(OP_TEXT, payload))

    def close(self, code: int = 1000) -> None:
        """Start the closing handshake; the transport is closed when the server answers
        (or by `abort()` if it does not)."""
        if self.closing or self._transport is None:
            return
        self.closing = True
        if not self._transport.is_closing():
            self._transport.write(encode_frame(OP_CLOSE, code.to_bytes(2, "big")))

    def abort(self) -> None:
        self.closing = True
        if self._transport is not None:
            self._transport.abort()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        request = (
            f"GET {self._path} HTTP/1.1\r\n"
            f"Host: {self._host}:{self._port}\r\n"
            "Upgrade: websocket\r\n"
            "Connection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {self._key.decode()}\r\n"
            "Sec-WebSocket-Version: 13\r\n"
            "\r\n"
        )
        transport.write(request.encode())

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc or HandshakeError("connection closed during handshake"))
        if not self.closed.done():
            self.closed.set_result(None)
        self.on_closed(self.closing)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        if self._handshaking:
            end = data.find(b"\r\n\r\n")
            if end < 0:
                if len(data) > MAX_HANDSHAKE_BYTES:
                    self._fail_handshake("handshake response too large")
                else:
                    self._buffer = data
                return
            if not self._check_handshake(data[:end]):
                return
            self._handshaking = False
            data = data[end + 4 :]
            self.opened.set_result(None)
        self._parse(data, now)

    # -- internals ---------------------------------------------------------------------------

    def _check_handshake(self, head: bytes) -> bool:
        lines = head.decode("latin-1").split("\r\n")
        status = lines[0].split(" ", 2)
        if len(status) < 2 or status[1] != "101":
            self._fail_handshake(f"upgrade refused: {lines[0]}")
            return False
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        expected = base64.b64encode(hashlib.sha1(self._key + GUID).digest()).decode()
        if headers.get("sec-websocket-accept") != expected:
            self._fail_handshake("bad Sec-WebSocket-Accept")
            return False
        if headers.get("sec-websocket-extensions"):
            self._fail_handshake("the server enabled an extension we did not offer")
            return False
        return True

    def _fail_handshake(self, reason: str) -> None:
        if not self.opened.done():
            self.opened.set_exception(HandshakeError(reason))
        self.abort()

    def _parse(self, data: bytes, now: float) -> None:
        pos, size = 0, len(data)
        while size - pos >= 2:
            b0, b1 = data[pos], data[pos + 1]
            length = b1 & 0x7F
            start = pos + 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(data[start : start + 2], "big")
                start += 2
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(data[start : start + 8], "big")
                start += 8
            if b1 & 0x80:  # servers never mask
                self._protocol_error()
                return
            end = start + length
            if end > size:
                break
            payload = data[start:end]
            pos = end
            opcode = b0 & 0x0F
            if opcode == OP_TEXT and b0 & 0x80:
                self.on_message(payload, now)
            elif opcode in (OP_TEXT, OP_BINARY, OP_CONT):
                self._fragment(opcode, payload, bool(b0 & 0x80), now)
            elif opcode == OP_PING:
                if self._transport is not None and not self._transport.is_closing():
                    self._transport.write(encode_frame(OP_PONG, payload))
            elif opcode == OP_CLOSE:
                self._on_close_frame(payload)
                return
            elif opcode != OP_PONG:
                self._protocol_error()
                return
        if pos < size:
            self._buffer = data[pos:]

    def _fragment(self, opcode: int, payload: bytes, fin: bool, now: float) -> None:
        if opcode != OP_CONT:
            self._fragments = [payload] if opcode == OP_TEXT else []
        elif self._fragments is None:
            self._protocol_error()
            return
        else:
            self._fragments.append(payload)
        if fin:
            fragments, self._fragments = self._fragments, None
            if fragments:  # empty list: a binary message, which this client ignores
                self.on_message(b"".join(fragments), now)

    def _on_close_frame(self, payload: bytes) -> None:
        self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
        transport = self._transport
        if transport is None:
            return
        if not self.closing and not transport.is_closing():
            transport.write(encode_frame(OP_CLOSE, payload[:2]))
        transport.close()

    def _protocol_error(self) -> None:
        self.close_code = 1002
        self.abort()


def parse_ws_target(gateway_url: str) -> tuple[str, int, str]:
    """(host, port, path prefix) of an http(s)/ws gateway URL; TLS is not supported."""
    parts = urlsplit(gateway_url)
    if parts.scheme not in ("http", "ws"):
        raise ValueError(f"only plain http:// or ws:// gateways are supported, not {gateway_url}")
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    return host, port, parts.path.rstrip("/")
