"""Peak memory of one stage, and this machine's memory, for the run report and pre-flight.

A stage runs in the flow's process (the og builder in process, PyTorch) or in child processes
(converters, DashInfer's worker, torchrun). Its peak is the larger of:
- the process's own high-water mark (VmHWM), reset when the stage starts (Linux: writing 5 to
  /proc/self/clear_refs), so an earlier stage's peak does not show in a later one; and
- the largest sum of this process's and its new descendants' resident memory, sampled every
  0.2 s while the stage runs (a child's own peak between samples can be missed; its steady use is
  not); processes already running when the stage started (the run's Prefect server) are not the
  stage's and are left out.
Elsewhere (no /proc) nothing is measured and the peak is None.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path

PROC = Path("/proc")
SAMPLE_SECONDS = 0.2


def _status_kib(pid: int | str, field: str) -> int | None:
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def machine_memory_bytes() -> int | None:
    """Physical memory of this machine (MemTotal), or None where /proc/meminfo is missing."""
    try:
        for line in (PROC / "meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None


def _children(pid: int) -> list[int]:
    found = []
    try:
        for task in (PROC / str(pid) / "task").iterdir():
            text = (task / "children").read_text().split()
            found += [int(c) for c in text]
    except (OSError, ValueError):
        return found
    return found


def _descendants(pid: int) -> set[int]:
    found, todo = set(), _children(pid)
    while todo:
        current = todo.pop()
        found.add(current)
        todo += _children(current)
    return found


def _tree_rss_kib(pid: int, exclude: set[int]) -> int:
    """This process's and its descendants' RSS, less the subtrees of `exclude` (servers started
    before the stage: the run's Prefect server is a child of the flow's process)."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += _status_kib(current, "VmRSS") or 0
        todo += [c for c in _children(current) if c not in exclude]
    return total


class PeakMemory:
    """`with PeakMemory() as peak: ...`, then `peak.bytes` (None where it cannot be measured)."""

    def __init__(self) -> None:
        self.bytes: int | None = None
        self._tree_kib = 0
        self._before: set[int] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if _status_kib("self", "VmHWM") is None:
            return self
        with contextlib.suppress(OSError):
            (PROC / "self" / "clear_refs").write_text("5")  # resets VmHWM to the current RSS
        self._before = _descendants(os.getpid())  # running before the stage: not the stage's
        self._thread = threading.Thread(target=self._sample, name="ftd-peak-memory", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        pid = os.getpid()
        while not self._stop.wait(SAMPLE_SECONDS):
            self._tree_kib = max(self._tree_kib, _tree_rss_kib(pid, self._before))

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        own = _status_kib("self", "VmHWM") or 0
        self.bytes = max(own, self._tree_kib) * 1024


def release_freed_memory() -> None:
    """Hand memory freed inside the heap back to the system (glibc's malloc_trim), so one stage's
    freed temporaries do not stay resident through the next stages; a no-op elsewhere."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
