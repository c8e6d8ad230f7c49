"""The one-process floor: the same workload as Canopy, served by one bare process.

    python -m bench.floor --groups G --size S [--port P] [--period-length SECONDS]

`make bench` runs every row against Canopy and then against this server, with the same
`LoadParams` and the same load generator, so a row can say how far Canopy's latency is from
what one process on the same machine needs for the same work (docs/performance.md).

What it does, and nothing more: it makes G groups of S participants (random codes, printed as a
JSON line on stdout in the shape of `POST /api/sessions`' answer once it listens: that line is
the ready signal), accepts their WebSockets at `/ws/{code}` (unknown code: HTTP 403 before the
upgrade), sends `hello` (PROTOCOL.md's shape: members, `group_decisions`, `period`, `last_seq`),
sends `period_start` to a group once all its members are connected, and for each decision frame
updates the group's map, sends `ack` to the sender and `group_decisions` to every member.
Duplicates (seq ≤ last_seq) are acknowledged again and not applied; bad frames get PROTOCOL's
`error` codes (`bad_json`, `bad_message`, `unknown_channel`). No broker, no log, no rate limit,
no period end, no presence: what is left is the floor every real-time server pays (parse,
update, encode once, write to each member's socket).

The server is the `websockets` package's asyncio server (websockets.asyncio.server) on uvloop,
without compression, and its `broadcast()` (one encoded frame written to each member's
transport, no per-member await). That is the well-kept library a careful engineer would pick
for a single-process WebSocket aggregator; uvicorn adds an ASGI layer (scope dicts, message
dicts per frame) that a bare server has no reason to pay, so a floor behind it would flatter
Canopy. The aggregation itself is `Floor` (no I/O), unit-tested on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import secrets
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib.metadata import version
from typing import Any

import orjson

CHANNEL = "decisions"
READY_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
MAX_FRAME_BYTES = 65_536  # as the gateway: bigger frames close the connection with 1009
SERVER_DESCRIPTION = (
    f"websockets {version('websockets')} asyncio server + broadcast(), uvloop, no compression"
)

# What to send: (recipients' codes, one encoded frame for all of them).
Outgoing = list[tuple[list[str], bytes]]


@dataclass
class FloorGroup:
    group: str
    members: list[str]
    decisions: dict[str, Any]  # code → latest decision (None until the first)
    connected: set[str] = field(default_factory=set)
    ends_at: float | None = None  # set when the period started


class Floor:
    """The floor's state and aggregation, without I/O: frames in, frames out."""

    def __init__(
        self,
        groups: int,
        size: int,
        period_length: float,
        clock: Callable[[], float] = time.time,
        token: Callable[[], str] = lambda: secrets.token_urlsafe(12),
    ) -> None:
        if groups < 1 or size < 1:
            raise ValueError("groups and size must be at least 1")
        if not period_length > 0:
            raise ValueError("period_length must be > 0")
        self.period_length = period_length
        self._clock = clock
        self.session_id = f"floor-{token()}"
        self.groups: list[FloorGroup] = []
        self.group_of: dict[str, FloorGroup] = {}
        self.last_seq: dict[str, int] = {}
        self.decisions_applied = 0
        for g in range(groups):
            members = [token() for _ in range(size)]
            group = FloorGroup(f"{self.session_id}-g{g + 1}", members, dict.fromkeys(members))
            self.groups.append(group)
            for code in members:
                self.group_of[code] = group
                self.last_seq[code] = 0

    def session(self) -> dict[str, Any]:
        """The groups, in the shape of `POST /api/sessions`' answer (what the load generator
        reads)."""
        return {
            "session": self.session_id,
            "groups": [{"group": g.group, "participants": list(g.members)} for g in self.groups],
            "participants": [
                {"code": code, "group": g.group, "id_in_group": i}
                for g in self.groups
                for i, code in enumerate(g.members, start=1)
            ],
        }

    def knows(self, code: str) -> bool:
        return code in self.group_of

    def _frame(self, channel: str, payload: Any) -> bytes:
        return orjson.dumps({"channel": channel, "payload": payload, "ts": self._clock()})

    def connect(self, code: str) -> Outgoing:
        """`code` connected: its `hello`, and `period_start` to the group if it is complete
        now for the first time."""
        group = self.group_of[code]
        group.connected.add(code)
        out: Outgoing = []
        started = group.ends_at is None and len(group.connected) == len(group.members)
        if started:
            group.ends_at = self._clock() + self.period_length
        period = {
            "number": 1,
            "state": "waiting" if group.ends_at is None else "running",
            "ends_at": group.ends_at,
        }
        hello = {
            "participant": code,
            "group": group.group,
            "id_in_group": group.members.index(code) + 1,
            "members": group.members,
            "group_decisions": group.decisions,
            "period": period,
            "last_seq": self.last_seq[code],
        }
        out.append(([code], self._frame("hello", hello)))
        if started:
            start = {"period": 1, "length": self.period_length, "ends_at": group.ends_at}
            out.append((list(group.members), self._frame("period_start", start)))
        return out

    def disconnect(self, code: str) -> None:
        self.group_of[code].connected.discard(code)

    def _error(self, code: str, error: str, message: str, seq: int | None) -> Outgoing:
        payload = {"code": error, "message": message, "seq": seq}
        return [([code], self._frame("error", payload))]

    def on_frame(self, code: str, message: str | bytes) -> Outgoing:
        """One frame from `code`: `ack` + `group_decisions`, a repeated `ack`, or an `error`."""
        if not isinstance(message, str):
            return self._error(code, "bad_message", "only text frames are accepted", None)
        try:
            frame = orjson.loads(message)
        except orjson.JSONDecodeError:
            return self._error(code, "bad_json", "the frame is not JSON", None)
        if not isinstance(frame, dict):
            return self._error(code, "bad_message", "a frame is one JSON object", None)
        seq = frame.get("seq")
        if type(seq) is not int or seq < 1:
            return self._error(code, "bad_message", "seq must be an integer >= 1", None)
        if "payload" not in frame or not isinstance(frame.get("channel"), str):
            return self._error(code, "bad_message", "channel and payload are required", seq)
        if frame["channel"] != CHANNEL:
            return self._error(code, "unknown_channel", f"unknown channel {frame['channel']}", seq)
        ack = ([code], self._frame("ack", {"seq": seq}))
        if seq <= self.last_seq[code]:
            return [ack]  # a duplicate: acknowledged again, not applied
        self.last_seq[code] = seq
        group = self.group_of[code]
        group.decisions[code] = frame["payload"]
        self.decisions_applied += 1
        return [ack, (list(group.connected), self._frame("group_decisions", group.decisions))]


# -- the server ---------------------------------------------------------------------------------


async def serve(floor: Floor, host: str, port: int, ready: Callable[[int], None]) -> None:
    """Serve until SIGTERM / SIGINT; `ready(port)` once listening."""
    from websockets.asyncio.server import ServerConnection, broadcast
    from websockets.asyncio.server import serve as ws_serve
    from websockets.exceptions import ConnectionClosed
    from websockets.http11 import Request, Response

    sockets: dict[str, ServerConnection] = {}

    def send(out: Outgoing) -> None:
        for codes, frame in out:
            broadcast([sockets[c] for c in codes if c in sockets], frame, text=True)

    def code_of(path: str) -> str:
        return path.partition("?")[0].removeprefix("/ws/")

    def check(connection: ServerConnection, request: Request) -> Response | None:
        if not request.path.startswith("/ws/") or not floor.knows(code_of(request.path)):
            return connection.respond(HTTPStatus.FORBIDDEN, "unknown participant\n")
        return None

    async def handler(ws: ServerConnection) -> None:
        assert ws.request is not None  # set once the handshake is done
        code = code_of(ws.request.path)
        previous = sockets.get(code)
        sockets[code] = ws
        if previous is not None:  # a second connection replaces the first (PROTOCOL: 4409)
            await previous.close(4409, "replaced by a new connection")
        send(floor.connect(code))
        try:
            while True:
                send(floor.on_frame(code, await ws.recv()))
        except ConnectionClosed:
            pass
        finally:
            if sockets.get(code) is ws:
                del sockets[code]
                floor.disconnect(code)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with ws_serve(
        handler,
        host,
        port,
        process_request=check,
        compression=None,
        max_size=MAX_FRAME_BYTES,
    ) as server:
        ready(next(iter(server.sockets)).getsockname()[1])
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.floor", description=__doc__)
    parser.add_argument("--groups", "-G", type=int, required=True)
    parser.add_argument("--size", "-P", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: a free port (printed)")
    parser.add_argument("--period-length", type=float, default=3600.0)
    args = parser.parse_args(argv)
    try:
        floor = Floor(args.groups, args.size, args.period_length)
    except ValueError as e:
        parser.error(str(e))

    # One socket per participant: as many as the hard limit allows (as bench.ownstack does).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    def ready(port: int) -> None:
        line = {"url": f"http://{args.host}:{port}", "pid": os.getpid()} | floor.session()
        sys.stdout.buffer.write(orjson.dumps(line) + b"\n")
        sys.stdout.flush()

    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(floor, args.host, args.port, ready))
    return 0


# -- for the benchmark: the floor as a child process -------------------------------------------


@dataclass(frozen=True)
class FloorProcess:
    url: str
    pid: int
    session: dict[str, Any]  # as POST /api/sessions answers: "session", "groups", ...


@contextlib.contextmanager
def floor_process(groups: int, size: int, period_length: float) -> Iterator[FloorProcess]:
    """Start `python -m bench.floor` on a free loopback port, wait for its ready line (bounded),
    and stop it (SIGTERM, then SIGKILL) when the block ends."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "bench.floor",
            "--groups",
            str(groups),
            "--size",
            str(size),
            "--period-length",
            str(period_length),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    try:
        assert proc.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(proc.stdout, selectors.EVENT_READ)
            if not selector.select(READY_TIMEOUT):
                raise RuntimeError(f"the floor did not start within {READY_TIMEOUT:g} s")
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the floor exited before it was ready ({proc.wait()})")
        ready = orjson.loads(line)
        yield FloorProcess(url=ready["url"], pid=ready["pid"], session=ready)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


if __name__ == "__main__":
    sys.exit(main())
