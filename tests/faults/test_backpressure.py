"""RabbitMQ blocks publishers under load (issue 23, "Backpressure"): a real resource alarm on the
stack's own node, raised with rabbitmqctl while bots send.

A memory alarm (`set_vm_memory_high_watermark 0.0001`: the node uses far more than that) or a
disk alarm (`set_disk_free_limit` above the disk's size) blocks every connection that
publishes, at its next publish: nothing is confirmed, nor read from it, until the alarm clears.
20 participants send small decisions at 5 Hz, 8 others frames of 16 KiB at 20 Hz (2.6 MB/s
in all, which a gateway that kept reading would have buffered). Checked, while blocked:
- the gateway's /readyz answers 503 naming the alarm, and canopy_gateway_bus_blocked is 1;
- a new participant socket is closed with 1013 (try again later);
- nothing is acknowledged (the gateway acks only what the broker confirmed);
- the gateway's and the store's resident memory stay within GATEWAY_RSS_BOUND and
  STORE_RSS_BOUND of what they were before the alarm (sampled every SAMPLE s, until the
  export is complete after the alarm cleared);
and once it clears: every bot has frames acknowledged again, the gateway is ready again, and
every acknowledged frame's `in` row is in the export, once (nothing acknowledged lost or
doubled). Times and memory are printed (docs/reliability.md, "RabbitMQ blocks publishers").
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import websockets

from bench.procstats import rss_bytes
from devstack.infra import child_env, rabbitmqctl
from services.bots import client
from services.bots.strategies import View
from tests.e2e.protocol import ws_url
from tests.faults.bots import Bot
from tests.faults.conftest import Supervised, start_supervised
from tests.faults.test_faults import acked_after, check_log, export, researcher

pytestmark = [pytest.mark.e2e, pytest.mark.faults]

LIGHT, LIGHT_RATE = 20, 5.0  # participants sending small decisions, and how often
HEAVY, HEAVY_RATE, PAD = 8, 20.0, 16 * 1024  # ... and frames of PAD bytes
SIZE = 2
BEFORE, BLOCK, AFTER = 3.0, 15.0, 8.0  # seconds of the period around the alarm
PERIOD = BEFORE + BLOCK + AFTER + 6.0  # (and the time it takes to start and raise it)
SAMPLE = 0.25
GATEWAY_RSS_BOUND = 24 * 1024 * 1024
STORE_RSS_BOUND = 64 * 1024 * 1024
# The store's budget for the log it holds (services/store/settings.py), below its default (128
# MiB) so that the bound above means something: 3 messages of up to 4 MiB (and their records).
STORE_BUFFER_BYTES = 16 * 1024 * 1024
DETECT_TIMEOUT = 20.0
EXPORT_TIMEOUT = 30.0
BLOCKED = re.compile(r"^canopy_gateway_bus_blocked (\S+)$", re.M)

# How each alarm is raised and cleared (RabbitMQ 3.10: both take effect at once).
ALARMS = {
    "memory": (("set_vm_memory_high_watermark", "0.0001"), ("set_vm_memory_high_watermark", "0.4")),
    "disk": (("set_disk_free_limit", "100000GB"), ("set_disk_free_limit", "50MB")),
}


@pytest.fixture(scope="module")
def stack() -> Iterator[Supervised]:
    with start_supervised({"CANOPY_STORE_BUFFER_BYTES": str(STORE_BUFFER_BYTES)}) as handle:
        yield handle


def broker(stack: Supervised, *args: str) -> str:
    """`rabbitmqctl ARGS` against the stack's own node (its cookie and epmd, as devstack runs
    it: devstack/infra.py)."""
    state = stack.state()
    loopback = "-kernel inet_dist_use_interface {127,0,0,1}"
    env = child_env(
        stack.run_dir,
        {
            "HOME": str(stack.run_dir / "rabbitmq"),
            "ERL_EPMD_PORT": str(state["epmd_port"]),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_CTL_DIST_PORT_MIN": "0",
            "RABBITMQ_CTL_DIST_PORT_MAX": "0",
            "RABBITMQ_CTL_ERL_ARGS": loopback,
        },
    )
    result = rabbitmqctl(state["rabbit_node"], env, *args)
    assert result.returncode == 0, result.stdout
    return result.stdout


class _Padded:
    """While `padding` is set (the alarm), frames of PAD bytes (a string: `decisions` refuses
    it after the ack, as any value that is not a number, and logs it with its `error` row);
    small decisions otherwise (so that the database is not what the test measures)."""

    padding = False

    def act(self, view: View, rng: random.Random) -> list[tuple[str, Any]]:
        value = f"{rng.random():.4f}"
        return [("decisions", value.ljust(PAD, "x") if self.padding else float(value))]


class HeavyBot(client.Bot):
    def __init__(self, gateway_url: str, code: str, strategy: _Padded) -> None:
        super().__init__(
            ws_url(gateway_url, code),
            strategy=strategy,
            rate=HEAVY_RATE,
            num_periods=1,
            min_delay=0.05,
            max_delay=1.0,
        )


@dataclass
class Sampler:
    """Resident memory of the gateway and the store, every SAMPLE s."""

    stack: Supervised
    samples: list[tuple[float, int, int]] = field(default_factory=list)  # (at, gateway, store)

    async def run(self) -> None:
        while True:
            gateway = rss_bytes(self.stack.pid("gateway")) or 0
            store = rss_bytes(self.stack.pid("store")) or 0
            self.samples.append((time.monotonic(), gateway, store))
            await asyncio.sleep(SAMPLE)  # a sampling period, not a synchronisation

    def peak(self, since: float, until: float = float("inf")) -> tuple[int, int]:
        window = [s for s in self.samples if since <= s[0] <= until]
        assert window, "no samples"
        return max(s[1] for s in window), max(s[2] for s in window)


async def status(client_: httpx.AsyncClient, url: str) -> int | None:
    try:
        return (await client_.get(f"{url}/readyz")).status_code
    except httpx.HTTPError:
        return None


async def until_status(
    client_: httpx.AsyncClient, url: str, code: int, timeout: float
) -> httpx.Response:
    """Poll `url`/readyz until it answers `code` (a hung answer counts as none)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            response = await client_.get(f"{url}/readyz")
            if response.status_code == code:
                return response
        assert time.monotonic() < deadline, f"{url}/readyz never answered {code}"
        await asyncio.sleep(0.1)  # polls readiness with a deadline


async def close_code_of_a_new_socket(gateway_url: str, code: str) -> int | None:
    """The close code a new participant socket gets (None: it stayed open for 5 s)."""
    async with websockets.connect(ws_url(gateway_url, code), open_timeout=5) as ws:
        try:
            async with asyncio.timeout(5):
                await ws.recv()
                await ws.recv()  # a hello, then anything: it was let in
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd else None
        except TimeoutError:
            return None
    return None


def presence_during_periods(rows: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """Presence changes logged while a group's period ran (nobody left or came back then)."""
    ends = {r["group"]: r["ts"] for r in rows if r["channel"] == "period_end"}
    starts = {r["group"]: r["ts"] for r in rows if r["channel"] == "period_start"}
    return [
        (r["value"]["participant"], r["value"]["connected"])
        for r in rows
        if r["channel"] == "presence"
        and starts.get(r["group"], "~") < r["ts"] < ends.get(r["group"], "")
    ]


async def complete_export(
    api: httpx.AsyncClient, session: str, bots: list[client.Bot], groups: int
) -> list[dict[str, Any]]:
    """The export once it holds every acknowledged frame and `groups` period_end rows, or as
    it is after EXPORT_TIMEOUT (then `check_log` says what is missing)."""
    deadline = time.monotonic() + EXPORT_TIMEOUT
    while True:
        rows = await export(api, session)
        logged = {(r["participant"], r["seq"]) for r in rows if r["direction"] == "in"}
        ends = sum(1 for r in rows if r["channel"] == "period_end")
        if ends >= groups and all((b.code, s) in logged for b in bots for s in b.acked):
            return rows
        if time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.25)  # polls the export (the store writes in batches), deadline-bound


@pytest.mark.timeout(PERIOD + 120)
@pytest.mark.parametrize("alarm", ["memory", "disk"])
async def test_a_resource_alarm_bounds_memory_and_loses_nothing(
    stack: Supervised, alarm: str
) -> None:
    raise_alarm, clear_alarm = ALARMS[alarm]
    urls = stack.urls
    sampler = Sampler(stack)
    sampling = asyncio.create_task(sampler.run())
    raised = False
    async with researcher(stack) as api, httpx.AsyncClient(timeout=2.0) as probe:
        response = await api.post(
            "/api/sessions",
            json={
                "experiment": "decisions",
                "num_participants": LIGHT + HEAVY + SIZE,  # a spare group for the new socket
                "group_size": SIZE,
                "num_periods": 1,
                "period_length": PERIOD,
                "label": f"{alarm} alarm",
            },
        )
        assert response.status_code == 201, response.text
        session: dict[str, Any] = response.json()
        codes = [p["code"] for p in session["participants"]]
        spare = codes[-1]
        light = [Bot(urls["gateway"], c, rate=LIGHT_RATE) for c in codes[:LIGHT]]
        padded = _Padded()
        heavy = [HeavyBot(urls["gateway"], c, padded) for c in codes[LIGHT : LIGHT + HEAVY]]
        bots: list[client.Bot] = [*light, *heavy]
        for bot in bots:
            bot.start()
        try:
            for bot in bots:
                await bot.wait_started(60)
            await asyncio.sleep(BEFORE)  # steady load before the fault (its length)
            raised_at = time.monotonic()
            padded.padding = True
            await asyncio.to_thread(broker, stack, *raise_alarm)  # a CLI VM: about 2 s
            raised, alarm_at = True, time.monotonic()
            refused = await until_status(probe, urls["gateway"], 503, DETECT_TIMEOUT)
            detected = time.monotonic() - alarm_at
            problems = refused.json()["problems"]
            assert any("RabbitMQ blocks publishers" in p for p in problems), problems
            blocked = BLOCKED.search((await probe.get(f"{urls['gateway']}/metrics")).text)
            assert blocked is not None and float(blocked.group(1)) == 1
            new_socket = await close_code_of_a_new_socket(urls["gateway"], spare)
            assert new_socket == 1013, f"a new socket while blocked: close {new_socket}"
            acked_blocked = sum(len(b.acked) for b in bots)
            await asyncio.sleep(max(0.0, BLOCK - (time.monotonic() - raised_at)))  # the fault
            acked_during = sum(len(b.acked) for b in bots) - acked_blocked
            # Reported, not asserted: the broker blocks a connection at its first publish,
            # so a service with nothing to publish meanwhile (the store) stays ready.
            others = {n: await status(probe, urls[n]) for n in ("decisions", "timers", "store")}
            padded.padding = False
            await asyncio.to_thread(broker, stack, *clear_alarm)
            raised, cleared_at = False, time.monotonic()
            await until_status(probe, urls["gateway"], 200, 30)
            ready_again = time.monotonic() - cleared_at
            await acked_after(bots, 30)  # type: ignore[arg-type]
            acking_again = time.monotonic() - cleared_at
            for bot in bots:
                await bot.wait_ended(PERIOD + 60)
        finally:
            if raised:
                await asyncio.to_thread(broker, stack, *clear_alarm)
            for bot in bots:
                await bot.stop()
        ended_at = time.monotonic()
        played = [g for g in session["groups"] if spare not in g["participants"]]
        rows = await complete_export(api, session["session"], bots, len(played))
        settled_at = time.monotonic()
    sampling.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampling

    gateway_before, store_before = sampler.peak(raised_at - BEFORE, raised_at)
    # Until the period ended: the alarm, then the backlog flowing through (the export's own
    # memory afterwards is the API's, not the log's: reported, not bounded here).
    gateway_peak, store_peak = sampler.peak(raised_at, ended_at)
    _, store_exporting = sampler.peak(ended_at, settled_at)
    acked = sum(len(b.acked) for b in bots)
    sent = sum(b.sent for b in bots)
    presence = presence_during_periods(rows)
    print(
        f"\n{alarm.upper()} ALARM {BLOCK:g} s ({LIGHT} x {LIGHT_RATE:g} Hz small, {HEAVY} x "
        f"{HEAVY_RATE:g} Hz x {PAD // 1024} KiB): gateway unready {detected:.2f} s after the "
        f"alarm; decisions/timers/store /readyz while blocked: {others}; new socket: close "
        f"{new_socket}; {acked_during} frames acked while blocked; ready {ready_again:.2f} s "
        f"and every bot acked again {acking_again:.2f} s after the alarm cleared; {sent} sent, "
        f"{acked} acked, {len(rows)} rows; RSS gateway {gateway_before / 2**20:.0f} -> "
        f"{gateway_peak / 2**20:.0f} MiB, store {store_before / 2**20:.0f} -> "
        f"{store_peak / 2**20:.0f} MiB ({store_exporting / 2**20:.0f} MiB exporting); "
        f"presence rows during the periods (participant, connected): {presence}"
    )
    assert acked_during == 0, "frames acknowledged while the broker blocked the gateway"
    # Nobody left: whoever the alarm made look disconnected (a blocked gateway sends no
    # heartbeats either) is connected again once it cleared.
    last = dict(presence)
    assert all(last.values()), f"still disconnected after the alarm: {presence}"
    assert gateway_peak - gateway_before < GATEWAY_RSS_BOUND, (gateway_before, gateway_peak)
    assert store_peak - store_before < STORE_RSS_BOUND, (store_before, store_peak)
    # Nothing acknowledged lost or doubled; periods end, late by at most the block.
    mine = {g["group"] for g in played}
    check_log(
        {**session, "groups": played},
        [r for r in rows if r["group"] in mine],
        bots,  # type: ignore[arg-type]
        PERIOD,
        0,
        restart=BLOCK + acking_again,
    )
