"""A stage's peak memory (ftd.memory): its own high-water mark since it started, plus the children
it starts, but not processes that were running before it (the run's Prefect server)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ftd.memory import PeakMemory, _status_kib, machine_memory_bytes

HOLD_200_MB = "import time; b = bytearray(200_000_000); b[::4096] = b'x' * len(b[::4096]); time.sleep({})"

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_the_peak_of_an_allocation_inside_the_stage_is_counted() -> None:
    with PeakMemory() as before:
        pass
    with PeakMemory() as peak:
        held = bytearray(300_000_000)
        held[::4096] = b"x" * len(held[::4096])  # touched: resident
        del held
    assert peak.bytes >= before.bytes + 290_000_000
    with PeakMemory() as after:  # the high-water mark starts again from what is resident now
        pass
    assert after.bytes < peak.bytes - 250_000_000


def test_children_started_in_the_stage_count_and_earlier_ones_do_not() -> None:
    server = subprocess.Popen([sys.executable, "-c", HOLD_200_MB.format(30)])
    try:
        subprocess.run([sys.executable, "-c", "import time; time.sleep(1.5)"], check=True)  # the server is resident
        with PeakMemory() as quiet:
            subprocess.run([sys.executable, "-c", "import time; time.sleep(1)"], check=True)
        with PeakMemory() as busy:
            subprocess.run([sys.executable, "-c", HOLD_200_MB.format(1.5)], check=True)
    finally:
        server.kill()
        server.wait()
    own = _status_kib("self", "VmHWM") * 1024
    assert quiet.bytes < own + 100_000_000  # the 200 MB child started before the stage is not in it
    assert busy.bytes >= quiet.bytes + 150_000_000  # the stage's own 200 MB child is


def test_machine_memory_is_read() -> None:
    assert machine_memory_bytes() > 1 << 30
