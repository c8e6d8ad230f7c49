"""The supervisor notices a child that dies while a supervision step is running.

A regression test for a lost wakeup: the loop drained its signal pipe after each step too, so
a SIGCHLD that arrived during the step (after that child's poll) was consumed unseen and, with
every child running, the loop slept until some other signal. Here child A's readiness probe
kills child B and waits until B is a zombie (its SIGCHLD sent) before it returns, which puts
B's death exactly inside a step. The supervisor runs in a process of its own (it installs
signal handlers, which only a main thread may do).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

SCRIPT = r"""
import os, signal, subprocess, sys, time
from pathlib import Path
from devstack.supervisor import Child, Supervisor

run_dir = Path(sys.argv[1])

def sleeper():
    return subprocess.Popen(["sleep", "60"])

b = Child("b", sleeper(), start=sleeper, ready=lambda: True)

def state(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return "gone"

killed = []

def ready_and_kill_b():
    if not killed:
        killed.append(b.proc.pid)
        os.kill(b.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while state(b.proc.pid) != "Z" and time.monotonic() < deadline:
            time.sleep(0.01)  # until the kernel has sent our SIGCHLD
    return True

a = Child("a", sleeper(), start=sleeper, ready=ready_and_kill_b)
a.state = "starting"
Supervisor([b, a], run_dir, say=lambda line: print(line, flush=True)).run()
for child in (a, b):
    child.proc.kill()
"""


def test_a_child_dying_during_a_step_is_seen(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    log = tmp_path / "logs" / "devstack.log"
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = log.read_text() if log.exists() else ""
            if "b: started again" in text:
                break
            assert proc.poll() is None, proc.communicate()[0]
            time.sleep(0.05)  # polling a log file another process writes
        else:
            raise AssertionError(f"b's death inside a step went unseen:\n{text}")
        assert "b (pid" in text and "killed by SIGKILL" in text, text
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
