"""Decisions holds no state for groups that are over (issue 18, "Bounded everything").

Several one-second sessions run to their end and every member leaves: the decisions service's
`canopy_decisions_groups` gauge must come back down (each group evicted once the log holds all
its rows), instead of keeping every group it ever saw. A member who comes back after the end
gets a `hello` rebuilt from the log: the final decisions, the period ended, its own `last_seq`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.protocol import Participant, connect_group, create_session

pytestmark = [pytest.mark.e2e]

SESSIONS = 3
EVICTION_TIMEOUT = 30.0  # the worker sweeps 5 s after a group is over, then waits for the log
EVICTED = "canopy_decisions_groups_evicted_total"
REBUILDS = "canopy_decisions_rebuilds_total"


async def sample(decisions_url: str, name: str) -> float:
    """The value of an unlabelled metric on the decisions service's /metrics."""
    async with httpx.AsyncClient(timeout=5.0) as client:
        text = (await client.get(f"{decisions_url}/metrics")).text
    for family in text_string_to_metric_families(text):
        for metric in family.samples:
            if metric.name == name and not metric.labels:
                return float(metric.value)
    raise AssertionError(f"{name} not on {decisions_url}/metrics")


async def until_evicted_at_least(decisions_url: str, count: float) -> None:
    """Poll the eviction counter (a condition with a deadline, not a sleep) up to `count`."""
    evicted = await sample(decisions_url, EVICTED)
    try:
        async with asyncio.timeout(EVICTION_TIMEOUT):
            while evicted < count:
                await asyncio.sleep(0.2)
                evicted = await sample(decisions_url, EVICTED)
    except TimeoutError:
        raise AssertionError(
            f"decisions evicted {evicted:.0f} groups in all after {EVICTION_TIMEOUT:.0f} s "
            f"(at least {count:.0f} expected): ended groups are not evicted"
        ) from None


async def run_to_the_end(api: httpx.AsyncClient, gateway_url: str) -> dict[str, Any]:
    """One 1-second session of two: a decides 0.2 then 0.7, b 0.9; both see the end, leave."""
    session = await create_session(api, period_length=1, num_periods=1)
    codes = [p["code"] for p in session["participants"]]
    a, b = await connect_group(gateway_url, codes)
    for seq, value in ((1, 0.2), (2, 0.7)):
        await a.send(value, seq=seq)
        await a.ack(seq)
    await b.send(0.9, seq=1)
    await b.ack(1)
    ends = [await member.expect("period_end", timeout=10) for member in (a, b)]
    assert ends[0]["group_decisions"] == {codes[0]: 0.7, codes[1]: 0.9}
    await a.close()
    await b.close()
    return {"codes": codes, "final": ends[0]["group_decisions"]}


async def evicted_and_back(
    decisions_url: str, gateway_url: str, code: str, evicted_before: float
) -> tuple[Participant, dict[str, Any]]:
    """Connect `code` once its group was evicted: the hello its group's rebuild sent.

    The gauges are the whole service's (earlier tests' groups are evicted meanwhile too), so
    the proof that this group was evicted is its own rebuild: after each eviction sweep the
    member connects; a hello without a rebuild means the group was still held (the sweep took
    others'), and the member leaves and waits for the next sweep."""
    async with asyncio.timeout(EVICTION_TIMEOUT):
        while True:
            await until_evicted_at_least(decisions_url, evicted_before + 1)  # a sweep
            evicted_before = await sample(decisions_url, EVICTED)
            rebuilds = await sample(decisions_url, REBUILDS)
            member = await Participant.connect(gateway_url, code)
            hello: dict[str, Any] = await member.expect("hello")
            if await sample(decisions_url, REBUILDS) > rebuilds:
                return member, hello
            await member.close()


async def test_ended_groups_are_evicted_and_come_back_from_the_log(
    api: httpx.AsyncClient, gateway_url: str, stack: Any
) -> None:
    decisions_url = stack.urls.decisions_url
    evicted = await sample(decisions_url, EVICTED)
    sessions = [await run_to_the_end(api, gateway_url) for _ in range(SESSIONS)]
    # Every group of the service that is over gets evicted: the gauge comes down to at most
    # the groups still held by someone (none of ours).
    await until_evicted_at_least(decisions_url, evicted + SESSIONS)

    # A member back after the end: its group is rebuilt from the log, with the final state.
    first = sessions[0]
    a, hello = await evicted_and_back(decisions_url, gateway_url, first["codes"][0], evicted)
    assert hello["group_decisions"] == first["final"]
    assert hello["period"]["number"] == 1 and hello["period"]["state"] == "ended"
    assert hello["last_seq"] == 2
    assert hello["presence"] == {first["codes"][0]: True, first["codes"][1]: False}
    # Its inputs are still answered (and logged): a decision now is refused, the seq counted.
    await a.send(0.4, seq=3)
    assert (await a.error(3))["code"] == "period_not_running"
    evicted = await sample(decisions_url, EVICTED)
    await a.close()

    # Evicted again once it left; and back again with the seq it sent after the end.
    a, hello = await evicted_and_back(decisions_url, gateway_url, first["codes"][0], evicted)
    assert hello["last_seq"] == 3 and hello["group_decisions"] == first["final"]
    await a.close()
