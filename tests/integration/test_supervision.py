"""`make run` supervises what it started, as Kubernetes restarts pods: every process it
started comes back after a SIGKILL, at the same address, with its data; one that keeps
crashing is restarted ever later; Ctrl-C stops everything and restarts nothing.

Drives the real supervisor (`python -m devstack run`) through the harness of
tests/faults/conftest.py; the restart policy itself is checked as pure functions first.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

from devstack.infra import epmd_names, owned_processes
from devstack.stack import SERVICES
from devstack.supervisor import (
    MAX_DELAY,
    STATE_FILE,
    describe_exit,
    next_attempt,
    restart_delay,
)
from tests.e2e.protocol import Participant, create_session
from tests.faults.conftest import Supervised, start_supervised

# Slow (about a minute: real supervisors, processes killed): `make stack-check`.
pytestmark = [pytest.mark.integration, pytest.mark.stack]

# Killed one after the other: the services, then the servers, the broker last (the services
# reconnect to it by themselves, which takes the longest).
KILL_ORDER = ("timers", "decisions", "gateway", "store", "mongo", "epmd", "rabbitmq")
# How long each takes to serve after its start, with room for two shared, busy cores
# (measured idle: services 0.8-1.5 s, nx-27017 0.2 s, epmd 0.05 s, RabbitMQ 5-6 s).
BOOT_BUDGET = {"timers": 8, "decisions": 8, "gateway": 8, "store": 8, "mongo": 4, "epmd": 2}
BOOT_BUDGET["rabbitmq"] = 25
RESTART_WITHIN = 2.0  # the promise: a process that exits is started again within 2 s
LATE = 1.0  # how late a restart may start after its planned delay, on busy cores


# --------------------------------------------------------------------------------------------
# The policy


def test_restart_delay_doubles_from_half_a_second_and_stops_at_30_s() -> None:
    assert [restart_delay(a) for a in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert restart_delay(10_000) == MAX_DELAY == 30
    with pytest.raises(ValueError, match="at least 1"):
        restart_delay(0)


def test_attempts_grow_while_it_crashes_and_start_over_after_a_stable_minute() -> None:
    attempt = 0  # the first start
    for expected in (1, 2, 3, 4):
        attempt = next_attempt(attempt, uptime=0.3)
        assert attempt == expected
    assert next_attempt(attempt, uptime=59.9) == 5
    assert next_attempt(attempt, uptime=60.0) == 1  # it was stable: a fresh 0.5 s


def test_exits_are_described_by_code_or_signal() -> None:
    assert describe_exit(-9) == "killed by SIGKILL"
    assert describe_exit(3) == "exited with 3"
    assert describe_exit(0) == "exited with 0"


# --------------------------------------------------------------------------------------------
# The real supervisor


@pytest.fixture(scope="module")
def supervised() -> Iterator[Supervised]:
    with start_supervised() as handle:
        yield handle


def _node_registered(s: Supervised) -> bool:
    state = s.state()
    short_name = state["rabbit_node"].split("@")[0]
    return short_name in (epmd_names(state["epmd_port"]) or {})


@pytest.mark.timeout(180)
async def test_every_process_comes_back_after_sigkill_and_the_stack_still_serves(
    supervised: Supervised,
) -> None:
    s = supervised
    headers = {"Authorization": f"Bearer {s.admin_token}"}
    async with httpx.AsyncClient(base_url=s.urls["store"], headers=headers, timeout=10) as api:
        before = await create_session(api, label="before the kills")

        timings: dict[str, tuple[float, float]] = {}
        for name in KILL_ORDER:
            pid = s.kill(name)
            budget = RESTART_WITHIN + BOOT_BUDGET[name]
            ready_after = await asyncio.to_thread(s.wait_restarted, name, pid, budget)
            started_after = s.respawn_delay(name, pid)
            timings[name] = (started_after, ready_after)
            assert started_after < RESTART_WITHIN, (name, timings[name], s.diagnostics(name))
            exits = [line for line in s.log_lines(name) if f"(pid {pid}) killed by SIGKILL" in line]
            assert len(exits) == 1, s.log_lines(name)
            assert re.search(r"restart attempt 1 in 0\.5 s$", exits[0]), exits[0]
            if name in ("epmd", "rabbitmq"):
                # rabbitmqctl finds the node again: after an epmd restart the supervisor
                # registers it on its behalf; a restarted node registers itself.
                assert _node_registered(s), s.diagnostics(name)
        print("restart (started after, ready after) per process, s:", timings)

        # The broker came back last: the services reconnect by themselves.
        t0 = time.monotonic()
        await asyncio.to_thread(s.wait_ready, SERVICES, 60.0)
        print(f"services ready {time.monotonic() - t0:.1f} s after the broker")
        response = await api.get(f"/api/sessions/{before['session']}")
        assert response.status_code == 200, response.text  # nx-27017 kept its data
        after = await create_session(api, label="after the kills")

    for session in (before, after):
        code = session["participants"][0]["code"]
        participant = await Participant.connect(s.urls["gateway"], code)
        try:
            hello = await participant.expect("hello")
            assert hello["participant"] == code
        finally:
            await participant.close()


@pytest.mark.timeout(120)
def test_a_process_that_keeps_crashing_is_restarted_ever_later(supervised: Supervised) -> None:
    s = supervised
    name = "timers"
    measured = []
    for _ in range(3):
        killed = s.kill(name)  # the 2nd and 3rd time while it boots: it never got stable
        s.wait_started(name, killed, timeout=RESTART_WITHIN + 2 * MAX_DELAY)
        measured.append(s.respawn_delay(name, killed))
    planned = [
        float(m[1])
        for line in s.log_lines(name)
        if (m := re.search(r"restart attempt \d+ in ([\d.]+) s", line))
    ][-3:]
    # Each delay doubles the one before (0.5, 1, 2 s, or later ones if an earlier test
    # already restarted it less than a minute ago), and the supervisor keeps to it.
    assert planned[1] == 2 * planned[0] and planned[2] == 2 * planned[1], s.log_lines(name)
    print("backoff: planned", planned, "measured", [round(m, 2) for m in measured])
    for was, plan in zip(measured, planned, strict=True):
        assert plan - 0.05 <= was < plan + LATE, (measured, planned)
    s.wait_restarted(name, killed, timeout=planned[2] + BOOT_BUDGET[name])  # left serving


@pytest.mark.timeout(120)
def test_ctrl_c_stops_every_process_and_restarts_nothing_meanwhile() -> None:
    with start_supervised() as s:
        killed = s.kill("gateway")
        # Ctrl-C while the gateway's restart is pending.
        s.wait_state(
            lambda st: st["processes"]["gateway"]["state"] == "backoff",
            timeout=RESTART_WITHIN,
            what="gateway in backoff",
        )
        t0 = time.monotonic()
        assert s.stop(signal.SIGINT) == 0, s.diagnostics()
        stop_took = time.monotonic() - t0

        assert owned_processes(s.run_dir) == [], s.diagnostics()
        assert not (s.run_dir / STATE_FILE).exists()
        lines = s.devstack_log().splitlines()
        stop_at = next(i for i, line in enumerate(lines) if "SIGINT: stopping" in line)
        assert not [line for line in lines[stop_at:] if "started again" in line], lines
        assert any(f"gateway (pid {killed}) killed by SIGKILL" in line for line in lines)
        print(f"stopped in {stop_took:.1f} s")
