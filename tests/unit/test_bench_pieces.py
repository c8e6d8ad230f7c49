"""Pure pieces of the load generator's report."""

from __future__ import annotations

import time
from typing import Any

from bench.brokerstats import broker_per_decision, parse_counters
from bench.diskprobe import DiskProbe
from bench.loadgen import disk_summary, stalls
from bench.procstats import Sample, stack_cpu_per_decision, usage
from bench.report import _disk, _stall_summary, attach_floor, format_versus_floor, ratio


def test_slow_decisions_are_grouped_into_stalls_by_send_time() -> None:
    start = 100.0
    slow = [(105.0, 0.09), (100.5, 0.06), (105.1, 0.12), (100.6, 0.07), (105.3, 0.08)]
    assert stalls(slow, start) == [
        {"at_s": 0.5, "decisions": 2, "worst_ms": 70.0},
        {"at_s": 5.0, "decisions": 3, "worst_ms": 120.0},
    ]
    assert stalls([], start) == []


def test_a_stall_says_whether_a_slow_disk_sync_overlapped_it(tmp_path: Any) -> None:
    disk = DiskProbe(tmp_path)
    # syncs (start, seconds): a slow one from 104.9 to 105.2, fast ones elsewhere
    disk.syncs = [(100.0, 0.001), (104.9, 0.3), (110.0, 0.002)]
    slow = [(100.5, 0.06), (105.0, 0.09), (105.1, 0.12)]
    found = stalls(slow, 100.0, disk)
    assert [s["slow_disk"] for s in found] == [False, True]
    summary = disk_summary(disk.durations(100.0, 111.0))
    assert summary["count"] == 3 and summary["slow"] == 1 and summary["max"] == 300.0


def test_the_matrix_says_which_stalls_were_the_disk_and_how_slow_it_was() -> None:
    result: dict[str, Any] = {
        "stalls": [{"decisions": 3, "slow_disk": True}, {"decisions": 2, "slow_disk": False}],
        "disk_sync_ms": {"count": 3, "p99": 120.0, "max": 300.0},
    }
    assert _stall_summary(result) == "2 (1 disk): 5"
    assert _disk(result) == "120.0/300.0"
    assert _stall_summary({"stalls": [{"decisions": 4}]}) == "1: 4"  # disk not probed
    assert _disk({"disk_sync_ms": None}) == "-"


def test_the_disk_probe_syncs_a_file_of_its_own_and_removes_it(tmp_path: Any) -> None:
    with DiskProbe(tmp_path, interval=0.001) as disk:
        deadline = time.monotonic() + 10
        while not disk.syncs and time.monotonic() < deadline:
            time.sleep(0.001)  # polling a thread's list: the first sync takes milliseconds
    assert disk.syncs and all(took >= 0 for _, took in disk.syncs)
    assert list(tmp_path.iterdir()) == []


# -- CPU per decision, broker counters, Canopy against the floor ---------------------------------

BROKER_PAGE = """\
# TYPE rabbitmq_global_messages_received_total counter
# HELP rabbitmq_global_messages_received_total Total number of messages received from publishers
rabbitmq_global_messages_received_total{protocol="amqp091"} 1200
# TYPE rabbitmq_global_messages_delivered_total counter
# HELP rabbitmq_global_messages_delivered_total Total number of messages delivered to consumers
rabbitmq_global_messages_delivered_total{protocol="amqp091",queue_type="rabbit_classic_queue"} 300
rabbitmq_global_messages_delivered_total{protocol="amqp091",queue_type="rabbit_quorum_queue"} 700
# TYPE rabbitmq_global_messages_delivered_consume_manual_ack_total counter
# HELP rabbitmq_global_messages_delivered_consume_manual_ack_total Manual-ack deliveries
rabbitmq_global_messages_delivered_consume_manual_ack_total{protocol="amqp091"} 999
# TYPE rabbitmq_global_messages_confirmed_total counter
# HELP rabbitmq_global_messages_confirmed_total Total number of messages confirmed to publishers
rabbitmq_global_messages_confirmed_total{protocol="amqp091"} 1100
# TYPE rabbitmq_queue_messages gauge
# HELP rabbitmq_queue_messages Sum of ready and unacknowledged messages
rabbitmq_queue_messages 5
"""


def test_broker_counters_are_summed_over_their_labels() -> None:
    assert parse_counters(BROKER_PAGE) == {
        "received": 1200.0,
        "delivered": 1000.0,  # not the manual-ack family, which counts the same deliveries
        "confirmed": 1100.0,
    }
    assert parse_counters("# nothing here\n") == {}


def test_broker_messages_per_decision() -> None:
    start = {"received": 1000.0, "delivered": 500.0, "confirmed": 900.0}
    end = {"received": 1600.0, "delivered": 1700.0}
    assert broker_per_decision(start, end, 200) == {"received": 3.0, "delivered": 6.0}
    assert broker_per_decision(None, end, 200) is None
    assert broker_per_decision(start, end, 0) is None


def sample(at: float, cpu: dict[str, float]) -> Sample:
    return Sample(at, cpu, dict.fromkeys(cpu, 2**20), 0.0, 0.0)


def test_cpu_per_decision_sums_the_stack_without_the_load_generator() -> None:
    start = sample(10.0, {"gateway": 1.0, "rabbitmq": 5.0, "loadgen": 0.0, "mongodb": 2.0})
    end = sample(30.0, {"gateway": 3.0, "rabbitmq": 6.5, "loadgen": 9.0, "timers": 1.0})
    processes = usage(start, end)
    assert processes["gateway"] == {"cpu_pct": 10.0, "cpu_s": 2.0, "rss_mib": 1.0}
    assert set(processes) == {"gateway", "rabbitmq", "loadgen"}  # a role in both samples
    # (2.0 + 1.5) s over 4,000 decisions = 0.875 ms each; the load generator's 9 s not counted
    assert stack_cpu_per_decision(processes, 4000) == (0.875, ["gateway", "rabbitmq"])
    assert stack_cpu_per_decision(processes, 0) == (None, ["gateway", "rabbitmq"])
    assert stack_cpu_per_decision({}, 100) == (None, [])


def run_result(p50: float, p99: float, cpu: float | None, lost: int = 0) -> dict[str, Any]:
    return {
        "params": {"participants": 100, "rate": 2.0},
        "latency_ms": {"count": 4000, "p50": p50, "p99": p99, "max": 2 * p99},
        "processes": {"floor": {"cpu_pct": 4.0, "cpu_s": 0.8, "rss_mib": 30.0}},
        "cpu_ms_per_decision": cpu,
        "lost": lost,
        "ok": lost == 0,
        "sends_per_s": 200.0,
    }


def test_canopy_is_reported_as_a_multiple_of_the_floor() -> None:
    assert ratio(12.0, 3.0) == 4.0
    assert ratio(10.0, 3.0) == 3.3
    assert ratio(None, 3.0) is None
    assert ratio(5.0, None) is None
    assert ratio(5.0, 0.0) is None
    canopy = run_result(p50=3.0, p99=9.9, cpu=1.5)
    attach_floor(canopy, run_result(p50=0.5, p99=1.1, cpu=0.2))
    assert canopy["vs_floor"] == {"p50": 6.0, "p99": 9.0, "cpu_per_decision": 7.5}
    assert canopy["floor"]["p99"] == 1.1
    assert canopy["floor"]["cpu_pct"] == 4.0
    assert canopy["floor"]["ok"]
    text = format_versus_floor(canopy)
    assert "one-process floor" in text and "9x" in text and "7.5x" in text
    assert format_versus_floor(run_result(1.0, 2.0, None)) == ""
