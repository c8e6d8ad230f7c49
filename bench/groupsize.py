"""The group-size rows of `python -m bench --group-sizes` (PROTOCOL v2: "work per input grows
at most linearly with `group_size`"): the same participants, the same total decision rate, in
groups of 2, 50 and 500, so that only the group size changes between rows.

What grows with N by construction, and what must not grow faster:

- Each decision is broadcast to every member of its group (`rate_limit` 0: every change goes
  out), and `group_decisions` carries the whole group's map. So an input costs N frames of
  O(N) bytes each on the way out: frames per input and bytes per frame both grow with N, and
  the gateway's CPU per input with them. That is the contract, not a defect; the rows report
  the gateway's CPU **per delivered frame** (and the frame's size) instead.
- The decisions service's work per input (validate, payoffs: O(N) for `bimatrix` since issue
  18, O(N²) before; the size check, the accrual, encoding one broadcast and one log row of
  O(N) bytes) must grow **at most linearly**: the rows report its CPU per input, net of the
  stack's idle CPU (an `idle` window before the load in which nobody sends), and the ratio
  against groups of 2 next to N / 2.

Why the rate is low (10 decisions/s in all by default: 500 participants at 0.02 Hz): one input
in a group of 500 makes 500 frames of ~12 KB. At 10 inputs/s that is 5,000 frames (~60 MB) a
second that the load generator, on the same 2 cores, must read and parse; at the 200/s of the
other rows it would be 100,000 frames and 1.2 GB a second. The stack's idle CPU is a large
share of CPU per input at 10/s, hence the net numbers. The one-process floor is not run here
(it knows no `bimatrix`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bench.report import _fmt, table

GROUP_SIZES = (2, 50, 500)
PARTICIPANTS = 500
TOTAL_RATE = 10.0  # decisions/s of the whole session, every row
DURATION = 30.0
IDLE = 5.0
EXPERIMENT = "bimatrix"


@dataclass(frozen=True)
class GroupSizeRow:
    """One row: `groups` groups of `size`, each member deciding at `rate` Hz."""

    size: int
    groups: int
    rate: float

    @property
    def participants(self) -> int:
        return self.groups * self.size

    @property
    def total_rate(self) -> float:
        return self.participants * self.rate


def group_size_rows(
    sizes: Sequence[int] = GROUP_SIZES,
    participants: int = PARTICIPANTS,
    total_rate: float = TOTAL_RATE,
) -> list[GroupSizeRow]:
    """As many whole groups of each size as `participants` holds (at least one), each member at
    the rate that makes `total_rate` decisions/s in all: every row has the same total rate, and
    the same participants when `participants` is a multiple of every size."""
    if total_rate <= 0:
        raise ValueError("the total rate must be > 0")
    rows = []
    for size in sizes:
        if size < 2:
            raise ValueError("group sizes must be at least 2 (bimatrix needs two players)")
        groups = max(1, participants // size)
        rows.append(GroupSizeRow(size, groups, total_rate / (groups * size)))
    return rows


def _per(amount: float | None, count: int, scale: float) -> float | None:
    if amount is None or count <= 0:
        return None
    return round(amount / count * scale, 3)


def _net_cpu_s(result: dict[str, Any], role: str) -> float | None:
    """The role's CPU seconds over the measured window less what it spends idle in as long
    (`idle_processes`); its gross CPU when idle was not measured."""
    spent = (result.get("processes") or {}).get(role, {}).get("cpu_s")
    if spent is None:
        return None
    idle = result.get("idle_processes") or {}
    idle_cpu = (idle.get("roles") or {}).get(role, {}).get("cpu_s")
    if idle_cpu is None or not idle.get("seconds"):
        return float(spent)
    return float(spent) - float(idle_cpu) / float(idle["seconds"]) * float(result["window_s"])


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """A run's numbers as the group-size table shows them (ms per input, µs per frame)."""
    inputs = int(result["sent_measured"])
    frames = int(result["frames_measured"])
    processes = result.get("processes") or {}
    roles = [r for r in processes if r != "loadgen"]
    net = {r: _net_cpu_s(result, r) for r in roles}
    stack_net = sum(v for v in net.values() if v is not None) if roles else None
    lat = result["latency_ms"]
    return {
        "size": result["params"]["size"],
        "inputs": inputs,
        "inputs_per_s": result["sends_per_s"],
        "p50_ms": lat["p50"],
        "p99_ms": lat["p99"],
        "lost": result["lost"],
        "decisions_ms_per_input": _per(processes.get("decisions", {}).get("cpu_s"), inputs, 1000),
        "decisions_ms_per_input_net": _per(net.get("decisions"), inputs, 1000),
        "stack_ms_per_input": result.get("cpu_ms_per_decision"),
        "stack_ms_per_input_net": _per(stack_net, inputs, 1000),
        "frames_per_input": _per(frames, inputs, 1),
        "bytes_per_frame": _per(result["frame_bytes_measured"], frames, 1),
        "gateway_us_per_frame_net": _per(net.get("gateway"), frames, 1e6),
        "loadgen_us_per_frame": _per(processes.get("loadgen", {}).get("cpu_s"), frames, 1e6),
    }


RATIO_KEYS = (
    "p50_ms",
    "p99_ms",
    "decisions_ms_per_input_net",
    "stack_ms_per_input_net",
    "gateway_us_per_frame_net",
)


def attach_ratios(summaries: Sequence[dict[str, Any]]) -> None:
    """`vs_first`: each summary's RATIO_KEYS as multiples of the first row's (groups of 2),
    and `size_ratio` (N / the first row's N: what linear growth would be)."""
    if not summaries:
        return
    first = summaries[0]
    for summary in summaries:
        summary["size_ratio"] = round(summary["size"] / first["size"], 1)
        summary["vs_first"] = {
            key: None
            if summary[key] is None or not first[key] or first[key] <= 0
            else round(summary[key] / first[key], 2)
            for key in RATIO_KEYS
        }


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:g}x"


def format_group_sizes(results: Sequence[dict[str, Any]]) -> str:
    """The table: one row per group size, ratios against the first (groups of 2)."""
    rows = []
    for result in results:
        s = result["group_size"]
        p = result["params"]
        vs = s.get("vs_first") or {}
        rows.append(
            [
                s["size"],
                f"{p['groups']}x{p['size']} @ {p['rate']:g} Hz",
                s["inputs_per_s"],
                s["p50_ms"],
                s["p99_ms"],
                s["lost"],
                _fmt(s["decisions_ms_per_input_net"], 3),
                _fmt(s["decisions_ms_per_input"], 3),
                _x(vs.get("decisions_ms_per_input_net")),
                _x(s.get("size_ratio")),
                _fmt(s["stack_ms_per_input_net"], 2),
                _fmt(s["stack_ms_per_input"], 2),
                _x(vs.get("stack_ms_per_input_net")),
                s["frames_per_input"],
                _fmt(s["bytes_per_frame"], 0),
                _fmt(s["gateway_us_per_frame_net"], 1),
                _x(vs.get("gateway_us_per_frame_net")),
                _fmt(s["loadgen_us_per_frame"], 1),
            ]
        )
    experiment = results[0]["params"].get("experiment", "decisions") if results else "-"
    return (
        f"Group sizes ({experiment}, same total decision rate; CPU net of the idle stack, "
        "gross next to it; x = against the first row)\n"
        + table(
            [
                "N",
                "groups",
                "inputs/s",
                "p50",
                "p99",
                "lost",
                "dec ms/in",
                "gross",
                "x",
                "N x",
                "stack ms/in",
                "gross",
                "x",
                "frames/in",
                "B/frame",
                "gw us/frame",
                "x",
                "load us/frame",
            ],
            rows,
        )
    )
