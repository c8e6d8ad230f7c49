"""The load generator: one session, G×P participants on real WebSockets, decisions at R Hz.

It speaks only the public contract (PROTOCOL.md): `POST /api/sessions`, the participants'
WebSocket, and the session's export. What it measures, per decision (sender s, seq k) sent at
t0: the time until every member of s's group (s included) has received a `group_decisions`
whose `payload[s] >= k` (a later decision of the same sender counts, since each decision's
payload is the sender's own seq). Also: loss (acknowledged but never seen by every member),
sends never acknowledged, `error` frames by code, values going backwards, the export's
completeness and duplicates, the store queue's depth, broadcasts/s, every stack process's
CPU and RSS, the stack's CPU per decision and (with rabbitmq_prometheus) the broker's messages
per decision.

`LoadParams.experiment` picks `decisions` (the default) or `bimatrix` (a decision is then a
probability: the seq is sent as seq / 1,000,000, see DECISION_SCALE). `LoadParams.idle` adds a
window before the warmup in which nobody sends, for the stack's idle CPU (bench/groupsize.py).

The same run works against the one-process floor (bench/floor.py): a `StackTarget` with a
`session` skips the session API and the export, and everything else is measured the same way.

Bookkeeping per received frame: each sender keeps `pending` (seq → [t0, members still
missing]) and each receiver the last value it saw per sender, so a broadcast only touches the
seqs that are new to that receiver. A receiver looks at every sender of the broadcast (and so
also sees any value going backwards) in groups of up to FULL_SCAN_MAX; in larger ones only at
the senders with decisions in flight (the group's `waiting`), so that a frame of a group of
500 costs the load generator its parse and a few look-ups, not 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import heapq
import math
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

from bench.brokerstats import broker_per_decision, scrape_broker
from bench.diskprobe import DiskProbe
from bench.procstats import ProcessSet, machine_usage, stack_cpu_per_decision, usage
from bench.report import machine_info, now_iso, repo_commit
from bench.wsclient import WsClient, parse_ws_target
from services.common.bus import STORE_QUEUE, shard_queue

PERIOD_MARGIN = 30.0  # seconds of period left after warmup + duration (drain, export)
# A group's period starts as soon as its members are connected, before the load starts: give
# the period this much more per participant to connect (1,000 take ~10 s on 2 cores).
CONNECT_ALLOWANCE = 0.03
POLL = 0.02
IDLE_QUIET = 1.0  # before an idle window: this long without any frame arriving
IDLE_SETTLE_CAP = 60.0
DRAIN_CAP = 120.0  # seconds after the last send, at most
QUEUE_SAMPLE_INTERVAL = 1.0
PROGRESS_INTERVAL = 0.5

Progress = Callable[[str, float | None, str], None]  # (phase, fraction done or None, text)


@dataclass(frozen=True)
class LoadParams:
    groups: int
    size: int
    rate: float
    duration: float
    warmup: float = 2.0
    jitter: float = 0.5
    drain: float = 5.0
    connect_concurrency: int = 100
    connect_timeout: float = 120.0
    start_timeout: float = 30.0
    export_timeout: float = 60.0
    label: str = ""
    experiment: str = "decisions"  # or "bimatrix" (see DECISION_SCALE)
    # Seconds, once everyone is connected and started and before the warmup, in which nobody
    # sends and the processes' CPU is sampled: the stack's idle cost with these connections,
    # for CPU per input net of it (`idle_processes`). 0: not measured.
    idle: float = 0.0

    @property
    def participants(self) -> int:
        return self.groups * self.size

    def check(self) -> None:
        if self.groups < 1 or self.size < 1:
            raise ValueError("--groups and --size must be at least 1")
        if not (self.rate > 0 and self.duration > 0 and self.warmup >= 0):
            raise ValueError("--rate and --duration must be > 0, --warmup >= 0")
        if not 0 <= self.jitter < 1:
            raise ValueError("--jitter must be in [0, 1)")
        if self.experiment not in DECISION_SCALE:
            raise ValueError(f"--experiment must be one of {', '.join(DECISION_SCALE)}")
        if self.idle < 0:
            raise ValueError("idle must be >= 0")


# A decision carries its own seq, so that a member's `group_decisions` says which of the
# sender's decisions it reflects: as is for `decisions` (any number), as seq / 1,000,000 for
# `bimatrix` (a probability in [0, 1]: seqs up to 1,000,000, far beyond any run's).
DECISION_SCALE = {"decisions": 1, "bimatrix": 1_000_000}


def decision_payload(seq: int, scale: int) -> bytes:
    """The JSON of decision `seq` (`scale` from DECISION_SCALE)."""
    if scale == 1:
        return b"%d" % seq
    return repr(seq / scale).encode()


def decision_seq(value: float, scale: int) -> int:
    """Which seq a decision's value in a `group_decisions` stands for (inverse of
    `decision_payload`)."""
    return int(value) if scale == 1 else round(value * scale)


@dataclass(frozen=True)
class StackTarget:
    """Where the stack under test is, and what we know about it.

    `session` given (the one-process floor, bench/floor.py): its groups are used as they are,
    no session is created and there is no export to check (`"export": {"skipped": true}`);
    `store_url` and `token` are then not needed."""

    gateway_url: str
    store_url: str | None
    token: str | None
    amqp_url: str | None = None  # for queue depths; None: not measured
    processes: ProcessSet | None = None  # for CPU / RSS; None: not measured
    shards: int = 8
    info: dict[str, Any] = field(default_factory=dict)  # queue type, store, own stack ...
    name: str = "canopy"  # "canopy" or "floor": the result's "target"
    session: dict[str, Any] | None = None  # as POST /api/sessions answers
    broker_metrics_url: str | None = None  # rabbitmq_prometheus /metrics; None: not counted
    disk_dir: Path | None = None  # where the stack keeps its data, for DiskProbe; None: not probed


@dataclass
class Stats:
    """Counters shared by every participant of one run."""

    size: int
    scale: int = 1  # DECISION_SCALE of the experiment
    measure_from: float = math.inf  # perf_counter(): sends from here on are measured
    latencies: list[float] = field(default_factory=list)
    slow: list[tuple[float, float]] = field(default_factory=list)  # (sent at, latency) > SLOW_S
    ack_latencies: list[float] = field(default_factory=list)
    send_lags: list[float] = field(default_factory=list)
    sent: int = 0
    acks: int = 0
    answered: int = 0  # sends that got their ack or an error with their seq
    repeated_acks: int = 0
    broadcasts: int = 0
    frames: int = 0
    frame_bytes: int = 0
    backwards: int = 0
    rejected: int = 0
    disconnects: int = 0
    period_ends: int = 0
    started: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    close_codes: Counter[int] = field(default_factory=Counter)
    all_started: asyncio.Event = field(default_factory=asyncio.Event)
    expected: int = 0


class Participant(WsClient):
    """One participant: its socket, what it sent, and what it has seen of each member."""

    def __init__(self, host: str, port: int, path: str, code: str, stats: Stats) -> None:
        super().__init__(host, port, path)
        self.code = code
        self.stats = stats
        self.members: dict[str, Participant] = {}  # the group, by code (self included)
        # Shared by the group's members: those with decisions not yet seen by every member.
        self.waiting: dict[str, Participant] = {}
        self.seen: dict[str, int] = {}  # sender → last value seen in a group_decisions
        self.pending: dict[int, list[float]] = {}  # seq → [t0, members still missing]
        self.sent_at: dict[int, float] = {}
        self.acked: set[int] = set()
        self.refused: set[int] = set()  # seqs answered by an error and never acknowledged
        self.next_seq = 1
        self.hello: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.started = False

    def send_decision(self) -> None:
        seq = self.next_seq
        self.next_seq = seq + 1
        t0 = time.perf_counter()
        self.pending[seq] = [t0, len(self.members)]
        self.waiting[self.code] = self
        self.sent_at[seq] = t0
        self.stats.sent += 1
        payload = decision_payload(seq, self.stats.scale)
        self.send_text(b'{"channel":"decisions","payload":%s,"seq":%d}' % (payload, seq))

    def on_message(self, raw: bytes, now: float) -> None:
        frame = orjson.loads(raw)
        stats = self.stats
        stats.frames += 1
        stats.frame_bytes += len(raw)
        channel = frame["channel"]
        payload = frame["payload"]
        if channel == "group_decisions":
            stats.broadcasts += 1
            self._group_decisions(payload, now)
        elif channel == "ack":
            seq = payload["seq"]
            if seq in self.acked:
                stats.repeated_acks += 1
                return
            self.acked.add(seq)
            stats.acks += 1
            if seq in self.refused:
                self.refused.discard(seq)
            else:
                stats.answered += 1
            t0 = self.sent_at.get(seq)
            if t0 is not None and t0 >= stats.measure_from:
                stats.ack_latencies.append(now - t0)
        elif channel == "hello":
            if not self.hello.done():
                self.hello.set_result(payload)
                self.next_seq = max(self.next_seq, int(payload.get("last_seq") or 0) + 1)
        elif channel == "period_start":
            if not self.started:
                self.started = True
                stats.started += 1
                if stats.started >= stats.expected:
                    stats.all_started.set()
        elif channel == "error":
            stats.errors[str(payload.get("code"))] += 1
            seq = payload.get("seq")
            if seq is None:
                return
            if self.pending.pop(seq, None) is not None:
                stats.rejected += 1
                if not self.pending:
                    self.waiting.pop(self.code, None)
            if seq not in self.acked and seq not in self.refused:
                self.refused.add(seq)
                stats.answered += 1
        elif channel == "period_end":
            stats.period_ends += 1

    def _group_decisions(self, payload: dict[str, Any], now: float) -> None:
        seen = self.seen
        members = self.members
        latencies = self.stats.latencies
        measure_from = self.stats.measure_from
        scale = self.stats.scale
        senders: Any = payload.items()
        if len(payload) > FULL_SCAN_MAX:
            senders = [(s, payload.get(s)) for s in list(self.waiting)]
        for sender, value in senders:
            if value is None:
                continue
            if scale != 1:
                value = decision_seq(value, scale)
            last = seen.get(sender, 0)
            if value <= last:
                if value < last:
                    self.stats.backwards += 1
                continue
            seen[sender] = value
            source = members.get(sender)
            if source is None or not source.pending:
                continue
            pending = source.pending
            for seq in range(last + 1, int(value) + 1):
                entry = pending.get(seq)
                if entry is None:
                    continue
                entry[1] -= 1
                if entry[1] <= 0:
                    del pending[seq]
                    if not pending:
                        self.waiting.pop(sender, None)
                    if entry[0] >= measure_from:
                        latency = now - entry[0]
                        latencies.append(latency)
                        if latency > SLOW_S:
                            self.stats.slow.append((entry[0], latency))

    def on_closed(self, expected: bool) -> None:
        if not expected:
            self.stats.disconnects += 1
        if self.close_code is not None:
            self.stats.close_codes[self.close_code] += 1
        if not self.hello.done():
            self.hello.set_exception(ConnectionError(f"closed before hello ({self.close_code})"))


# -- helpers ------------------------------------------------------------------------------------


FULL_SCAN_MAX = 64  # groups up to this size: every sender of a broadcast is checked
SLOW_S = 0.05  # decisions slower than this are grouped into stalls (disk syncs: counted)
STALL_GAP_S = 0.25  # slow decisions sent closer together than this belong to one stall


def stalls(
    slow: list[tuple[float, float]], measure_from: float, disk: DiskProbe | None = None
) -> list[dict[str, Any]]:
    """Slow decisions grouped by when they were sent: a handful of long stalls (one process or
    the disk stopped for a moment) reads differently from a stack that is slow throughout.
    With a `disk` probe, each stall says whether a slow disk sync was under way during it."""
    groups: list[list[tuple[float, float]]] = []
    for sent_at, latency in sorted(slow):
        if groups and sent_at - groups[-1][-1][0] <= STALL_GAP_S:
            groups[-1].append((sent_at, latency))
        else:
            groups.append([(sent_at, latency)])
    found: list[dict[str, Any]] = []
    for group in groups:
        stall: dict[str, Any] = {
            "at_s": round(group[0][0] - measure_from, 2),
            "decisions": len(group),
            "worst_ms": round(1000 * max(latency for _, latency in group), 1),
        }
        if disk is not None:
            end = max(sent_at + latency for sent_at, latency in group)
            stall["slow_disk"] = disk.slow_between(group[0][0], end, SLOW_S)
        found.append(stall)
    return found


def disk_summary(durations: list[float]) -> dict[str, Any]:
    """The disk probe's syncs of a window: percentiles in ms, and how many were slow."""
    return percentiles(durations) | {"slow": sum(d > SLOW_S for d in durations)}


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | int | None]:
    """count, p50, p90, p99, p99.9, max, mean (nearest rank), times `scale` (s → ms)."""
    if not values:
        return dict.fromkeys(("p50", "p90", "p99", "p99.9", "max", "mean"), None) | {"count": 0}
    ordered = sorted(values)
    n = len(ordered)

    def rank(q: float) -> float:
        return round(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))] * scale, 3)

    return {
        "count": n,
        "p50": rank(0.50),
        "p90": rank(0.90),
        "p99": rank(0.99),
        "p99.9": rank(0.999),
        "max": round(ordered[-1] * scale, 3),
        "mean": round(sum(ordered) / n * scale, 3),
    }


def recent_p99_ms(values: list[float], window: int = 2000) -> float | None:
    tail = sorted(values[-window:])
    return tail[min(len(tail) - 1, math.ceil(0.99 * len(tail)) - 1)] * 1000 if tail else None


class QueueProbe:
    """Depths of the store queue and the decisions shard queues (passive declares)."""

    def __init__(self, amqp_url: str, shards: int) -> None:
        self._url = amqp_url
        self._shards = shards
        self._connection: Any = None
        self._channel: Any = None
        self.max_store = 0
        self.max_shards = 0

    async def __aenter__(self) -> QueueProbe:
        import aio_pika  # only when measured: a run against a remote stack does without

        self._connection = await aio_pika.connect(self._url, timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _depth(self, name: str) -> int | None:
        from aio_pika.exceptions import AMQPError

        try:
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(publisher_confirms=False)
            queue = await self._channel.declare_queue(name, passive=True)
        except (AMQPError, ConnectionError, TimeoutError):  # not declared, or broker closing
            return None
        count: int = queue.declaration_result.message_count or 0
        return count

    async def depths(self) -> tuple[int | None, int | None]:
        store = await self._depth(STORE_QUEUE)
        shard_counts = [await self._depth(shard_queue(i)) for i in range(self._shards)]
        shards = (
            sum(c for c in shard_counts if c is not None)
            if any(c is not None for c in shard_counts)
            else None
        )
        self.max_store = max(self.max_store, store or 0)
        self.max_shards = max(self.max_shards, shards or 0)
        return store, shards

    async def watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.depths()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), QUEUE_SAMPLE_INTERVAL)


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def period_length(params: LoadParams) -> float:
    """The session's period: long enough for connecting, the load, the drain and the export."""
    return round(
        params.idle
        + params.warmup
        + params.duration
        + PERIOD_MARGIN
        + CONNECT_ALLOWANCE * params.participants,
        1,
    )


async def create_session(api: httpx.AsyncClient, params: LoadParams) -> dict[str, Any]:
    body: dict[str, Any] = {
        "experiment": params.experiment,
        "num_participants": params.participants,
        "group_size": params.size,
        "period_length": period_length(params),
        "num_periods": 1,
        "num_subperiods": 0,
        "rate_limit": 0,
        "label": params.label
        or f"bench {params.experiment} {params.groups}x{params.size} @ {params.rate:g} Hz",
    }
    if params.experiment == "bimatrix":
        body["params"] = {"initial_decision": 0}  # seq 0: nothing sent yet (DECISION_SCALE)
    response = await api.post("/api/sessions", json=body)
    if response.status_code != 201:
        raise RuntimeError(f"POST /api/sessions: {response.status_code} {response.text[:500]}")
    session: dict[str, Any] = response.json()
    return session


async def check_export(
    api: httpx.AsyncClient,
    session: str,
    expected: set[tuple[str, int]],
    timeout: float,
) -> dict[str, Any]:
    """Poll the export (bounded) until every acknowledged frame is an `in` row."""
    started = time.monotonic()
    while True:
        seen: Counter[tuple[str, int]] = Counter()
        out_rows: Counter[str] = Counter()
        async with api.stream(
            "GET", f"/api/sessions/{session}/events", params={"format": "jsonl"}
        ) as response:
            if response.status_code != 200:
                raise RuntimeError(f"export: HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line:
                    continue
                row = orjson.loads(line)
                if row["direction"] == "in":
                    seen[(row["participant"], row["seq"])] += 1
                else:
                    out_rows[row["channel"]] += 1
        missing = len(expected - seen.keys())
        waited = time.monotonic() - started
        if missing == 0 or waited > timeout:
            return {
                "complete": missing == 0,
                "wait_s": round(waited, 2),
                "in_rows": sum(seen.values()),
                "missing": missing,
                "extra": len(seen.keys() - expected),
                "duplicates": sum(n - 1 for n in seen.values() if n > 1),
                "out_rows": dict(out_rows),
            }
        await asyncio.sleep(0.5)


# -- the run ------------------------------------------------------------------------------------


async def run_load(
    target: StackTarget, params: LoadParams, progress: Progress | None = None
) -> dict[str, Any]:
    """Run one load and return its result (the JSON line's content)."""
    params.check()
    say: Progress = progress or (lambda phase, fraction, text: None)
    loop = asyncio.get_running_loop()
    host, port, prefix = parse_ws_target(target.gateway_url)
    stats = Stats(
        size=params.size, scale=DECISION_SCALE[params.experiment], expected=params.participants
    )
    procs = target.processes
    disk: DiskProbe | None = None
    async with contextlib.AsyncExitStack() as scope:
        api: httpx.AsyncClient | None = None
        if target.session is not None:
            session = target.session
        else:
            if not (target.store_url and target.token):
                raise ValueError("a target without a session needs store_url and token")
            api = await scope.enter_async_context(
                httpx.AsyncClient(
                    base_url=target.store_url,
                    headers={"Authorization": f"Bearer {target.token}"},
                    timeout=30,
                )
            )
            say("session", None, "creating the session")
            session = await create_session(api, params)
        participants: list[Participant] = []
        # Sockets open with each seat's key (PROTOCOL v2); the floor has no seats: its codes.
        keys = {p["code"]: p.get("key") or p["code"] for p in session["participants"]}
        for group in session["groups"]:
            members = {
                code: Participant(host, port, f"{prefix}/ws/{keys[code]}", code, stats)
                for code in group["participants"]
            }
            waiting: dict[str, Participant] = {}
            for member in members.values():
                member.members = members
                member.waiting = waiting
            participants.extend(members.values())

        gateway_rss_before = procs.rss("gateway") if procs else None
        t_connect = time.perf_counter()
        try:
            await _connect_all(loop, host, port, participants, params, say)
            say("start", None, "waiting for period_start")
            async with asyncio.timeout(params.start_timeout):
                await stats.all_started.wait()
            connect_s = time.perf_counter() - t_connect
            gateway_rss_after = procs.rss("gateway") if procs else None
            idle = await _idle(procs, params, stats, say)
            if target.disk_dir is not None:
                disk = scope.enter_context(DiskProbe(target.disk_dir))
            # The load generator's own full collections would stop every participant at once
            # and read as the stack's stall: what exists now is left out of them.
            gc.collect()
            gc.freeze()
            window = await _load(target, params, participants, stats, say)
            drain_s = await _drain(participants, stats, params, say)
        finally:
            gc.unfreeze()  # a matrix runs every row in this process
            await _close_all(participants)

        lost = sum(1 for p in participants for seq in p.pending if seq in p.acked)
        unseen_unacked = sum(len(p.pending) for p in participants) - lost
        unacked = sum(p.next_seq - 1 - len(p.acked) - len(p.refused) for p in participants)
        expected = {(p.code, seq) for p in participants for seq in p.acked}
        export: dict[str, Any] = {"skipped": True}  # the floor keeps no log
        if api is not None:
            say("export", None, f"checking the export ({len(expected)} acknowledged frames)")
            export = await check_export(api, session["session"], expected, params.export_timeout)

    queue_final: dict[str, int | None] = {}
    if target.amqp_url:
        async with QueueProbe(target.amqp_url, target.shards) as probe:
            store_depth, shard_depth = await probe.depths()
        queue_final = {"store_final": store_depth, "shards_final": shard_depth}

    processes = usage(window["sample_start"], window["sample_end"]) if procs else {}
    mem_per_participant = None
    if gateway_rss_before is not None and gateway_rss_after is not None:
        mem_per_participant = round(
            (gateway_rss_after - gateway_rss_before) / params.participants / 1024, 1
        )
    seconds = window["seconds"]
    errors = dict(stats.errors)
    cpu_stack = stack_cpu_per_decision(processes, window["sent"])
    result: dict[str, Any] = {
        "kind": "run" if target.name == "canopy" else target.name,
        "target": target.name,
        "timestamp": now_iso(),
        "commit": repo_commit(),
        "machine": machine_info(),
        "params": asdict(params) | {"participants": params.participants},
        "stack": target.info,
        "session": session["session"],
        "latency_ms": percentiles(stats.latencies),
        "ack_ms": percentiles(stats.ack_latencies),
        "stalls": stalls(stats.slow, stats.measure_from, disk),
        # fdatasync of 4 KiB every 100 ms where the stack keeps its data (bench/diskprobe.py);
        # `slow`: syncs over 50 ms. null: not probed (a stack that is not ours).
        "disk_sync_ms": None
        if disk is None
        else disk_summary(disk.durations(stats.measure_from, window["measure_until"])),
        "send_lag_ms": percentiles(stats.send_lags),
        "sent": stats.sent,
        "sent_measured": window["sent"],
        "acked": stats.acks,
        "unacked": unacked,
        "lost": lost,
        "unseen_unacked": unseen_unacked,
        "rejected": stats.rejected,
        "errors": errors,
        "backwards": stats.backwards,
        "duplicates": stats.backwards + export.get("duplicates", 0),
        "disconnects": stats.disconnects,
        "close_codes": {str(k): v for k, v in stats.close_codes.items()},
        "period_ends_during_run": window["period_ends"],
        "window_s": round(seconds, 3),
        "sends_per_s": round(window["sent"] / seconds, 1),
        "broadcasts_per_s": round(window["broadcasts"] / seconds, 1),
        "frames_per_s": round(window["frames"] / seconds, 1),
        "frames_measured": window["frames"],
        "frame_bytes_measured": window["frame_bytes"],
        "connect_s": round(connect_s, 2),
        "drain_s": round(drain_s, 2),
        "export": export,
        "store_queue": {
            "max": window.get("store_queue_max"),
            "at_end": window.get("store_queue_end"),
            "shards_max": window.get("shards_queue_max"),
            **queue_final,
        },
        "processes": processes,
        # The same processes while everyone was connected and nobody sent (LoadParams.idle).
        "idle_processes": idle,
        "machine_cpu": machine_usage(window["sample_start"], window["sample_end"], processes)
        if procs
        else {},
        "gateway_rss_mib": {
            "before": None if gateway_rss_before is None else round(gateway_rss_before / 2**20, 1),
            "connected": None if gateway_rss_after is None else round(gateway_rss_after / 2**20, 1),
        },
        "mem_per_participant_kib": mem_per_participant,
        # Stack CPU (every measured process but the load generator) over the measured window
        # per decision sent in it; `cpu_roles` says which processes that sum holds.
        "cpu_ms_per_decision": cpu_stack[0],
        "cpu_roles": cpu_stack[1],
        "broker": broker_per_decision(
            window.get("broker_start"), window.get("broker_end"), window["sent"]
        ),
    }
    exported = bool(export.get("skipped")) or (export["complete"] and export["duplicates"] == 0)
    result["ok"] = (
        lost == 0
        and unacked == 0
        and not errors
        and stats.disconnects == 0
        and stats.backwards == 0
        and exported
    )
    return result


async def _idle(
    procs: ProcessSet | None, params: LoadParams, stats: Stats, say: Progress
) -> dict[str, Any]:
    """`params.idle` seconds in which nobody sends: each process's CPU then (`usage`'s shape,
    plus `seconds`), once no frame arrived for IDLE_QUIET s (the connections' `presence`
    broadcasts: N² frames for a group of N; bounded by IDLE_SETTLE_CAP). Empty when not
    measured."""
    if not (procs and params.idle > 0):
        return {}
    say("settle", None, "waiting for the connections' broadcasts to end")
    started = time.perf_counter()
    last, quiet_since = stats.frames, started
    while (now := time.perf_counter()) - quiet_since < IDLE_QUIET:
        if now - started > IDLE_SETTLE_CAP:
            break
        await asyncio.sleep(POLL)
        if stats.frames != last:
            last, quiet_since = stats.frames, time.perf_counter()
    settled = time.perf_counter()
    say("idle", None, f"{params.idle:g} s without sends (the idle stack's CPU)")
    start = procs.sample()
    await asyncio.sleep(params.idle)  # a measuring window, not a wait for anything
    end = procs.sample()
    return {
        "settle_s": round(settled - started, 2),
        "seconds": round(end.at - start.at, 3),
        "roles": usage(start, end),
    }


async def _connect_all(
    loop: asyncio.AbstractEventLoop,
    host: str,
    port: int,
    participants: list[Participant],
    params: LoadParams,
    say: Progress,
) -> None:
    """Open every socket (at most `connect_concurrency` handshakes at a time) and wait for
    each one's `hello`."""
    limit = asyncio.Semaphore(params.connect_concurrency)
    done = 0
    total = len(participants)

    async def connect(participant: Participant) -> None:
        nonlocal done
        async with limit:
            await loop.create_connection(lambda: participant, host, port)
            await participant.opened
            await participant.hello
        done += 1
        if done % 50 == 0 or done == total:
            say("connect", done / total, f"connected {done}/{total}")

    async with asyncio.timeout(params.connect_timeout):
        await asyncio.gather(*(connect(p) for p in participants))


async def _load(
    target: StackTarget,
    params: LoadParams,
    participants: list[Participant],
    stats: Stats,
    say: Progress,
) -> dict[str, Any]:
    """Send decisions on absolute schedules; sample processes and counters at the window's
    start and end. Returns the window's numbers."""
    procs = target.processes
    interval = 1.0 / params.rate
    low, high = interval * (1 - params.jitter), interval * (1 + params.jitter)
    start = time.perf_counter() + 0.05
    measure_from = start + params.warmup
    until = measure_from + params.duration
    stats.measure_from = measure_from
    total = params.warmup + params.duration
    window: dict[str, Any] = {"measure_until": until}
    stop_probe = asyncio.Event()

    async def sampler() -> None:
        await _sleep_until(measure_from)
        window["sample_start"] = procs.sample() if procs else None
        counters = (
            stats.sent,
            stats.broadcasts,
            stats.frames,
            stats.frame_bytes,
            stats.period_ends,
        )
        t0 = time.perf_counter()
        # The broker's counters right after the /proc sample (one HTTP scrape each end, a few
        # ms: small next to the window, and the same for every row).
        window["broker_start"] = await scrape_broker(target.broker_metrics_url)
        await _sleep_until(until)
        window["sample_end"] = procs.sample() if procs else None
        window["seconds"] = time.perf_counter() - t0
        now = (stats.sent, stats.broadcasts, stats.frames, stats.frame_bytes, stats.period_ends)
        keys = ("sent", "broadcasts", "frames", "frame_bytes", "period_ends")
        window.update({k: b - a for k, a, b in zip(keys, counters, now, strict=True)})
        window["broker_end"] = await scrape_broker(target.broker_metrics_url)

    async def reporter() -> None:
        while time.perf_counter() < until:
            elapsed = max(0.0, time.perf_counter() - start)
            p99 = recent_p99_ms(stats.latencies)
            phase = "warmup" if elapsed < params.warmup else "load"
            text = (
                f"{elapsed:5.1f}/{total:.1f} s  sent {stats.sent}  "
                f"p99 {'-' if p99 is None else f'{p99:.1f} ms'}  "
                f"unanswered {stats.sent - stats.answered}"
            )
            say(phase, min(1.0, elapsed / total), text)
            await asyncio.sleep(PROGRESS_INTERVAL)

    async def probe_queues() -> None:
        if not target.amqp_url:
            return
        async with QueueProbe(target.amqp_url, target.shards) as probe:
            await probe.watch(stop_probe)
            store_depth, _ = await probe.depths()
            window["store_queue_end"] = store_depth
            window["store_queue_max"] = probe.max_store
            window["shards_queue_max"] = probe.max_shards

    helpers = [
        asyncio.create_task(sampler()),
        asyncio.create_task(reporter()),
        asyncio.create_task(probe_queues()),
    ]
    try:
        # At rates below 1 / (warmup + duration) a participant's first send may fall after the
        # window: it is left out, as every later send is.
        firsts = ((start + random.uniform(0, interval), i) for i in range(len(participants)))
        schedule = [(due, i) for due, i in firsts if due < until]
        heapq.heapify(schedule)
        lags = stats.send_lags
        while schedule:
            due, index = schedule[0]
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
                continue
            heapq.heappop(schedule)
            participant = participants[index]
            if participant.closing or participant.closed.done():
                continue
            participant.send_decision()
            if due >= measure_from:
                lags.append(now - due)
            following = due + random.uniform(low, high)
            if following < until:
                heapq.heappush(schedule, (following, index))
        await helpers[0]
        stop_probe.set()
        await asyncio.gather(*helpers[1:])
    finally:
        for task in helpers:
            task.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
    return window


async def _drain(
    participants: list[Participant], stats: Stats, params: LoadParams, say: Progress
) -> float:
    """After the last send, wait until every decision sent was acknowledged and seen by every
    member; give up after `drain` s without any progress (a late broadcast still counts, so a
    slow stack shows up in the latency, not as loss), and after DRAIN_CAP s in any case.
    Returns how long it waited."""
    started = time.perf_counter()
    cap = started + max(params.drain, DRAIN_CAP)

    def progress() -> tuple[int, int, int]:
        return stats.answered, len(stats.latencies), stats.rejected

    last, last_change = progress(), started
    while (now := time.perf_counter()) < cap and now - last_change < params.drain:
        outstanding = sum(len(p.pending) for p in participants)
        unanswered = stats.sent - stats.answered
        if not outstanding and unanswered <= 0:
            break
        say("drain", None, f"{outstanding} decisions not seen by all, {unanswered} unanswered")
        await asyncio.sleep(POLL)
        if (current := progress()) != last:
            last, last_change = current, time.perf_counter()
    return time.perf_counter() - started


async def _close_all(participants: list[Participant], timeout: float = 10.0) -> None:
    for participant in participants:
        if not participant.closed.done():
            participant.close()
    pending = [p.closed for p in participants if not p.closed.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)
    for participant in participants:
        if not participant.closed.done():
            participant.abort()
    for participant in participants:  # a connection that never opened has no future waiter
        if participant.hello.done() and not participant.hello.cancelled():
            participant.hello.exception()
