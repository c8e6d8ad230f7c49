"""Each service's metric attribute is named as its metric, without `canopy_<service>_` (and the
`_total` that prometheus-client adds to counters): `metrics.batch_failures` is
`canopy_store_batch_failures_total`, so a name on a dashboard or an alert leads to its code and
back. The metric names are public (dashboards and alerts read them); the attributes follow."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from prometheus_client.metrics import MetricWrapperBase

from services.common.metrics import ServiceMetrics
from services.decisions.metrics import DecisionsMetrics
from services.gateway.metrics import GatewayMetrics
from services.store.metrics import StoreMetrics
from services.timers.metrics import TimersMetrics


@pytest.mark.parametrize("cls", [DecisionsMetrics, GatewayMetrics, StoreMetrics, TimersMetrics])
def test_every_metric_attribute_is_named_as_its_metric(cls: Callable[[], ServiceMetrics]) -> None:
    metrics = cls()
    prefix = f"canopy_{metrics.service}_"
    mismatched = {}
    checked = 0
    for attribute, value in vars(metrics).items():
        # A labelled metric's children (`applied`, `events_in`) are shortcuts, not metrics.
        if not isinstance(value, MetricWrapperBase) or value._labelvalues:
            continue
        checked += 1
        (described,) = value.describe()
        name = described.name
        if attribute != name.removeprefix(prefix):
            mismatched[attribute] = name
    assert checked >= 5
    assert mismatched == {}
