"""What the benchmark prints and stores: the progress bar, the terminal tables, the JSON lines.

Every run (and every micro-benchmark) is one JSON object appended as a line to
`bench/results/<UTC date>.jsonl`, with the parameters, all numbers, the git commit and the
machine, so runs can be compared across commits.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import orjson

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = PROJECT_ROOT / "bench" / "results"
ROLE_ORDER = ("gateway", "decisions", "timers", "store", "rabbitmq", "mongodb", "loadgen")
ROLE_SHORT = {
    "gateway": "gw",
    "decisions": "dec",
    "timers": "tim",
    "store": "store",
    "rabbitmq": "rmq",
    "mongodb": "mongo",
    "loadgen": "load",
}


# -- metadata -----------------------------------------------------------------------------------


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def repo_commit() -> str | None:
    """`git rev-parse --short HEAD`, with `+dirty` when the work tree has changes."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if status else commit


def machine_info() -> dict[str, Any]:
    model = None
    mem_mib = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_mib = int(line.split()[1]) // 1024
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "mem_mib": mem_mib,
        "hostname": os.uname().nodename,
        "python": sys.version.split()[0],
    }


def append_result(result: dict[str, Any], results_dir: Path = RESULTS_DIR) -> Path:
    """Append `result` as one line to `<results_dir>/<UTC date>.jsonl`; return the file."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{datetime.now(UTC):%Y-%m-%d}.jsonl"
    with path.open("ab") as f:
        f.write(orjson.dumps(result) + b"\n")
    return path


# -- progress -----------------------------------------------------------------------------------


class ProgressBar:
    """One status line on stderr, redrawn in place on a terminal; elsewhere one line per phase
    change (so logs and CI output stay short)."""

    WIDTH = 24

    def __init__(self, stream: TextIO = sys.stderr, prefix: str = "") -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._phase = ""
        self._prefix = prefix
        self._drawn = False

    def __call__(self, phase: str, fraction: float | None, text: str) -> None:
        if self._tty:
            bar = ""
            if fraction is not None:
                filled = round(self.WIDTH * max(0.0, min(1.0, fraction)))
                bar = f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] "
            line = f"{self._prefix}{phase:<8} {bar}{text}"
            self._stream.write(f"\r\x1b[2K{line}")
            self._drawn = True
        elif phase != self._phase:
            self._stream.write(f"{self._prefix}{phase}: {text}\n")
        self._phase = phase
        self._stream.flush()

    def done(self) -> None:
        if self._tty and self._drawn:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()
        self._drawn = False
        self._phase = ""


# -- tables -------------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [
        "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _errors(result: dict[str, Any]) -> str:
    errors = result.get("errors") or {}
    return ",".join(f"{k}:{v}" for k, v in sorted(errors.items())) or "0"


# -- Canopy against the one-process floor --------------------------------------------------------


def ratio(value: float | None, floor: float | None, digits: int = 1) -> float | None:
    """value / floor (how many times the floor), None when either is missing or the floor 0."""
    if value is None or floor is None or floor <= 0:
        return None
    return round(value / floor, digits)


def floor_summary(floor: dict[str, Any]) -> dict[str, Any]:
    """What a Canopy row keeps of the floor's run with the same parameters (the floor's whole
    result is a JSON line of its own, `"kind": "floor"`)."""
    lat = floor["latency_ms"]
    processes = floor.get("processes") or {}
    return {
        "count": lat["count"],
        "p50": lat["p50"],
        "p99": lat["p99"],
        "max": lat["max"],
        "lost": floor["lost"],
        "ok": floor["ok"],
        "cpu_pct": (processes.get("floor") or {}).get("cpu_pct"),
        "cpu_ms_per_decision": floor.get("cpu_ms_per_decision"),
        "sends_per_s": floor["sends_per_s"],
        "machine_cpu": floor.get("machine_cpu") or {},  # how busy the machine was meanwhile
    }


def attach_floor(result: dict[str, Any], floor: dict[str, Any]) -> None:
    """Add `floor` (its summary) and `vs_floor` (Canopy as a multiple of the floor) to a
    Canopy result."""
    summary = floor_summary(floor)
    lat = result["latency_ms"]
    result["floor"] = summary
    result["vs_floor"] = {
        "p50": ratio(lat["p50"], summary["p50"]),
        "p99": ratio(lat["p99"], summary["p99"]),
        "cpu_per_decision": ratio(
            result.get("cpu_ms_per_decision"), summary["cpu_ms_per_decision"]
        ),
    }


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:g}x"


def _bus(result: dict[str, Any]) -> str:
    """'<received>/<delivered>' broker messages per decision, '-' when not measured."""
    broker = result.get("broker") or {}
    if "received" not in broker or "delivered" not in broker:
        return "-"
    return f"{broker['received']:.1f}/{broker['delivered']:.1f}"


def format_versus_floor(result: dict[str, Any]) -> str:
    """Canopy, the floor, and Canopy / floor, for one row."""
    floor = result.get("floor")
    if not floor:
        return ""
    lat = result["latency_ms"]
    vs = result.get("vs_floor") or {}
    return table(
        ["send → all members", "n", "p50 ms", "p99 ms", "max ms", "lost", "CPU ms/decision"],
        [
            [
                "Canopy",
                lat["count"],
                lat["p50"],
                lat["p99"],
                lat["max"],
                result["lost"],
                _fmt(result.get("cpu_ms_per_decision"), 2),
            ],
            [
                "one-process floor",
                floor["count"],
                floor["p50"],
                floor["p99"],
                floor["max"],
                floor["lost"],
                _fmt(floor.get("cpu_ms_per_decision"), 2),
            ],
            [
                "Canopy / floor",
                "",
                _times(vs.get("p50")),
                _times(vs.get("p99")),
                "",
                "",
                _times(vs.get("cpu_per_decision")),
            ],
        ],
    )


def _idle_row(result: dict[str, Any], roles: Sequence[str]) -> list[list[Any]]:
    """The processes' CPU while everyone was connected and nobody sent (`--idle`), as a row
    of the processes table; none when it was not measured."""
    idle = (result.get("idle_processes") or {}).get("roles") or {}
    if not idle:
        return []
    stack = sum(v["cpu_pct"] for r, v in idle.items() if r != "loadgen")
    return [
        [
            "idle CPU %",
            *(idle.get(r, {}).get("cpu_pct", "") for r in roles),
            f"stack {stack:.1f}",
            "",
        ]
    ]


def format_run(result: dict[str, Any]) -> str:
    """The terminal report of one run."""
    p = result["params"]
    lat = result["latency_ms"]
    ack = result["ack_ms"]
    export = result["export"]
    queue = result["store_queue"]
    stack = result.get("stack") or {}
    name = "one-process floor" if result.get("target") == "floor" else "Canopy"
    if export.get("skipped"):
        export_cell, lag_cell = "skipped", "-"
    else:
        export_cell = "complete" if export["complete"] else f"MISSING {export['missing']}"
        lag_cell = export["wait_s"]
    lines = [
        f"{name} bench  {p['groups']} groups x {p['size']} = {p['participants']} participants, "
        f"{p['rate']:g} Hz, {p['duration']:g} s (+{p['warmup']:g} s warmup, jitter "
        f"{p['jitter']:g}); stack: {', '.join(f'{k}={v}' for k, v in stack.items()) or '-'}",
        "",
        table(
            ["latency ms", "n", "p50", "p90", "p99", "p99.9", "max"],
            [
                [
                    "send → all members",
                    lat["count"],
                    lat["p50"],
                    lat["p90"],
                    lat["p99"],
                    lat["p99.9"],
                    lat["max"],
                ],
                [
                    "send → ack",
                    ack["count"],
                    ack["p50"],
                    ack["p90"],
                    ack["p99"],
                    ack["p99.9"],
                    ack["max"],
                ],
            ],
        ),
        "",
        table(
            [
                "sent",
                "acked",
                "lost",
                "unacked",
                "errors",
                "dups",
                "disc",
                "sends/s",
                "bcasts/s",
                "export",
                "store lag s",
                "store q max/end",
            ],
            [
                [
                    result["sent"],
                    result["acked"],
                    result["lost"],
                    result["unacked"],
                    _errors(result),
                    result["duplicates"],
                    result["disconnects"],
                    result["sends_per_s"],
                    result["broadcasts_per_s"],
                    export_cell,
                    lag_cell,
                    f"{_fmt(queue.get('max'))}/{_fmt(queue.get('at_end'))}",
                ]
            ],
        ),
    ]
    processes = result.get("processes") or {}
    if processes:
        roles = [r for r in (*ROLE_ORDER, "floor") if r in processes]
        machine = result.get("machine_cpu") or {}
        lines += [
            "",
            table(
                ["process", *roles, "machine", "other"],
                [
                    [
                        "CPU % of a core",
                        *(processes[r]["cpu_pct"] for r in roles),
                        machine.get("busy_pct"),
                        machine.get("other_pct"),
                    ],
                    ["RSS MiB", *(processes[r]["rss_mib"] for r in roles), "", ""],
                    *_idle_row(result, roles),
                ],
            ),
        ]
    per_decision = result.get("cpu_ms_per_decision")
    if per_decision is not None:
        broker = result.get("broker")
        counts = (
            "not measured (no rabbitmq_prometheus)"
            if not broker
            else ", ".join(f"{k} {v:g}" for k, v in broker.items())
        )
        lines += [
            "",
            f"CPU per decision: {per_decision:.2f} ms ({'+'.join(result.get('cpu_roles') or [])}"
            f", load generator excluded)"
            + (
                ""
                if result.get("target") == "floor"
                else f"   broker messages per decision: {counts}"
            ),
        ]
    stall_list = result.get("stalls") or []
    if stall_list:
        slow = sum(s["decisions"] for s in stall_list)
        worst = sorted(stall_list, key=lambda s: -s["decisions"])[:4]
        lines += [
            "",
            f"decisions over 50 ms: {slow} ({100 * slow / max(1, measured_count(result)):.2f} %), "
            f"in {len(stall_list)} stall(s); largest: "
            + ", ".join(
                f"at {s['at_s']} s: {s['decisions']} up to {s['worst_ms']:g} ms"
                + (" (disk slow)" if s.get("slow_disk") else "")
                for s in worst
            ),
        ]
        if any("slow_disk" in s for s in stall_list):
            lines.append(
                f"stalls while a disk sync took over 50 ms: {_disk_stalls(stall_list)} of "
                f"{len(stall_list)}"
            )
    disk = result.get("disk_sync_ms")
    if disk and disk.get("count"):
        lines += [
            "",
            f"disk (fdatasync of 4 KiB every 100 ms where the stack keeps its data): "
            f"p50 {_fmt(disk['p50'], 2)} ms, p99 {_fmt(disk['p99'], 2)} ms, "
            f"max {_fmt(disk['max'], 2)} ms, "
            f"{disk['slow']} of {disk['count']} over 50 ms",
        ]
    lines += [
        "",
        f"gateway memory per connected participant: "
        f"{_fmt(result.get('mem_per_participant_kib'))} KiB   "
        f"connect + period_start: {result['connect_s']} s   "
        f"send lag p99 {_fmt(result['send_lag_ms']['p99'])} ms   "
        f"result: {'OK' if result['ok'] else 'PROBLEMS (see above)'}",
    ]
    return "\n".join(lines)


def _stall_summary(result: dict[str, Any]) -> str:
    """'<stalls>: <slow decisions>' for the matrix, e.g. '2: 340', with how many of the
    stalls a slow disk sync overlapped when the disk was probed, e.g. '3 (2 disk): 340'."""
    stall_list = result.get("stalls") or []
    on_disk = _disk_stalls(stall_list)
    disk = f" ({on_disk} disk)" if on_disk else ""
    return f"{len(stall_list)}{disk}: {sum(s['decisions'] for s in stall_list)}"


def _disk_stalls(stall_list: list[dict[str, Any]]) -> int:
    """How many stalls a slow disk sync overlapped."""
    return sum(1 for s in stall_list if s.get("slow_disk"))


def _disk(result: dict[str, Any]) -> str:
    """The disk probe's p99 / max sync in ms over the window, '-' if not probed."""
    disk = result.get("disk_sync_ms") or {}
    if not disk.get("count"):
        return "-"
    return f"{_fmt(disk['p99'], 1)}/{_fmt(disk['max'], 1)}"


def measured_count(result: dict[str, Any]) -> int:
    """How many decisions were measured."""
    return int(result["latency_ms"].get("count") or 0)


def format_matrix(results: Sequence[dict[str, Any]]) -> str:
    """One row per target of the matrix, with the target p99 and PASS / MISS."""
    rows = []
    cpu_rows = []
    floor_rows: list[list[Any]] = []
    for r in results:
        p = r["params"]
        target = r.get("target_p99_ms")
        p99 = r["latency_ms"]["p99"]
        verdict = "PASS" if r.get("pass") else "MISS"
        rows.append(
            [
                p["participants"],
                f"{p['rate']:g}",
                r["latency_ms"]["p50"],
                p99,
                target,
                verdict,
                r["latency_ms"]["max"],
                _stall_summary(r),
                r["lost"],
                _errors(r),
                r["duplicates"],
                r["sends_per_s"],
                r["broadcasts_per_s"],
                r["export"]["wait_s"],
                r["store_queue"].get("max"),
                r.get("mem_per_participant_kib"),
                _fmt(r.get("cpu_ms_per_decision"), 2),
                _bus(r),
            ]
        )
        floor = r.get("floor") or {}
        vs = r.get("vs_floor") or {}
        floor_rows.append(
            [
                p["participants"],
                f"{p['rate']:g}",
                r["latency_ms"]["p50"],
                p99,
                floor.get("p50"),
                floor.get("p99"),
                _times(vs.get("p50")),
                _times(vs.get("p99")),
                _fmt(r.get("cpu_ms_per_decision"), 2),
                _fmt(floor.get("cpu_ms_per_decision"), 2),
                _times(vs.get("cpu_per_decision")),
                floor.get("lost"),
            ]
        )
        processes = r.get("processes") or {}
        cpu_rows.append(
            [
                p["participants"],
                f"{p['rate']:g}",
                *(
                    f"{processes[x]['cpu_pct']:.0f}/{processes[x]['rss_mib']:.0f}"
                    if x in processes
                    else "-"
                    for x in ROLE_ORDER
                ),
                (r.get("machine_cpu") or {}).get("busy_pct"),
                _disk(r),
            ]
        )
    main = table(
        [
            "N",
            "Hz",
            "p50",
            "p99",
            "target",
            "",
            "max",
            "stalls >50ms",
            "lost",
            "errors",
            "dups",
            "sends/s",
            "bcasts/s",
            "store lag s",
            "store q max",
            "KiB/part",
            "CPU ms/dec",
            "bus rcv/dlv per dec",
        ],
        rows,
    )
    cpu = table(
        [
            "N",
            "Hz",
            *(f"{ROLE_SHORT[x]} cpu%/MiB" for x in ROLE_ORDER),
            "machine cpu%",
            "disk sync p99/max ms",
        ],
        cpu_rows,
    )
    text = f"Latency send → all members (ms)\n{main}\n\nProcesses\n{cpu}"
    if any(r.get("floor") for r in results):
        versus = table(
            [
                "N",
                "Hz",
                "p50",
                "p99",
                "floor p50",
                "floor p99",
                "x p50",
                "x p99",
                "CPU ms/dec",
                "floor CPU ms/dec",
                "x CPU",
                "floor lost",
            ],
            floor_rows,
        )
        text += f"\n\nCanopy against the one-process floor (same load, same machine)\n{versus}"
    return text


def format_micro(result: dict[str, Any]) -> str:
    rows = []
    for name, numbers in result["results"].items():
        rows.append(
            [
                name,
                numbers.get("unit", ""),
                numbers.get("n"),
                numbers.get("p50"),
                numbers.get("p99"),
                numbers.get("mean"),
                numbers.get("per_s"),
            ]
        )
    return "Micro-benchmarks (single-hop costs)\n" + table(
        ["what", "unit", "n", "p50", "p99", "mean", "per s"], rows
    )
