"""Pure pieces of the load generator's report."""

from __future__ import annotations

from bench.loadgen import stalls


def test_slow_decisions_are_grouped_into_stalls_by_send_time() -> None:
    start = 100.0
    slow = [(105.0, 0.09), (100.5, 0.06), (105.1, 0.12), (100.6, 0.07), (105.3, 0.08)]
    assert stalls(slow, start) == [
        {"at_s": 0.5, "decisions": 2, "worst_ms": 70.0},
        {"at_s": 5.0, "decisions": 3, "worst_ms": 120.0},
    ]
    assert stalls([], start) == []
