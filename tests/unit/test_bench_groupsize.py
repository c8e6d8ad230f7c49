"""Pure pieces of the group-size rows (bench/groupsize.py) and what they need of the load
generator: how the rows' groups and rates are derived, bimatrix decisions that carry their seq,
CPU per input net of the idle stack, and a large group's broadcasts checked through the
senders in flight only."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from bench.groupsize import (
    GroupSizeRow,
    attach_ratios,
    format_group_sizes,
    group_size_rows,
    summarize,
)
from bench.loadgen import (
    DECISION_SCALE,
    FULL_SCAN_MAX,
    Participant,
    Stats,
    decision_payload,
    decision_seq,
)


def test_every_row_has_the_same_total_rate_and_participants() -> None:
    rows = group_size_rows((2, 50, 500), participants=500, total_rate=10.0)
    assert rows == [
        GroupSizeRow(size=2, groups=250, rate=0.02),
        GroupSizeRow(size=50, groups=10, rate=0.02),
        GroupSizeRow(size=500, groups=1, rate=0.02),
    ]
    assert {row.participants for row in rows} == {500}
    assert all(row.total_rate == pytest.approx(10.0) for row in rows)


def test_a_size_beyond_the_participants_is_one_group_at_the_same_total_rate() -> None:
    rows = group_size_rows((2, 50, 500), participants=120, total_rate=12.0)
    assert [(r.groups, r.size) for r in rows] == [(60, 2), (2, 50), (1, 500)]
    assert [r.rate for r in rows] == pytest.approx([0.1, 0.12, 0.024])
    assert all(row.total_rate == pytest.approx(12.0) for row in rows)
    with pytest.raises(ValueError, match="at least 2"):
        group_size_rows((1, 50))
    with pytest.raises(ValueError, match="total rate"):
        group_size_rows((2,), total_rate=0)


@pytest.mark.parametrize("experiment", sorted(DECISION_SCALE))
def test_a_decision_carries_its_seq_within_the_experiments_bounds(experiment: str) -> None:
    scale = DECISION_SCALE[experiment]
    for seq in (1, 2, 3, 7, 999, 123_457, 1_000_000):
        value = orjson.loads(decision_payload(seq, scale))
        assert decision_seq(value, scale) == seq
        if experiment == "bimatrix":
            assert isinstance(value, float) and 0 < value <= 1


def load_result(size: int, decisions_s: float, gateway_s: float, idle: bool) -> dict[str, Any]:
    return {
        "params": {"size": size, "groups": 500 // size, "rate": 0.02, "experiment": "bimatrix"},
        "sent_measured": 300,
        "frames_measured": 300 * (size + 1),
        "frame_bytes_measured": 300 * (size + 1) * 27 * size,
        "window_s": 30.0,
        "sends_per_s": 10.0,
        "latency_ms": {"p50": 4.0 * size, "p99": 8.0 * size},
        "lost": 0,
        "cpu_ms_per_decision": round((decisions_s + gateway_s) / 300 * 1000, 3),
        "processes": {
            "decisions": {"cpu_s": decisions_s},
            "gateway": {"cpu_s": gateway_s},
            "loadgen": {"cpu_s": 3.0},
        },
        # 5 s idle: decisions 0.1 s (0.6 s over the 30 s window), gateway 0.05 (0.3)
        "idle_processes": {
            "seconds": 5.0,
            "roles": {"decisions": {"cpu_s": 0.1}, "gateway": {"cpu_s": 0.05}},
        }
        if idle
        else {},
    }


def test_cpu_per_input_is_net_of_the_idle_stack_and_compared_with_groups_of_2() -> None:
    small = summarize(load_result(2, decisions_s=0.9, gateway_s=0.6, idle=True))
    large = summarize(load_result(500, decisions_s=1.5, gateway_s=30.3, idle=True))
    # (0.9 - 0.6) s over 300 inputs; gross 0.9 / 300
    assert small["decisions_ms_per_input_net"] == 1.0
    assert small["decisions_ms_per_input"] == 3.0
    assert small["stack_ms_per_input_net"] == 2.0  # (0.3 + 0.3) / 300
    assert small["frames_per_input"] == 3.0
    assert small["gateway_us_per_frame_net"] == round(0.3 / 900 * 1e6, 3)
    assert large["decisions_ms_per_input_net"] == 3.0  # (1.5 - 0.6) / 300
    assert large["bytes_per_frame"] == 27 * 500
    attach_ratios([small, large])
    assert large["size_ratio"] == 250.0
    assert large["vs_first"]["decisions_ms_per_input_net"] == 3.0
    assert large["vs_first"]["p99_ms"] == 250.0
    assert small["vs_first"]["stack_ms_per_input_net"] == 1.0
    # without an idle window, the gross CPU
    assert summarize(load_result(2, 0.9, 0.6, idle=False))["decisions_ms_per_input_net"] == 3.0
    rows = [load_result(2, 0.9, 0.6, True), load_result(500, 1.5, 30.3, True)]
    for row, summary in zip(rows, (small, large), strict=True):
        row["group_size"] = summary
    text = format_group_sizes(rows)
    assert "bimatrix" in text and "1x500 @ 0.02 Hz" in text and "250x" in text and "3x" in text


class Wire:
    """A transport that keeps what was written."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False


def group(size: int, stats: Stats) -> list[Participant]:
    members = {
        f"P{i:03d}": Participant("127.0.0.1", 1, f"/ws/k{i}", f"P{i:03d}", stats)
        for i in range(size)
    }
    waiting: dict[str, Participant] = {}
    for member in members.values():
        member.members, member.waiting = members, waiting
        member._transport = Wire()  # type: ignore[assignment]
    return list(members.values())


def broadcast(members: list[Participant], values: dict[str, int], scale: int) -> None:
    frame = {
        "channel": "group_decisions",
        "payload": {code: value / scale for code, value in values.items()},
    }
    raw = orjson.dumps(frame)
    for member in members:
        member.on_message(raw, 1.0)


@pytest.mark.parametrize("size", [4, FULL_SCAN_MAX + 1, 500])
async def test_every_member_seeing_a_decision_completes_it_in_small_and_large_groups(
    size: int,
) -> None:
    scale = DECISION_SCALE["bimatrix"]
    stats = Stats(size=size, scale=scale, measure_from=0.0)
    members = group(size, stats)
    sender, other = members[0], members[-1]
    sender.send_decision()
    other.send_decision()
    other.send_decision()
    assert set(sender.waiting) == {sender.code, other.code}
    values = dict.fromkeys((m.code for m in members), 0)
    broadcast(members, values | {sender.code: 1, other.code: 1}, scale)
    assert len(stats.latencies) == 2 and set(sender.waiting) == {other.code}
    broadcast(members, values | {sender.code: 1, other.code: 2}, scale)
    assert len(stats.latencies) == 3 and not sender.waiting
    assert not sender.pending and not other.pending
    assert stats.backwards == 0
