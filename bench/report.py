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


def format_run(result: dict[str, Any]) -> str:
    """The terminal report of one run."""
    p = result["params"]
    lat = result["latency_ms"]
    ack = result["ack_ms"]
    export = result["export"]
    queue = result["store_queue"]
    stack = result.get("stack") or {}
    lines = [
        f"Canopy bench  {p['groups']} groups x {p['size']} = {p['participants']} participants, "
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
                    "complete" if export["complete"] else f"MISSING {export['missing']}",
                    export["wait_s"],
                    f"{_fmt(queue.get('max'))}/{_fmt(queue.get('at_end'))}",
                ]
            ],
        ),
    ]
    processes = result.get("processes") or {}
    if processes:
        roles = [r for r in ROLE_ORDER if r in processes]
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
                ],
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
                f"at {s['at_s']} s: {s['decisions']} up to {s['worst_ms']:g} ms" for s in worst
            ),
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
    """'<stalls>: <slow decisions>' for the matrix, e.g. '2: 340'."""
    stall_list = result.get("stalls") or []
    return f"{len(stall_list)}: {sum(s['decisions'] for s in stall_list)}"


def measured_count(result: dict[str, Any]) -> int:
    """How many decisions were measured."""
    return int(result["latency_ms"].get("count") or 0)


def format_matrix(results: Sequence[dict[str, Any]]) -> str:
    """One row per target of the matrix, with the target p99 and PASS / MISS."""
    rows = []
    cpu_rows = []
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
        ],
        rows,
    )
    cpu = table(
        ["N", "Hz", *(f"{ROLE_SHORT[x]} cpu%/MiB" for x in ROLE_ORDER), "machine cpu%"],
        cpu_rows,
    )
    return f"Latency send → all members (ms)\n{main}\n\nProcesses\n{cpu}"


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
