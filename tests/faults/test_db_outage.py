"""MongoDB away for a long stretch under load (issue 23, "Long outages").

100 participants (50 groups of 2) send 2 decisions/s each; 10 s into the period nx-27017 is
stopped (SIGSTOP: its sockets stay open and nothing answers, as a hung or partitioned database;
the supervisor does not restart a stopped process) for OUTAGE seconds, then continued. Checked:
- nothing acknowledged is lost or doubled (the acks the bots got against the export's rows);
- the backlog waits in RabbitMQ: the shard and log queues' depth grows while the store
  process's RSS stays bounded (sampled every SAMPLE seconds: printed, and asserted below
  RSS_BOUND over its size before the outage);
- the store catches up afterwards: rows written per second from the heal until its lag is back
  under a second (printed);
- every period ends (late ticks allowed: the timers' lease is in MongoDB too);
- the store-lag alert (deploy/monitoring/rules/canopy.rules.yml, CanopyStoreLagGrowing: lag
  > 5 s and its 2-minute derivative > 0, for 1 minute) evaluated on the sampled
  canopy_store_lag_seconds would fire during the outage and is clear after the catch-up.

CI runs a 75 s outage (the alert needs 5 s of lag and then a minute); CANOPY_FAULT_OUTAGE_SECONDS
sets another, e.g. 300 for the issue's 5 minutes (about 7 minutes in all).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import httpx
import pytest

from bench.procstats import rss_bytes
from services.common.bus import STORE_QUEUE, shard_queue
from tests.faults.bots import Bot
from tests.faults.conftest import Supervised, start_supervised
from tests.faults.test_faults import check_log, export, researcher, tick_delays

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

OUTAGE = float(os.environ.get("CANOPY_FAULT_OUTAGE_SECONDS", "75"))
GROUPS, SIZE, RATE = 50, 2, 2.0
BEFORE, AFTER = 10.0, 30.0  # seconds of the period before the outage and after it
PERIOD = BEFORE + OUTAGE + AFTER
SAMPLE = 0.5
SCRAPE_TIMEOUT = 10.0  # Prometheus' default scrape_timeout
RSS_BOUND = 150 * 1024 * 1024  # bytes the store may grow by while the backlog waits
LAG = re.compile(r"^canopy_store_lag_seconds (\S+)$", re.M)
WRITTEN = re.compile(r'^canopy_store_events_total\{direction="[a-z]+"\} (\S+)$', re.M)
# CanopyStoreLagGrowing: max(lag) > 5 and deriv(max(lag)[2m:15s]) > 0, for 1m.
ALERT_LAG, ALERT_WINDOW, ALERT_STEP, ALERT_FOR = 5.0, 120.0, 15.0, 60.0


@pytest.fixture(scope="module")
def stack() -> Iterator[Supervised]:
    with start_supervised() as handle:
        yield handle


@dataclass
class Sample:
    at: float  # monotonic
    rss: int
    lag: float | None  # None: the scrape failed (Prometheus would have no value)
    written: float | None
    log_queue: int
    shard_queue: int


@dataclass
class Sampler:
    stack: Supervised
    samples: list[Sample] = field(default_factory=list)
    failed_scrapes: int = 0

    async def run(self) -> None:
        connection = await aio_pika.connect(self.stack.amqp_url)
        try:
            channel = await connection.channel()
            async with httpx.AsyncClient(timeout=SCRAPE_TIMEOUT) as client:
                while True:
                    text = ""
                    try:
                        text = (await client.get(f"{self.stack.urls['store']}/metrics")).text
                    except httpx.HTTPError:
                        self.failed_scrapes += 1
                    lag = LAG.search(text)
                    log_q = await channel.declare_queue(STORE_QUEUE, passive=True)
                    shard_q = await channel.declare_queue(shard_queue(0), passive=True)
                    self.samples.append(
                        Sample(
                            at=time.monotonic(),
                            rss=rss_bytes(self.stack.pid("store")) or 0,
                            lag=float(lag.group(1)) if lag else None,
                            written=sum(float(v) for v in WRITTEN.findall(text)) if lag else None,
                            log_queue=log_q.declaration_result.message_count or 0,
                            shard_queue=shard_q.declaration_result.message_count or 0,
                        )
                    )
                    await asyncio.sleep(SAMPLE)
        finally:
            await connection.close()

    def between(self, start: float, end: float) -> list[Sample]:
        return [s for s in self.samples if start <= s.at <= end]


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope, as PromQL's deriv()."""
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_v = sum(v for _, v in points) / n
    spread = sum((t - mean_t) ** 2 for t, _ in points)
    return sum((t - mean_t) * (v - mean_v) for t, v in points) / spread if spread else 0.0


def alert_condition(samples: list[Sample], index: int) -> bool:
    """The alert's expression at samples[index]: lag > 5 and the derivative of the lag,
    sampled every 15 s over the last 2 minutes, above 0."""
    now = samples[index]
    if now.lag is None or now.lag <= ALERT_LAG:
        return False  # (no value: the expression has no result either)
    steps: list[tuple[float, float]] = []
    for k in range(int(ALERT_WINDOW / ALERT_STEP) + 1):
        at = now.at - k * ALERT_STEP
        earlier = [s for s in samples[: index + 1] if s.at <= at and s.lag is not None]
        if not earlier or now.at - earlier[-1].at > ALERT_WINDOW:
            break
        steps.append((at, earlier[-1].lag or 0.0))
    return len(steps) >= 2 and slope(steps) > 0


def alert_firing(samples: list[Sample]) -> list[bool]:
    """Per sample: the condition has held for ALERT_FOR seconds ('for: 1m')."""
    firing: list[bool] = []
    since: float | None = None  # when the condition last began to hold
    for index, sample in enumerate(samples):
        holds = alert_condition(samples, index)
        since = None if not holds else sample.at if since is None else since
        firing.append(since is not None and sample.at - since >= ALERT_FOR)
    return firing


@pytest.mark.timeout(PERIOD + 180)
async def test_database_away_for_minutes_loses_nothing(stack: Supervised) -> None:
    sampler = Sampler(stack)
    sampling = asyncio.create_task(sampler.run())
    async with researcher(stack) as api:
        response = await api.post(
            "/api/sessions",
            json={
                "experiment": "decisions",
                "num_participants": GROUPS * SIZE,
                "group_size": SIZE,
                "num_periods": 1,
                "period_length": PERIOD,
                "label": "database away",
            },
        )
        assert response.status_code == 201, response.text
        session: dict[str, Any] = response.json()
        bots = [Bot(stack.urls["gateway"], p["code"], rate=RATE) for p in session["participants"]]
        mongo = stack.pid("mongo")
        stopped = False
        for bot in bots:
            bot.start()
        try:
            for bot in bots:
                await bot.wait_started(60)
            started = time.monotonic()
            await asyncio.sleep(max(0.0, BEFORE - 2))  # the load, steady, before the fault
            acked_before = sum(len(b.acked) for b in bots)
            os.kill(mongo, signal.SIGSTOP)
            stopped, away_at = True, time.monotonic()
            await asyncio.sleep(OUTAGE)  # the fault's length is the test's parameter
            acked_during = sum(len(b.acked) for b in bots) - acked_before
            os.kill(mongo, signal.SIGCONT)
            stopped, back_at = False, time.monotonic()
            caught_up = await until_caught_up(sampler, back_at, timeout=PERIOD + 60)
            for bot in bots:
                await bot.wait_ended(PERIOD + 120)
        finally:
            if stopped:
                os.kill(mongo, signal.SIGCONT)
            for bot in bots:
                await bot.stop()
        rows = await settled_export(api, session["session"], bots)
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling

    restart = caught_up.at - away_at  # the ticks may be late by the whole outage
    report(sampler, rows, bots, started, away_at, back_at, caught_up, acked_during)
    logged = {(r["participant"], r["seq"]) for r in rows if r["direction"] == "in"}
    lost = sorted((b.code, s) for b in bots for s in b.acked if (b.code, s) not in logged)
    print(f"DATABASE AWAY: {len(lost)} acknowledged frames not logged")
    # Was lost in 4 of 5 runs before the fix (3, 3, 451, 479 frames): docs/reliability.md,
    # "Faults beyond a crash": redelivered frames applied after later ones, and dropped.
    assert not lost, f"acknowledged frames not in the log after the outage: {lost}"
    check_log(session, rows, bots, PERIOD, 0, restart=restart)


async def settled_export(
    api: httpx.AsyncClient, session: str, bots: list[Bot], timeout: float = 120.0
) -> list[dict[str, Any]]:
    """The export once it holds every acknowledged frame and every period_end, or as it is
    after `timeout` (then `check_log` says what is missing)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await export(api, session)
        logged = {(r["participant"], r["seq"]) for r in rows if r["direction"] == "in"}
        ends = sum(1 for r in rows if r["channel"] == "period_end")
        complete = all((b.code, s) in logged for b in bots for s in b.acked)
        if (ends >= GROUPS and complete) or time.monotonic() > deadline:
            print(f"\nexport: {len(rows)} rows, {ends} period_end, every ack in: {complete}")
            return rows
        # Polls a condition with a deadline (the store writes in batches); each look is a
        # whole export, so not much more often than this.
        await asyncio.sleep(0.25)


async def until_caught_up(sampler: Sampler, since: float, timeout: float) -> Sample:
    """The first sample after `since` with the store's lag under a second and both queues
    (nearly) empty."""
    deadline = time.monotonic() + timeout
    seen = len(sampler.samples)
    while True:
        for sample in sampler.samples[seen:]:
            lag = sample.lag if sample.lag is not None else float("inf")
            if sample.at > since and lag < 1 and sample.log_queue + sample.shard_queue < 50:
                return sample
        seen = len(sampler.samples)
        assert time.monotonic() < deadline, f"the store did not catch up in {timeout:g} s"
        await asyncio.sleep(SAMPLE)


def report(
    sampler: Sampler,
    rows: list[dict[str, Any]],
    bots: list[Bot],
    started: float,
    away_at: float,
    back_at: float,
    caught_up: Sample,
    acked_during: int,
) -> None:
    before = sampler.between(started, away_at)
    during = sampler.between(away_at, back_at)
    after = sampler.between(back_at, caught_up.at)
    assert before and during and after, "too few samples"
    rss_before = max(s.rss for s in before)
    rss_peak = max(s.rss for s in during + after)
    depth = max(s.log_queue + s.shard_queue for s in during)
    depth_before = max(s.log_queue + s.shard_queue for s in before)
    # Rows written from the heal until caught up (none were written while it was away).
    base = [s.written for s in before + during if s.written is not None][-1]
    rate = ((caught_up.written or base) - base) / max(caught_up.at - back_at, 1e-3)
    firing = alert_firing(sampler.samples)
    delay, _ = tick_delays(rows, PERIOD, 0)
    fired = any(f for f, s in zip(firing, sampler.samples, strict=True) if s.at <= back_at + 5)
    cleared = not firing[-1] and (sampler.samples[-1].lag or 0.0) < ALERT_LAG
    acked = sum(len(b.acked) for b in bots)
    print(
        f"\nDATABASE AWAY {OUTAGE:g} s ({GROUPS * SIZE} participants x {RATE:g} Hz): "
        f"{acked} frames acknowledged ({acked_during} during the outage); "
        f"{len(rows)} rows; queues (shard + log) at most {depth} messages during; store RSS "
        f"{rss_before / 2**20:.0f} MiB before, at most {rss_peak / 2**20:.0f} MiB during and "
        f"after; lag at most {max(s.lag or 0.0 for s in sampler.samples):.1f} s; caught up "
        f"{caught_up.at - back_at:.1f} s after the heal at {rate:.0f} rows/s; "
        f"alert fired: {fired}, cleared: {cleared}; {sampler.failed_scrapes} scrapes of the "
        f"store failed; period_end at most {delay:.1f} s late"
    )
    assert not sampler.failed_scrapes, "the store's /metrics did not answer within 10 s"
    # (the gateway may put several frames in one message: compare with the depth before)
    assert depth > 10 * max(depth_before, 1), f"no backlog in RabbitMQ ({depth_before}, {depth})"
    assert rss_peak - rss_before < RSS_BOUND, (rss_before, rss_peak)
    if OUTAGE >= ALERT_LAG + ALERT_FOR + SAMPLE * 4:
        assert fired, "the store-lag alert would not have fired"
    assert cleared, "the store-lag alert would not have cleared"
