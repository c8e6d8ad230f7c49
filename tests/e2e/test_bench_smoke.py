"""Benchmark smoke test: the load generator runs against the test stack and loses nothing.

A few seconds of small load (2 groups of 4 at 5 Hz for 2 s). Only that it runs, that every
acknowledged decision reached every member and the export, and the shape of its result are
asserted; timing targets are never asserted here (docs/performance.md has the numbers).
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import orjson
import pytest

from bench.loadgen import LoadParams, StackTarget, run_load
from bench.procstats import discover
from bench.report import append_result, format_run
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
    "ok",
}
LATENCY_KEYS = {"count", "p50", "p90", "p99", "p99.9", "max", "mean"}


async def test_load_generator_loses_nothing(stack: StackHandle, tmp_path: Path) -> None:
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
