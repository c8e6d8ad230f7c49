"""Benchmark smoke test: the load generator runs against the test stack and loses nothing,
then the same load against the one-process floor (bench/floor.py, a real child process).

A few seconds of small load (2 groups of 4 at 5 Hz for 2 s; the floor for 1 s), and the
study-link launch row in small (20 people within 2 s for 16 seats), with groups fixed at
creation and with the arrival lobby. Only that it runs, that every acknowledged decision
reached every member (and, for Canopy, the export), that every person got one seat or "full"
in arrival order (and, in the lobby, one group, formed once, in arrival order), and the shape
of the results are asserted; timing targets are never asserted here (docs/performance.md has
the numbers).
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from bench.floor import floor_process
from bench.launch import LaunchParams, format_launch, run_launch
from bench.loadgen import LoadParams, StackTarget, period_length, run_load
from bench.procstats import ProcessSet, discover
from bench.report import append_result, attach_floor, format_matrix, format_run
from devstack.stack import StackHandle

pytestmark = pytest.mark.e2e

RESULT_KEYS = {
    "kind",
    "timestamp",
    "commit",
    "machine",
    "params",
    "latency_ms",
    "ack_ms",
    "sent",
    "acked",
    "unacked",
    "lost",
    "errors",
    "duplicates",
    "sends_per_s",
    "broadcasts_per_s",
    "export",
    "store_queue",
    "processes",
    "mem_per_participant_kib",
    "cpu_ms_per_decision",
    "cpu_roles",
    "broker",
    "ok",
}
LATENCY_KEYS = {"count", "p50", "p90", "p99", "p99.9", "max", "mean"}


async def test_load_generator_loses_nothing_on_canopy_and_on_the_floor(
    stack: StackHandle, tmp_path: Path
) -> None:
    urls = stack.urls
    processes, _ = discover(urlsplit(urls.gateway_url).port or 80)
    target = StackTarget(
        gateway_url=urls.gateway_url,
        store_url=urls.store_url,
        token=urls.admin_token,
        amqp_url=stack.infra.amqp_url,
        processes=processes,
        info={"own_stack": False},
    )
    params = LoadParams(groups=2, size=4, rate=5, duration=2, warmup=0.5, drain=5)

    result = await run_load(target, params)

    assert result["sent"] > 0
    assert result["lost"] == 0, result
    assert result["unacked"] == 0, result
    assert result["errors"] == {}, result
    assert result["disconnects"] == 0, result
    assert result["duplicates"] == 0, result
    assert result["export"]["complete"], result["export"]
    assert result["export"]["in_rows"] == result["acked"]
    assert result["latency_ms"]["count"] > 0
    assert result["ok"]
    assert result.keys() >= RESULT_KEYS
    assert set(result["latency_ms"]) == LATENCY_KEYS

    path = append_result(result, tmp_path)
    [line] = path.read_bytes().splitlines()
    assert orjson.loads(line)["params"]["participants"] == 8
    assert "send → all members" in format_run(result)

    # CPU per decision: the stack's processes that were found, never the load generator.
    assert result["cpu_ms_per_decision"] is not None and result["cpu_ms_per_decision"] > 0
    assert "loadgen" not in result["cpu_roles"]
    assert {"gateway", "decisions", "rabbitmq"} <= set(result["cpu_roles"])
    assert result["broker"] is None  # the test session's broker has no rabbitmq_prometheus

    floor_params = LoadParams(groups=2, size=4, rate=5, duration=1, warmup=0.3, drain=5)
    with floor_process(2, 4, period_length(floor_params)) as floor:
        floor_target = StackTarget(
            gateway_url=floor.url,
            store_url=None,
            token=None,
            processes=ProcessSet({"floor": floor.pid, "loadgen": os.getpid()}),
            name="floor",
            session=floor.session,
        )
        floor_result = await run_load(floor_target, floor_params)

    assert floor_result["kind"] == "floor"
    assert floor_result["export"] == {"skipped": True}
    assert floor_result["sent"] > 0
    assert floor_result["acked"] == floor_result["sent"]
    assert floor_result["lost"] == 0 and floor_result["unseen_unacked"] == 0, floor_result
    assert floor_result["errors"] == {} and floor_result["duplicates"] == 0
    assert floor_result["ok"]
    assert floor_result["latency_ms"]["count"] > 0
    assert floor_result["cpu_roles"] == ["floor"]
    assert floor_result["cpu_ms_per_decision"] is not None
    attach_floor(result, floor_result)
    assert result["vs_floor"]["p99"] is not None and result["vs_floor"]["p99"] > 0
    assert "one-process floor" in format_matrix([result])


@pytest.mark.parametrize("grouping", ["fixed", "arrival"])
async def test_the_launch_row_seats_each_person_once_in_arrival_order(
    stack: StackHandle, grouping: str
) -> None:
    """bench/launch.py on the test stack, tiny: 20 people within 2 s for 16 seats (4 groups
    of 4): 16 seats, 4 "full" pages, every group started, every check 0; under arrival
    grouping the 4 groups formed by the lobby, each once, as the export shows."""
    urls = stack.urls
    processes, _ = discover(urlsplit(urls.gateway_url).port or 80)
    target = StackTarget(
        gateway_url=urls.gateway_url,
        store_url=urls.store_url,
        token=urls.admin_token,
        processes=processes,
        info={"own_stack": False},
    )
    params = LaunchParams(
        people=20, seats=16, group_size=4, within=2, period=2, seed=5, grouping=grouping
    )

    result = await run_launch(target, params)

    assert result["counts"] | {"finished": 0} == {
        "people": 20,
        "seated": 16,
        "full": 4,
        "errors": 0,
        "hello": 16,
        "started": 16,
        "finished": 0,  # only if a group's period ended before the last group started
        "groups_complete": 4,
        "groups_started": 4,
        "first_answered_seated": 16,
    }, result
    assert not any(result["seat_checks"].values()), result["seat_checks"]
    assert result["order_violations"] == {"seat_after_full": 0, "seat_order": 0}
    assert result["ok"], result
    assert result["group_formed_ms"]["count"] == 4
    assert result["join_to_hello_ms"]["count"] == 16
    assert {"gateway", "store", "loadgen"} <= set(result["processes"])
    assert result["rss_mib"]["gateway"]["before"] is not None
    assert "Study-link launch: 20 people" in format_launch(result)
    if grouping == "fixed":
        assert result["lobby_checks"] == {} and result["lobby"] == {}
        return
    assert result["lobby_checks"] == {
        "grouped_after_later": 0,
        "formed_twice": 0,
        "in_two_groups": 0,
        "not_logged": 0,
        "members_differ": 0,
        "left_in_lobby": 0,
        "lobby_timeouts": 0,
    }, result["lobby_checks"]
    assert result["lobby"]["groups_formed"] == 4
    assert result["lobby"]["lobby_frames"] >= 16  # at least one count after each lobby hello
    assert result["group_hello_ms"]["count"] == 4
    assert result["join_to_group_hello_ms"]["count"] == 16
    assert "last lobby hello -> group hello" in format_launch(result)
