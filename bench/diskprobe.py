"""How long the disk takes to make a small write durable while a run's window lasts.

A decision is acknowledged once the broker confirmed it, and a quorum queue confirms after its
write-ahead log reached the disk (fdatasync): a disk that stops for a moment stops every
confirm with it, and the run shows a stall that is the disk's, not the code's. Measured here
on 2026-12-01: idle, fdatasync of 4 KiB took 0.3 ms (p50) and at most 5 ms; during a
400-participant run on the same filesystem, up to 915 ms. With the stack on tmpfs (`make bench
ARGS="--run-dir /dev/shm/canopy-bench"`) the stalls went away.

`DiskProbe(folder)` writes 4 KiB and fdatasyncs a file of its own in `folder` (the
filesystem that holds RabbitMQ's and MongoDB's data) every `interval` seconds from a thread,
and records when each sync started and how long it took. Its own load is small next to the
broker's (10 syncs/s against hundreds). The floor's run probes the same folder: it says how
the disk was doing while the floor ran, though the floor itself writes nothing.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path


class DiskProbe:
    def __init__(self, folder: Path, *, interval: float = 0.1) -> None:
        self._path = folder / f"disk-probe-{os.getpid()}.bin"
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.syncs: list[tuple[float, float]] = []  # (perf_counter at start, seconds)

    def __enter__(self) -> DiskProbe:
        self._thread = threading.Thread(target=self._run, name="disk-probe", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()

    def _run(self) -> None:
        block = os.urandom(4096)
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            while not self._stop.is_set():
                os.pwrite(fd, block, 0)
                started = time.perf_counter()
                os.fdatasync(fd)
                self.syncs.append((started, time.perf_counter() - started))
                self._stop.wait(self._interval)
        finally:
            os.close(fd)

    def durations(self, start: float, end: float) -> list[float]:
        """How long each sync that started in [start, end) took, in seconds."""
        return [d for t, d in self.syncs if start <= t < end]

    def slow_between(self, start: float, end: float, slower_than: float) -> bool:
        """Whether a sync slower than `slower_than` s was under way during [start, end]."""
        return any(d > slower_than and t <= end and t + d >= start for t, d in self.syncs)
