"""A test client that speaks exactly PROTOCOL.md: nothing Canopy-internal is imported here.

Seats (PROTOCOL v2): a participant's socket opens with its secret key, while every payload
names members by their public code. Tests think in codes; this client keeps the key of every
participant it saw in an API answer (`create_session`, `remember`) and opens `/ws/<key>` for a
code it knows. Anything else is sent as it is (a made-up key, or a code used as a key on
purpose: both are refused with 4403)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

TIMEOUT = 10.0

Frame = dict[str, Any]


@dataclass
class Participant:
    """One participant's socket, with every frame it received kept in order."""

    code: str
    ws: ClientConnection
    received: list[Frame] = field(default_factory=list)
    _cursor: int = 0
    _next_seq: int = 1

    @classmethod
    async def connect(cls, gateway_url: str, code: str) -> Participant:
        """The socket of participant `code` (opened with its key; see the module docstring)."""
        ws = await websockets.connect(ws_url(gateway_url, code), max_size=None, max_queue=None)
        return cls(code, ws)

    async def send(
        self, payload: Any, *, seq: int | None = None, channel: str = "decisions"
    ) -> int:
        if seq is None:
            seq = self._next_seq
        self._next_seq = max(self._next_seq, seq + 1)
        await self.ws.send(json.dumps({"channel": channel, "payload": payload, "seq": seq}))
        return seq

    async def next(self, timeout: float = TIMEOUT) -> Frame:
        if self._cursor < len(self.received):
            frame = self.received[self._cursor]
        else:
            raw = await asyncio.wait_for(self.ws.recv(), timeout)
            frame = json.loads(raw)
            assert set(frame) == {"channel", "payload", "ts"}, frame
            self.received.append(frame)
        self._cursor += 1
        return frame

    async def expect(
        self,
        channel: str,
        # `...`: callers bind loop variables as lambda defaults (`lambda d, v=value: ...`),
        # which mypy cannot match against a one-argument callable.
        where: Callable[..., bool] = lambda _: True,
        timeout: float = TIMEOUT,
    ) -> Any:
        """Read until a frame on `channel` whose payload satisfies `where`; return its payload.

        Frames skipped on the way stay in `received` for later assertions."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.next()
                if frame["channel"] == channel and where(frame["payload"]):
                    return frame["payload"]

    async def ack(self, seq: int) -> None:
        await self.expect("ack", lambda p: p["seq"] == seq)

    async def reply(self, seq: int) -> Frame:
        """The `ack` or `error` that answers frame `seq`."""
        async with asyncio.timeout(TIMEOUT):
            while True:
                frame = await self.next()
                if frame["channel"] in ("ack", "error") and frame["payload"]["seq"] == seq:
                    return frame

    async def error(self, seq: int | None = None) -> dict[str, Any]:
        payload: dict[str, Any] = await self.expect(
            "error", lambda p: seq is None or p["seq"] == seq
        )
        return payload

    def seen(self, channel: str) -> list[Any]:
        """Payloads of the frames on `channel` received so far, in order."""
        return [f["payload"] for f in self.received if f["channel"] == channel]

    def channels(self) -> list[str]:
        return [f["channel"] for f in self.received]

    async def close(self) -> None:
        await self.ws.close()


# code → seat key of every participant in an API answer this test session saw.
KEYS: dict[str, str] = {}


def remember(answer: dict[str, Any]) -> dict[str, Any]:
    """Note the seat keys of a `POST /api/sessions` or `GET /api/sessions/{id}` answer."""
    for participant in answer.get("participants", []):
        if participant.get("key"):
            KEYS[participant["code"]] = participant["key"]
    return answer


_SESSION_ANSWER = re.compile(r"/api/sessions(/[^/]+)?")


async def remember_keys(response: httpx.Response) -> None:
    """An httpx response hook: remember the keys of every session answer a client gets."""
    if response.is_success and _SESSION_ANSWER.fullmatch(response.request.url.path):
        await response.aread()
        body = response.json()
        if isinstance(body, dict):
            remember(body)
            for session in body.get("sessions", []):
                remember(session)


RESEARCHER_HOOKS = {"response": [remember_keys]}


def key_of(code: str) -> str:
    """The seat key of participant `code` (as it is when no answer named it)."""
    return KEYS.get(code, code)


def ws_url(gateway_url: str, code: str) -> str:
    """The socket of participant `code`: `/ws/<its key>` (see the module docstring)."""
    base = gateway_url.replace("http://", "ws://").replace("https://", "wss://")
    return base + f"/ws/{key_of(code)}"


def raw_ws_url(gateway_url: str, key: str) -> str:
    """`/ws/<key>` exactly as given (no code → key mapping)."""
    return gateway_url.replace("http://", "ws://").replace("https://", "wss://") + f"/ws/{key}"


def session_body(**overrides: Any) -> dict[str, Any]:
    """A `POST /api/sessions` body: one group of 2 playing `decisions` for 30 s, overridden."""
    body: dict[str, Any] = {
        "experiment": "decisions",
        "num_participants": 2,
        "group_size": 2,
        "num_periods": 1,
        "period_length": 30,
        "num_subperiods": 0,
        "rate_limit": 0.0,
        "params": {},
        "label": "e2e",
    }
    return body | overrides


async def create_session(api: httpx.AsyncClient, **overrides: Any) -> dict[str, Any]:
    response = await api.post("/api/sessions", json=session_body(**overrides))
    assert response.status_code == 201, response.text
    session: dict[str, Any] = response.json()
    return remember(session)


async def connect_group(gateway_url: str, codes: list[str]) -> list[Participant]:
    """Connect every member and wait until each has seen its hello and period_start."""
    members = [await Participant.connect(gateway_url, code) for code in codes]
    for member in members:
        await member.expect("hello")
    for member in members:
        await member.expect("period_start")
    return members


async def export_csv(api: httpx.AsyncClient, session: str) -> list[dict[str, str]]:
    response = await api.get(f"/api/sessions/{session}/events", params={"format": "csv"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    reader = csv.DictReader(io.StringIO(response.text))
    assert reader.fieldnames == [
        "ts",
        "session",
        "group",
        "participant",
        "direction",
        "channel",
        "seq",
        "value",
    ]
    return list(reader)


async def export_until(
    api: httpx.AsyncClient, session: str, done: Callable[[list[dict[str, str]]], bool]
) -> list[dict[str, str]]:
    """The store writes in batches: poll the export (bounded) until `done` holds."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            rows = await export_csv(api, session)
            if done(rows):
                return rows
            await asyncio.sleep(0.05)


def inbound(rows: list[dict[str, str]], participant: str | None = None) -> list[dict[str, str]]:
    return [
        r
        for r in rows
        if r["direction"] == "in" and (participant is None or r["participant"] == participant)
    ]


async def replay_until(
    api: httpx.AsyncClient, session: str, done: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    """`GET /api/sessions/{session}/replay`, polled (bounded) until `done` holds; by default
    until the first group has an ended period (the store writes the log in batches)."""
    done = done or (lambda replay: bool(replay["groups"][0]["periods"]))
    async with asyncio.timeout(TIMEOUT):
        while True:
            response = await api.get(f"/api/sessions/{session}/replay")
            assert response.status_code == 200, response.text
            replay: dict[str, Any] = response.json()
            if done(replay):
                return replay
            await asyncio.sleep(0.05)
