"""One stack for the monitoring tests: its own RabbitMQ (with rabbitmq_prometheus, which the
session's broker does not load) and nx-27017, the four services, and helpers that read
`/metrics` the way Prometheus does (prometheus-client's own text parser).

`stack` overrides the session fixture for this folder, so a failing test still gets the
services' log tails (tests/conftest.py), and the counters a test reads move only by what
the tests of this folder do.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from devstack.infra import InfraHandle, free_port, start_infra
from devstack.stack import SERVICES, StackHandle, start_stack
from tests.conftest import RUN_DIR

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Scrape:
    """One `/metrics` answer: every sample by (name, sorted labels), and the family names."""

    samples: dict[tuple[str, Labels], float]
    families: set[str]

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, tuple(sorted(labels.items()))), 0.0)

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}


def parse(text: str) -> Scrape:
    samples: dict[tuple[str, Labels], float] = {}
    families = set()
    for family in text_string_to_metric_families(text):
        families.add(family.name)
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Scrape(samples, families)


@pytest.fixture(scope="package")
def monitored_infra() -> Iterator[InfraHandle]:
    with start_infra(RUN_DIR, persistent=False, prometheus=True) as handle:
        yield handle


@pytest.fixture(scope="package")
def stack(monitored_infra: InfraHandle) -> Iterator[StackHandle]:
    ports = {name: free_port() for name in SERVICES}
    overrides = {"CANOPY_MONGO_DB": f"test_{secrets.token_hex(4)}"}
    infra = monitored_infra.infra
    with start_stack(infra, infra.run_dir, env_overrides=overrides, ports=ports) as handle:
        yield handle


def metrics_url(stack: StackHandle, service: str) -> str:
    return f"http://127.0.0.1:{stack.ports[service]}/metrics"


async def scrape(client: httpx.AsyncClient, url: str) -> Scrape:
    response = await client.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


async def scrape_all(client: httpx.AsyncClient, stack: StackHandle) -> dict[str, Scrape]:
    return {service: await scrape(client, metrics_url(stack, service)) for service in SERVICES}
