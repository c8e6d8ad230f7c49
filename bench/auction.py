"""The auction row of `python -m bench --auction`: one double-auction group of `traders`, each
placing `rate` orders per second with at most `max_open` resting (the oldest cancelled first),
for `duration` seconds; p99 latency and decisions' CPU per input, first half against second
half, which must be flat: the book is bounded (PROTOCOL v2 `max_open_orders`, `book_depth`), so
an input late in the period costs what one early on did.

Latency of an order: from its send until its sender sees its effect, whichever comes first:
a `trade` naming its seq, a `book` listing it, or an `error` answering it. `book_depth`
defaults to 100 here so that every resting order (8 traders × 20 = 160, at most 80 a side) is
listed and every order's effect is seen; with a smaller depth the orders resting beyond it are
left out of the latencies (counted in `unseen`). CPU: the decisions process's CPU seconds in a
half over the inputs (orders and cancels) sent in it; `stack` adds every other stack process.

Traders are zero-intelligence: buyers bid uniformly in [1, 55], sellers ask in [45, 100], on a
cent grid, one unit; the overlap makes some orders trade and most rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import orjson
import websockets

from bench.loadgen import StackTarget, percentiles
from bench.procstats import Sample, machine_usage, usage
from bench.report import machine_info, now_iso, repo_commit

PERIOD_MARGIN = 30.0  # seconds of period after the load (connect, drain)
DRAIN = 5.0  # seconds after the last send for the last answers


@dataclass(frozen=True)
class AuctionParams:
    traders: int = 8
    rate: float = 10.0  # orders per second each
    duration: float = 60.0
    max_open: int = 20
    book_depth: int = 100


@dataclass
class Trader:
    code: str
    url: str
    buyer: bool
    max_open: int
    ws: Any = None
    seq: int = 0
    open: list[int] = field(default_factory=list)  # resting order seqs, oldest first
    sent_at: dict[int, float] = field(default_factory=dict)  # order seq → perf_counter
    latencies: list[tuple[float, float]] = field(default_factory=list)  # (sent at, seconds)
    inputs: list[float] = field(default_factory=list)  # when each input left
    errors: Counter[str] = field(default_factory=Counter)  # error code → count
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # every order's effect seen

    async def send(self, channel: str, payload: Any) -> int:
        self.seq += 1
        frame = {"channel": channel, "payload": payload, "seq": self.seq}
        self.inputs.append(time.perf_counter())
        await self.ws.send(orjson.dumps(frame).decode())
        return self.seq

    def seen(self, seq: int, now: float) -> None:
        sent = self.sent_at.pop(seq, None)
        if sent is not None:
            self.latencies.append((sent, now - sent))
        if not self.sent_at:
            self.answered.set()

    async def read(self) -> None:
        async for raw in self.ws:
            now = time.perf_counter()
            frame = orjson.loads(raw)
            channel, payload = frame["channel"], frame["payload"]
            if channel == "error":
                self.errors[str(payload.get("code"))] += 1
                seq = payload.get("seq")
                if isinstance(seq, int):
                    self.seen(seq, now)
                    if seq in self.open:
                        self.open.remove(seq)
            elif channel == "trade":
                mine = payload["bid_seq"] if self.buyer else payload["ask_seq"]
                if payload["buyer" if self.buyer else "seller"] == self.code:
                    self.seen(mine, now)
            elif channel == "book":
                side = payload["bids" if self.buyer else "asks"]
                listed = {e["seq"] for e in side if e["participant"] == self.code}
                for seq in [s for s in self.sent_at if s in listed]:
                    self.seen(seq, now)
                total = payload["bids_total" if self.buyer else "asks_total"]
                if len(side) >= total:  # the whole side is listed: these rest, and those
                    # not applied yet (their effect not seen) may
                    self.open = [s for s in self.open if s in listed or s in self.sent_at]

    async def place(self, rng: random.Random) -> None:
        if len(self.open) >= self.max_open:
            await self.send("cancel", {"seq": self.open.pop(0)})
        low, high = (100, 5500) if self.buyer else (4500, 10000)
        price = rng.randint(low, high) / 100
        side = "bid" if self.buyer else "ask"
        seq = await self.send("orders", {"side": side, "price": price, "quantity": 1})
        self.sent_at[seq] = time.perf_counter()
        self.answered.clear()
        self.open.append(seq)


async def run_auction(target: StackTarget, params: AuctionParams) -> dict[str, Any]:
    """One auction session on `target`; the row's result (the JSON line's content)."""
    if not (target.store_url and target.token):
        raise ValueError("the auction row needs the store's URL and token")
    async with httpx.AsyncClient(
        base_url=target.store_url,
        headers={"Authorization": f"Bearer {target.token}"},
        timeout=30,
    ) as api:
        response = await api.post(
            "/api/sessions",
            json={
                "experiment": "double_auction",
                "num_participants": params.traders,
                "group_size": params.traders,
                "period_length": params.duration + PERIOD_MARGIN,
                "num_periods": 1,
                "params": {"max_open_orders": params.max_open, "book_depth": params.book_depth},
                "label": f"bench auction {params.traders} traders @ {params.rate:g} Hz",
            },
        )
        if response.status_code != 201:
            raise RuntimeError(f"POST /api/sessions: {response.status_code} {response.text}")
        session = response.json()
    base = target.gateway_url.replace("http", "ws", 1)
    traders = [
        Trader(
            p["code"],
            f"{base}/ws/{p.get('key') or p['code']}",
            p["id_in_group"] % 2 == 1,
            params.max_open,
        )
        for p in session["participants"]
    ]
    readers: list[asyncio.Task[None]] = []
    try:
        for trader in traders:
            trader.ws = await websockets.connect(trader.url, max_size=None, max_queue=None)
        for trader in traders:  # hello, then period_start once all are in
            async with asyncio.timeout(30):
                while orjson.loads(await trader.ws.recv())["channel"] != "period_start":
                    pass
        readers = [asyncio.create_task(t.read()) for t in traders]
        samples: list[Sample | None] = []
        procs = target.processes
        start = time.perf_counter()
        half = params.duration / 2
        marks = [start, start + half, start + params.duration]

        async def sampler() -> None:
            for mark in marks:
                await asyncio.sleep(max(0.0, mark - time.perf_counter()))
                samples.append(procs.sample() if procs else None)

        sampling = asyncio.create_task(sampler())
        rng = random.Random(7)
        schedule = sorted((start + rng.uniform(0, 1 / params.rate), i) for i in range(len(traders)))
        while schedule:
            due, index = schedule.pop(0)
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await traders[index].place(rng)
            following = due + rng.uniform(0.5, 1.5) / params.rate
            if following < marks[-1]:
                schedule.append((following, index))
                schedule.sort()
        await sampling
        waits = [asyncio.create_task(t.answered.wait()) for t in traders]
        await asyncio.wait(waits, timeout=DRAIN)
        for wait in waits:
            wait.cancel()
    finally:
        for task in readers:
            task.cancel()
        for trader in traders:
            if trader.ws is not None:
                with contextlib.suppress(Exception):
                    await trader.ws.close()
    halves: list[dict[str, Any]] = []
    for number in (0, 1):
        begin, end = marks[number], marks[number + 1]
        latencies = [s for t in traders for at, s in t.latencies if begin <= at < end]
        inputs = sum(1 for t in traders for at in t.inputs if begin <= at < end)
        first, last = samples[number], samples[number + 1]
        cpu = usage(first, last) if first is not None and last is not None else {}
        decisions = cpu.get("decisions", {}).get("cpu_s")
        stack = sum(v["cpu_s"] for role, v in cpu.items() if role != "loadgen")
        halves.append(
            {
                "seconds": round(end - begin, 1),
                "inputs": inputs,
                "orders_per_s": round(inputs / (end - begin), 1),
                "latency_ms": percentiles(latencies),
                "decisions_cpu_ms_per_input": None
                if decisions is None or not inputs
                else round(decisions / inputs * 1000, 3),
                "stack_cpu_ms_per_input": round(stack / inputs * 1000, 3) if inputs else None,
                # The whole machine meanwhile, and its part not spent by the stack or the load
                # generator (other work on a shared machine), in % of one core.
                "machine_cpu": machine_usage(first, last, cpu)
                if first is not None and last is not None
                else {},
            }
        )
    return {
        "kind": "auction",
        "timestamp": now_iso(),
        "commit": repo_commit(),
        "machine": machine_info(),
        "params": asdict(params),
        "stack": target.info,
        "session": session["session"],
        "halves": halves,
        "errors": dict(sum((t.errors for t in traders), Counter())),
        "unseen": sum(len(t.sent_at) for t in traders),
        "ok": all(h["latency_ms"]["count"] for h in halves),
    }


def format_auction(result: dict[str, Any]) -> str:
    p = result["params"]
    lines = [
        f"auction: {p['traders']} traders x {p['rate']:g} orders/s, up to {p['max_open']} "
        f"resting each, book_depth {p['book_depth']}, {p['duration']:g} s",
        f"{'half':<8}{'inputs/s':>10}{'p50 ms':>9}{'p99 ms':>9}"
        f"{'decisions ms CPU/input':>24}{'stack ms CPU/input':>20}{'other CPU %':>13}",
    ]
    for name, half in zip(("first", "second"), result["halves"], strict=True):
        lat = half["latency_ms"]
        lines.append(
            f"{name:<8}{half['orders_per_s']:>10}{_ms(lat['p50']):>9}{_ms(lat['p99']):>9}"
            f"{_ms(half['decisions_cpu_ms_per_input']):>24}"
            f"{_ms(half['stack_cpu_ms_per_input']):>20}"
            f"{_ms((half.get('machine_cpu') or {}).get('other_pct')):>13}"
        )
    lines.append(
        f"errors {result['errors'] or 'none'}; orders never seen applied {result['unseen']}"
    )
    return "\n".join(lines)


def _ms(value: Any) -> str:
    return "-" if value is None else f"{value:.2f}"
