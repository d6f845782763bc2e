"""A request to stop a run (SIGTERM) is never lost.

During a flow, Prefect's handler turns SIGTERM into a `TerminationSignal` raised wherever the
main thread happens to be. When that is a finalizer (a `__del__` or weakref callback: sqlalchemy
runs some while datasets tokenises), Python prints "Exception ignored in ..." and carries on; a
run told to stop once went on to train, register its engines, record itself as passing and exit
0. `watch()` puts a recorder in front of whatever handler is installed (Prefect's) for the flow's
duration, and `check()` raises the recorded signal again at the run's safe points: before and
after every stage, at every SFT step, and before a passing run is recorded. Prefect then marks
the flow run Crashed and the process ends by the signal, as a stopped program should. The record
is one per process, so a sweep's points, which run in worker threads (no handler runs there),
stop at their own next check.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_received: list[int] = []
_depth = [0]  # nested flows (a sweep's points) share the outermost flow's record


@contextmanager
def watch() -> Iterator[None]:
    """Record every SIGTERM while the block runs, then hand it to the handler that was installed.
    Outside the main thread (signals cannot be handled there) it records nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth[0] == 0:
        _received.clear()  # a new run in this process (tests, `ftd serve`) starts unstopped
    previous = signal.getsignal(signal.SIGTERM)

    def record(signum: int, frame) -> None:
        _received.append(signum)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action: end the process by the signal
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    signal.signal(signal.SIGTERM, record)
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        signal.signal(signal.SIGTERM, previous)


def check() -> None:
    """Raise Prefect's `TerminationSignal` if a SIGTERM arrived while `watch()` was active, even
    if the first one raised was swallowed; a no-op otherwise."""
    if _received:
        from prefect.exceptions import TerminationSignal

        raise TerminationSignal(signal=_received[-1])
