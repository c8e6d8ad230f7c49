"""A TCP proxy a fault test controls: forward to a server, then cut the link without closing it.

`cut()` is a network partition as a process meets it: the sockets stay open, nothing more
arrives either way (bytes sent are dropped, new connections are accepted and hang), so a client
waits on its own timeouts, not on a quick "connection refused". `heal()` closes what hung
(the client finds them dead and reconnects) and forwards again.
"""

from __future__ import annotations

import asyncio
import contextlib


class CutProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.cut_now = False
        self.port = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def cut(self) -> None:
        self.cut_now = True

    def heal(self) -> None:
        self.cut_now = False
        for writer in list(self._writers):
            writer.close()  # the hung connections: the client reconnects through us

    async def close(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            if self.cut_now:
                await reader.read()  # hang (and drop) until the client or heal() closes it
                return
            up_reader, upstream = await asyncio.open_connection(*self._target)
            self._writers.add(upstream)
            await asyncio.gather(self._pipe(reader, upstream), self._pipe(up_reader, writer))
        except OSError:
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    self._writers.discard(w)
                    w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                if not self.cut_now:  # cut: dropped, as on a partitioned link
                    writer.write(data)
                    await writer.drain()
        writer.close()
