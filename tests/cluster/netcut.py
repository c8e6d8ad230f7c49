"""Cut one RabbitMQ node off from the others with nftables, and heal it.

Every node of `devstack.cluster` listens for Erlang distribution on a port of its own
(127.0.0.1) and makes its own distribution connections from an address of its own
(127.0.0.N, the first node 127.0.0.1). So the links of node X are exactly
- the connections to X's distribution port (from the others, or from a rabbitmqctl), and
- the connections from X's address to another node's distribution port,
and a table of four drop rules in the output hook (every loopback packet passes it once)
silences them both ways while every other packet goes through: the AMQP listeners stay
reachable, as does epmd. Packets are dropped, not refused: the nodes see silence, as in a
real partition, and declare each other down after `net_ticktime`.

The table is this process's own (`canopy_cut_<pid>`, family inet) and only names ports of
the test's cluster; `heal()` deletes it, and a table left by a test process that died before
it could is deleted by the next `NetCut` (its ports may be given to someone else later).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

PREFIX = "canopy_cut_"


# As root, nft itself; otherwise through sudo without a password (as .ci/run uses sudo).
SUDO = [] if os.geteuid() == 0 else ["sudo", "-n"]


def _nft(*args: str, script: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SUDO, "nft", *args], input=script, capture_output=True, text=True, timeout=10, check=False
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def nft_problem() -> str | None:
    """Why this machine cannot filter packets here (None: it can)."""
    if shutil.which("nft") is None and not Path("/usr/sbin/nft").exists():
        return "nft not found: `make install` installs nftables"
    listed = _nft("list", "tables")
    if listed.returncode != 0:
        return f"nft cannot list tables (root or sudo without a password): {listed.stderr.strip()}"
    return None


def clear_stale() -> None:
    """Delete the tables of test processes that are gone."""
    for line in _nft("list", "tables").stdout.splitlines():
        match = re.fullmatch(rf"table inet ({PREFIX}(\d+))", line.strip())
        if match and not _alive(int(match[2])):
            _nft("delete", "table", "inet", match[1])


class NetCut:
    """One cut at a time: `cut(...)`, then `heal()`; `heal()` is safe to call again."""

    def __init__(self) -> None:
        self.table = f"{PREFIX}{os.getpid()}"
        clear_stale()
        self.heal()  # a table of an earlier NetCut of this same process

    def cut(self, port: int, source: str, others: list[int]) -> None:
        """Drop the links of the node that listens on `port` and connects from `source` to
        the nodes listening on `others`."""
        ports = ", ".join(str(p) for p in others)
        script = f"""table inet {self.table} {{
    chain output {{
        type filter hook output priority 0; policy accept;
        tcp dport {port} drop
        tcp sport {port} drop
        ip saddr {source} tcp dport {{ {ports} }} drop
        ip daddr {source} tcp sport {{ {ports} }} drop
    }}
}}
"""
        result = _nft("-f", "-", script=script)
        if result.returncode != 0:
            raise RuntimeError(f"nft refused the cut: {result.stderr}\n{script}")

    def heal(self) -> None:
        _nft("delete", "table", "inet", self.table)  # fails harmlessly if there is none

    @property
    def active(self) -> bool:
        return _nft("list", "table", "inet", self.table).returncode == 0
