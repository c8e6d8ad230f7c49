"""A bot's connection: one participant's WebSocket kept as the JS client keeps it.

Owns the client-side rules of PROTOCOL.md ("Participants' WebSocket") for scripted
participants, the same rules as `services/gateway/static/canopy.js`:

- every frame gets the participant's next `seq`, and stays in the outbox (`unacked`) until an
  `ack` of that seq, a `hello` whose `last_seq` is at or above it, or an `error` naming it;
- after every `hello` the outbox is sent again in seq order with the original seqs (before any
  new frame: a seq at or below one the server already took counts as a duplicate), and the
  counter moves up to `last_seq` if the server knows more than the bot;
- frames made while the socket is down wait in the outbox (a browser's slider keeps moving);
- the socket is opened again after any close, with exponential backoff and equal jitter,
  except after 4403 (unknown seat) and 4409 (another connection took the seat over: a person
  opened that link), which end the bot's connection for good.

A bot's link holds the seat's secret key (PROTOCOL v2); the bot learns its public code, the
name every payload gives it, from its `hello` (or is told it up front: `code`).

`Bot` adds a player on top: while its period runs it asks its strategy what to send, at a
steady pace (`rate` turns per second), until `num_periods` periods have ended or its seat got
`finished` (its `outcome` then holds that message). It skips the
turns of the period's last END_MARGIN seconds, by the server's clock (estimated from the
frames' `ts` as canopy.js does), whose frames would come too late. It keeps what
it was told (with arrival times) and counts what it sent, had acknowledged and had refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import websockets
from websockets.asyncio.client import ClientConnection

from services.bots.strategies import OpenOrders, Strategy, View
from services.common.errors import CloseCode
from services.common.seats import fingerprint

OPEN_TIMEOUT = 5.0
# A bot takes no turn this close to its period's end (server clock): the frame would reach
# the group after the period ended and get `period_not_running`. Measured with 100 bots at
# 5 turns/s on a busy 2-core machine: 0.15 s left 23 % of the bots with such a refusal,
# 0.5 s none; a bot idle for its last 0.3 s of a period is no loss to a session.
END_MARGIN = 0.3


def ws_url(link: str) -> str:
    """The WebSocket of a participant link: `http(s)://host[/prefix]/p/<key>` →
    `ws(s)://host[/prefix]/ws/<key>`; a `ws(s)://…/ws/<key>` URL is kept as it is."""
    parts = urlsplit(link)
    if parts.scheme in ("ws", "wss") and "/ws/" in parts.path:
        return link
    prefix, sep, key = parts.path.rpartition("/p/")
    if parts.scheme not in ("http", "https") or not sep or not key or "/" in key:
        raise ValueError(f"not a participant link (http(s)://host/p/<key>): {link!r}")
    scheme = "wss" if parts.scheme == "https" else "ws"
    return urlunsplit((scheme, parts.netloc, f"{prefix}/ws/{key}", "", ""))


def link_key(link: str) -> str:
    """The seat key at the end of a participant link or WebSocket URL."""
    return urlsplit(ws_url(link)).path.rsplit("/", 1)[1]


@dataclass
class Received:
    at: float  # time.monotonic() on arrival
    channel: str
    payload: Any


@dataclass(frozen=True)
class HelloSeen:
    """A `hello` and the acks before it (PROTOCOL v2 "The ack holds through everything": its
    `last_seq` must be at least every seq acknowledged before it, on any connection)."""

    connection: int  # which of the bot's connections it came on (1: the first)
    last_seq: int
    acked: int  # the highest seq an `ack` had confirmed before it, on any connection (0: none)
    acked_here: int  # the same, on this hello's own connection


@dataclass
class Bot:
    """One scripted participant; `start()`, then `stop()`. See the module docstring.

    `strategy` None: a bot that only holds its slot and answers as a client must (no frames
    of its own unless `send()` is called)."""

    url: str  # participant link or WebSocket URL
    strategy: Strategy | None = None
    rate: float = 1.0  # strategy turns per second while the period runs
    num_periods: int | None = None  # stop playing after this period ended (None: never)
    rng: random.Random = field(default_factory=random.Random)
    min_delay: float = 0.25  # reconnect backoff: doubling from this ...
    max_delay: float = 5.0  # ... up to this (canopy.js: 250 ms to 5 s)
    code: str = ""  # the participant's public code: given, or learnt from the first hello
    # What happened, for stats and tests.
    sent: int = 0  # new frames (resends not counted)
    acked: set[int] = field(default_factory=set)
    unacked: dict[int, tuple[str, Any]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    received: list[Received] = field(default_factory=list)
    closes: list[int | None] = field(default_factory=list)
    connects: int = 0
    gave_up: str | None = None  # why the bot stopped reconnecting (refused / replaced)
    hellos: list[HelloSeen] = field(default_factory=list)
    # The latest view of the group.
    id_in_group: int = 0
    members: tuple[str, ...] = ()
    decisions: dict[str, Any] = field(default_factory=dict)
    book: dict[str, Any] | None = None
    open_orders: OpenOrders = field(default_factory=OpenOrders)  # the auction: its own
    period: int = 0
    running: bool = False
    periods_ended: int = 0  # number of the last period whose period_end arrived
    # The seat's end (PROTOCOL v2 "Online studies"): the latest `finished` payload, {"outcome",
    # "total_payoff", "redirect", "code"}; None until one arrived.
    outcome: dict[str, Any] | None = None
    ends_at: float | None = None  # the running period's end, server epoch seconds
    clock_offset: float | None = None  # server clock − ours, estimated as canopy.js does
    _ws: ClientConnection | None = None
    _seq: int = 0
    _acked_high: int = 0  # the highest seq an `ack` confirmed, on any connection
    _acked_here: int = 0  # the same, on the current connection
    _hello_here: bool = False  # the current (or last) socket got a hello
    _synced: bool = False  # hello seen and the outbox resent on the current socket
    _started: asyncio.Event = field(default_factory=asyncio.Event)
    _finished: asyncio.Event = field(default_factory=asyncio.Event)
    _changed: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.url = ws_url(self.url)

    @property
    def name(self) -> str:
        """The bot in messages: its code once known, else a fingerprint of its key (never the
        key itself)."""
        return self.code or f"seat {fingerprint(link_key(self.url))}"

    # -- life ----------------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._connect_loop(), name=f"bot {self.name} socket")]
        if self.strategy is not None and self.rate > 0:
            self._tasks.append(asyncio.create_task(self._play(), name=f"bot {self.name} play"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        ws, self._ws = self._ws, None
        if ws is not None:
            with contextlib.suppress(Exception):
                await ws.close()

    @property
    def connected(self) -> bool:
        return self._synced

    @property
    def finished(self) -> bool:
        """Done playing: its last period ended (or its seat got `finished`), or it cannot
        connect any more."""
        return self._finished.is_set()

    async def wait_for(self, what: str, check: Any, timeout: float) -> None:
        """Until `check()` holds (`what` names it in the timeout's message); re-checked after
        every frame this bot receives and every change of its connection."""
        try:
            async with asyncio.timeout(timeout):
                while not check():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            raise TimeoutError(f"bot {self.name}: no {what} within {timeout:g} s") from None

    async def wait_started(self, timeout: float) -> None:
        """Until a period runs (or ran) for this bot."""
        await asyncio.wait_for(self._started.wait(), timeout)

    async def wait_ended(self, timeout: float | None) -> None:
        """Until `period_end` of period `num_periods` arrived (or the bot gave up)."""
        await asyncio.wait_for(self._finished.wait(), timeout)

    # -- sending -------------------------------------------------------------------------

    async def send(self, channel: str, payload: Any) -> int:
        """Queue a frame with the next seq; sent now if the socket is synced, else after the
        next hello. Returns its seq."""
        self._seq += 1
        seq = self._seq
        self.unacked[seq] = (channel, payload)
        self.sent += 1
        self.open_orders.sent(seq, channel, payload)
        ws = self._ws
        if ws is not None and self._synced:
            with contextlib.suppress(websockets.WebSocketException):
                await ws.send(_frame(seq, channel, payload))
        return seq

    def view(self) -> View:
        return View(
            code=self.code,
            id_in_group=self.id_in_group,
            members=self.members,
            decisions=dict(self.decisions),
            book=self.book,
            open_orders=dict(self.open_orders.orders) if self.book is not None else None,
        )

    # -- views for tests -----------------------------------------------------------------

    def payloads(self, channel: str, since: float = float("-inf")) -> list[Any]:
        return [r.payload for r in self.received if r.channel == channel and r.at >= since]

    def first(self, channel: str, since: float) -> float | None:
        return next((r.at for r in self.received if r.channel == channel and r.at >= since), None)

    # -- the socket ----------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        attempt = 0
        while True:
            try:
                async with websockets.connect(
                    self.url, open_timeout=OPEN_TIMEOUT, max_queue=None, max_size=None
                ) as ws:
                    self._ws = ws
                    self.connects += 1
                    self._acked_here = 0
                    self._hello_here = False
                    await self._read(ws)
                code = ws.close_code
                self.closes.append(code)
            except websockets.InvalidStatus as exc:
                code = exc.response.status_code
                self.closes.append(code)
                if code == 403:  # an unknown code, refused before the upgrade
                    code = CloseCode.UNKNOWN_PARTICIPANT
            except (OSError, websockets.WebSocketException, TimeoutError) as exc:
                code = getattr(getattr(exc, "rcvd", None), "code", None)
                self.closes.append(code)
            finally:
                self._ws, self._synced = None, False
                self._changed.set()
            if code in (CloseCode.UNKNOWN_PARTICIPANT, CloseCode.REPLACED):
                self.gave_up = "refused" if code == CloseCode.UNKNOWN_PARTICIPANT else "replaced"
                self._finished.set()
                self._changed.set()
                return
            # The backoff starts again only after a socket that got its hello, as in canopy.js:
            # a gateway that accepts sockets and closes them at once (1013 while its broker
            # connection is restored) must not be hammered by every bot at full speed.
            if self._hello_here:
                attempt = 0
            # Equal jitter, as canopy.js: bots that lost the same gateway come back spread out.
            nominal = min(self.max_delay, self.min_delay * 2**attempt)
            attempt = min(attempt + 1, 30)
            await asyncio.sleep(nominal / 2 + self.rng.random() * nominal / 2)

    async def _read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            frame = json.loads(raw)
            channel, payload = frame["channel"], frame["payload"]
            if channel == "hello":
                self.clock_offset = None  # a new connection, maybe to another gateway
            self._clock_sample(frame.get("ts"))
            self.received.append(Received(time.monotonic(), channel, payload))
            if channel == "hello":
                self.hellos.append(
                    HelloSeen(
                        self.connects,
                        int(payload["last_seq"]),
                        self._acked_high,
                        self._acked_here,
                    )
                )
                await self._on_hello(ws, payload)
            elif channel == "ack":
                seq = int(payload["seq"])
                self._acked_high = max(self._acked_high, seq)
                self._acked_here = max(self._acked_here, seq)
                self.acked.add(seq)
                self.unacked.pop(seq, None)
            elif channel == "error":
                self.errors.append(payload)
                seq = payload.get("seq")
                if isinstance(seq, int):
                    self.unacked.pop(seq, None)  # refused: resending would be refused again
                    self.open_orders.refused(seq, payload.get("code"))
            else:
                self._on_broadcast(channel, payload)
            self._changed.set()

    async def _on_hello(self, ws: ClientConnection, payload: dict[str, Any]) -> None:
        self._hello_here = True
        # The larger of what the bot knows (acks confirm every seq up to theirs) and what the
        # hello says: a hello that was overtaken must not make it resend or renumber.
        last_seq = max(self._acked_high, int(payload["last_seq"]))
        if isinstance(payload.get("participant"), str):
            self.code = payload["participant"]
        for seq in [s for s in self.unacked if s <= last_seq]:
            self.acked.add(seq)
            del self.unacked[seq]
        self._seq = max(self._seq, last_seq)
        self.id_in_group = int(payload.get("id_in_group") or 0)
        self.members = tuple(payload.get("members") or ())
        self.decisions = dict(payload.get("group_decisions") or {})
        period = payload["period"]
        if "book" in payload:
            self.book = payload["book"]
            if period["state"] in ("running", "paused"):  # else the book is empty
                self.open_orders.seen_book(self.book or {}, self.code, self.id_in_group % 2 == 1)
            else:
                self.open_orders.clear()
        self.period = int(period.get("number") or 0)
        self.running = period["state"] == "running"
        self.ends_at = period.get("ends_at") if self.running else None
        if period["state"] == "ended":
            self._period_ended(self.period)
        if self.running:
            self._started.set()
        for seq, (channel, value) in sorted(self.unacked.items()):
            await ws.send(_frame(seq, channel, value))
        self._synced = True

    def _on_broadcast(self, channel: str, payload: Any) -> None:
        if channel == "group_decisions":
            self.decisions.update(payload)
        elif channel == "book":
            self.book = payload
            self.open_orders.seen_book(payload, self.code, self.id_in_group % 2 == 1)
        elif channel == "trade":
            self.open_orders.traded(payload, self.code)
        elif channel in ("period_start", "period_resumed"):
            if channel == "period_start":
                self.open_orders.clear()
            self.period = int(payload["period"])
            self.running = True
            self.ends_at = payload.get("ends_at")
            self._started.set()
        elif channel == "period_paused":
            self.running = False
        elif channel == "subperiod":
            self.decisions.update(payload.get("group_decisions") or {})
        elif channel == "period_end":
            self.open_orders.clear()
            self.running = False
            self.decisions.update(payload.get("group_decisions") or {})
            self._period_ended(int(payload["period"]))
        elif channel == "finished":  # the seat is over, whatever num_periods the bot was given
            self.outcome = dict(payload) if isinstance(payload, dict) else {"outcome": payload}
            self._finished.set()

    def _clock_sample(self, ts: Any) -> None:
        # A frame's ts is at most "now" on the server when it arrives, so the largest offset
        # seen is the closest to the truth (canopy.js's estimate).
        if isinstance(ts, int | float):
            offset = ts - time.time()
            if self.clock_offset is None or offset > self.clock_offset:
                self.clock_offset = offset

    def near_end(self) -> bool:
        """Whether the running period ends within END_MARGIN s, by the server's clock."""
        if self.ends_at is None or self.clock_offset is None:
            return False
        return time.time() + self.clock_offset >= float(self.ends_at) - END_MARGIN

    def _period_ended(self, number: int) -> None:
        self.periods_ended = max(self.periods_ended, number)
        if self.num_periods is not None and self.periods_ended >= self.num_periods:
            self._finished.set()

    async def _play(self) -> None:
        assert self.strategy is not None
        interval = 1.0 / self.rate  # the bot's pace, not a synchronisation
        # A random phase: a fleet started at once does not send in lockstep.
        await asyncio.sleep(self.rng.random() * interval)
        while not self._finished.is_set():
            if self.running and not self.near_end():
                for channel, payload in self.strategy.act(self.view(), self.rng):
                    await self.send(channel, payload)
            await asyncio.sleep(interval)


def _frame(seq: int, channel: str, payload: Any) -> str:
    return json.dumps({"channel": channel, "payload": payload, "seq": seq})
