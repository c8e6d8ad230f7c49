"""CPU time and memory of the stack's processes, read from /proc (Linux only, no psutil).

A *role* (gateway, decisions, timers, store, rabbitmq, mongodb, loadgen, and floor: the
one-process floor of bench/floor.py) is one process; for RabbitMQ its CPU time includes its
live descendants (erl_child_setup, inet_gethost). CPU is reported as % of one core averaged
between two samples, so a saturated single-threaded service shows ~100 % and RabbitMQ
(multi-threaded) may show more, and as CPU seconds, whose sum over the stack divided by the
decisions sent is the CPU per decision. RSS is the root's resident set.

Finding the processes: for a stack this program started, the caller knows the pids. For a
running one (`--url`), the gateway is the `-m services.gateway` process whose environment has
`CANOPY_GATEWAY_PORT=<port>`; everything else carries the same `DEVSTACK_RUN_DIR` marker as
the gateway (see devstack/infra.py). Without a marker, processes are matched by command line
alone and only when the match is unambiguous.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
MARKER_ENV = b"DEVSTACK_RUN_DIR"
SERVICE_ROLES = ("gateway", "decisions", "timers", "store")
ROLES = (*SERVICE_ROLES, "rabbitmq", "mongodb", "loadgen", "floor")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Field 2 (comm) may hold spaces and parentheses: split after the last ")".
    return text.rpartition(")")[2].split()


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process (None if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime (fields 14, 15)


def rss_bytes(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def descendants(pid: int) -> list[int]:
    """Live descendants of `pid` (via /proc/<pid>/task/<tid>/children)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = list(Path(f"/proc/{parent}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                found.append(child)
                stack.append(child)
    return found


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already included in user
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


@dataclass
class Sample:
    at: float
    cpu: dict[str, float]
    rss: dict[str, int]
    machine_busy: float
    machine_total: float


@dataclass
class ProcessSet:
    """The roles to watch: role → root pid."""

    pids: dict[str, int] = field(default_factory=dict)
    with_children: frozenset[str] = frozenset({"rabbitmq"})

    def sample(self) -> Sample:
        cpu: dict[str, float] = {}
        rss: dict[str, int] = {}
        for role, pid in self.pids.items():
            own = cpu_seconds(pid)
            if own is None:
                continue
            if role in self.with_children:
                own += sum(c for p in descendants(pid) if (c := cpu_seconds(p)) is not None)
            cpu[role] = own
            rss[role] = rss_bytes(pid) or 0
        busy, total = machine_busy_seconds()
        return Sample(time.monotonic(), cpu, rss, busy, total)

    def rss(self, role: str) -> int | None:
        pid = self.pids.get(role)
        return None if pid is None else rss_bytes(pid)


def usage(start: Sample, end: Sample) -> dict[str, dict[str, float]]:
    """Per role: `cpu_pct` (% of one core between the samples), `cpu_s` (CPU seconds between
    them) and `rss_mib` (at `end`)."""
    wall = max(end.at - start.at, 1e-9)
    result: dict[str, dict[str, float]] = {}
    for role in end.cpu:
        if role not in start.cpu:
            continue
        spent = end.cpu[role] - start.cpu[role]
        result[role] = {
            "cpu_pct": round(100 * spent / wall, 1),
            "cpu_s": round(spent, 3),
            "rss_mib": round(end.rss[role] / 2**20, 1),
        }
    return result


def stack_cpu_per_decision(
    processes: Mapping[str, Mapping[str, float]],
    decisions: int,
    exclude: Iterable[str] = ("loadgen",),
) -> tuple[float | None, list[str]]:
    """(ms of CPU per decision, the roles summed): the CPU seconds of every measured process
    except the load generator, over the window, divided by the decisions sent in it. None when
    nothing was measured or nothing was sent."""
    skip = set(exclude)
    order = {role: i for i, role in enumerate(ROLES)}
    roles = sorted(
        (r for r in processes if r not in skip and "cpu_s" in processes[r]),
        key=lambda r: (order.get(r, len(order)), r),
    )
    if not roles or decisions <= 0:
        return None, roles
    spent = sum(processes[r]["cpu_s"] for r in roles)
    return round(1000 * spent / decisions, 3), roles


def machine_usage(
    start: Sample, end: Sample, roles: Mapping[str, dict[str, float]]
) -> dict[str, float]:
    """Whole-machine CPU (% of one core, so 200 = both cores of a 2-core machine busy) and the
    part of it not spent by any watched process (other load on the machine)."""
    cores = os.cpu_count() or 1
    total = max(end.machine_total - start.machine_total, 1e-9)
    busy_pct = 100 * cores * (end.machine_busy - start.machine_busy) / total
    watched = sum(r["cpu_pct"] for r in roles.values())
    return {"busy_pct": round(busy_pct, 1), "other_pct": round(max(0.0, busy_pct - watched), 1)}


# -- discovery ----------------------------------------------------------------------------------


def _environ(pid: int) -> dict[bytes, bytes]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    env = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            env[key] = value
    return env


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def role_of(pid: int) -> str | None:
    """gateway / decisions / timers / store / rabbitmq / mongodb, or None."""
    cmd = _cmdline(pid)
    for i, part in enumerate(cmd[:-1]):
        if part == "-m" and cmd[i + 1].startswith("services."):
            name = cmd[i + 1].removeprefix("services.")
            return name if name in SERVICE_ROLES else None
    if _comm(pid) == "beam.smp":
        return "rabbitmq"
    if any(Path(part).name == "nx-27017" for part in cmd[:2]):
        return "mongodb"
    return None


def _all_pids() -> Iterable[int]:
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def discover(gateway_port: int) -> tuple[ProcessSet, list[str]]:
    """The processes of the stack whose gateway listens on `gateway_port`, plus warnings."""
    me = os.getpid()
    candidates: dict[str, list[int]] = {}
    for pid in _all_pids():
        if pid == me:
            continue
        role = role_of(pid)
        if role is not None:
            candidates.setdefault(role, []).append(pid)
    port = str(gateway_port).encode()
    gateways = [
        p for p in candidates.get("gateway", []) if _environ(p).get(b"CANOPY_GATEWAY_PORT") == port
    ]
    warnings: list[str] = []
    if len(gateways) != 1:
        warnings.append(f"found {len(gateways)} gateway processes for port {gateway_port}")
    marker = _environ(gateways[0]).get(MARKER_ENV) if len(gateways) == 1 else None
    pids: dict[str, int] = {"loadgen": me}
    if len(gateways) == 1:
        pids["gateway"] = gateways[0]
    for role, found in candidates.items():
        if role == "gateway":
            continue
        if marker is not None:
            found = [p for p in found if _environ(p).get(MARKER_ENV) == marker]
        if len(found) == 1:
            pids[role] = found[0]
        else:
            warnings.append(f"{role}: {len(found)} candidate processes, not measured")
    return ProcessSet(pids), warnings
