"""Prometheus (Debian's, started as `make run MONITORING=1` starts it) against the real stack:
it scrapes the four services and the broker, loads the rules, evaluates them, and every
dashboard query runs without error. And the dashboard's structure: every panel has queries,
every metric a query or a rule names exists in some real `/metrics`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from devstack.__main__ import monitoring_ports
from devstack.infra import InfraHandle
from devstack.monitoring import PrometheusHandle, start_prometheus
from devstack.stack import SERVICES, StackHandle
from tests.e2e.protocol import Participant
from tests.monitoring import dashboard
from tests.monitoring.conftest import metrics_url, scrape

pytestmark = [pytest.mark.e2e]

JOBS = {*SERVICES, "rabbitmq"}
TIMEOUT = 20.0  # a few 1 s scrape and evaluation rounds


@pytest.fixture(scope="module")
def prometheus(monitored_infra: InfraHandle, stack: StackHandle) -> Iterator[PrometheusHandle]:
    ports = monitoring_ports(monitored_infra, stack)
    with start_prometheus(stack.run_dir, ports, port=None, interval="1s") as handle:
        yield handle


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10.0) as client:
        yield client


async def api(
    client: httpx.AsyncClient, prometheus: PrometheusHandle, path: str, **params: str
) -> Any:
    response = await client.get(f"{prometheus.url}/api/v1/{path}", params=params)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "success", body
    return body["data"]


async def until(check: Any, what: str) -> Any:
    """Poll `check()` (bounded) until it returns something truthy: Prometheus works in rounds."""
    try:
        async with asyncio.timeout(TIMEOUT):
            while True:
                result = await check()
                if result:
                    return result
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {TIMEOUT} s") from None


async def test_prometheus_scrapes_every_service_and_the_broker_and_evaluates_the_rules(
    prometheus: PrometheusHandle, stack: StackHandle, client: httpx.AsyncClient
) -> None:
    async def all_up() -> dict[str, str] | None:
        targets = (await api(client, prometheus, "targets"))["activeTargets"]
        health = {t["labels"]["job"]: t["health"] for t in targets}
        return health if health == dict.fromkeys(JOBS, "up") else None

    await until(all_up, "every target up")

    # A refused connection, so that the refusal rate (a recording rule over a counter) has a
    # series that moves.
    intruder = await Participant.connect(stack.urls.gateway_url, "y" * 20)
    await intruder.ws.wait_closed()

    async def evaluated() -> list[dict[str, Any]] | None:
        groups = (await api(client, prometheus, "rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        done = rules and all(rule["health"] == "ok" for rule in rules)
        return rules if done else None

    rules = await until(evaluated, "every rule evaluated without error")
    alerts = {rule["name"] for rule in rules if rule["type"] == "alerting"}
    assert alerts == {
        "CanopyEndToEndLatencyHigh",
        "CanopyDeliveryLatencyHigh",
        "CanopyStoreLagGrowing",
        "CanopyBusBlocked",
        "CanopyEventsQuarantined",
        "CanopyDeadLetters",
        "CanopyQueueWithoutConsumer",
        "CanopyTickDrift",
        "CanopyRefusalSpike",
        "CanopyServiceDown",
        "CanopyServiceNotReady",
    }
    # A healthy stack: nothing pending or firing.
    assert [rule["name"] for rule in rules if rule.get("state", "inactive") != "inactive"] == []

    async def refusals() -> list[dict[str, Any]] | None:
        data = await api(client, prometheus, "query", query="canopy:gateway_refusals:rate1m")
        return [r for r in data["result"] if float(r["value"][1]) > 0] or None

    await until(refusals, "the refusal rate recorded")

    # The queue-without-consumer alert reads rabbitmq_prometheus's per-queue series: they are
    # there, and every Canopy queue but the dead letters has its consumer.
    data = await api(
        client, prometheus, "query", query='rabbitmq_queue_consumers{queue=~"canopy[.].+"}'
    )
    consumers = {r["metric"]["queue"]: float(r["value"][1]) for r in data["result"]}
    assert "canopy.store.events" in consumers and "canopy.decisions.shard.0" in consumers
    assert all(count > 0 for queue, count in consumers.items() if queue != "canopy.dead")

    # Every dashboard query runs against the live data.
    for where, expr in dashboard.queries(dashboard.load()):
        response = await client.get(f"{prometheus.url}/api/v1/query", params={"query": expr})
        assert response.json()["status"] == "success", (where, response.text)


async def test_every_metric_the_dashboard_and_the_rules_read_exists(
    monitored_infra: InfraHandle, stack: StackHandle, client: httpx.AsyncClient
) -> None:
    exposed: set[str] = {"up"}  # Prometheus's own, per target
    for service in SERVICES:
        exposed |= (await scrape(client, metrics_url(stack, service))).names()
    broker_url = monitored_infra.infra.prometheus_url
    assert broker_url is not None
    exposed |= (await scrape(client, broker_url)).names()

    board = dashboard.load()
    panels = list(dashboard.panels(board))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(target["refId"] and target["expr"] for target in panel["targets"])
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource"]
    titles = " ".join(panel["title"].lower() for panel in panels)
    for topic in (
        "participants connected",
        "decisions",
        "end-to-end",
        "delivery",
        "tick drift",
        "store",
        "errors by code",
        "queue depths",
    ):
        assert topic in titles, topic

    read = {name for _, expr in dashboard.queries(board) for name in dashboard.metric_names(expr)}
    recorded = set()
    for rule in dashboard.rules():
        if "record" in rule:
            recorded.add(rule["record"])
        read |= dashboard.metric_names(rule["expr"])
    missing = sorted(read - exposed - recorded)
    assert not missing, f"read by the dashboard or the rules, served by nobody: {missing}"
