"""A stop request (SIGTERM) survives being raised where Python swallows exceptions: a finalizer."""

from __future__ import annotations

import signal

import pytest
from prefect.exceptions import TerminationSignal

from ftd import termination


@pytest.fixture
def prefect_like_handler():
    """What Prefect installs during a flow: SIGTERM raises TerminationSignal where the main thread is."""

    def raise_termination(signum, frame):
        raise TerminationSignal(signal=signum)

    previous = signal.signal(signal.SIGTERM, raise_termination)
    yield raise_termination
    signal.signal(signal.SIGTERM, previous)


class StoppedInFinalizer:
    """The signal lands while a finalizer runs (as sqlalchemy's weakref callbacks do mid-run)."""

    def __del__(self):
        signal.raise_signal(signal.SIGTERM)


def test_a_stop_swallowed_by_a_finalizer_is_raised_at_the_next_check(prefect_like_handler, monkeypatch) -> None:
    swallowed = []
    monkeypatch.setattr("sys.unraisablehook", lambda unraisable: swallowed.append(unraisable.exc_type))
    with termination.watch():
        termination.check()  # nothing asked yet: a no-op
        StoppedInFinalizer()  # collected at once; its TerminationSignal goes to the unraisable hook
        assert swallowed == [TerminationSignal], "the first raise was not swallowed: this test would prove nothing"
        with pytest.raises(TerminationSignal) as raised:
            termination.check()
        assert raised.value.signal == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is prefect_like_handler, "watch() restores the handler it found"


def test_a_stop_raised_in_plain_code_reaches_the_caller_and_the_record_clears_for_the_next_run(
    prefect_like_handler,
) -> None:
    with termination.watch(), pytest.raises(TerminationSignal):
        signal.raise_signal(signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes, before this loop ends
            pass
    with termination.watch():  # a new run in the same process starts unstopped
        termination.check()


def test_a_stop_reaches_the_points_of_a_sweep_in_their_worker_threads(prefect_like_handler, monkeypatch) -> None:
    """Sweep points run in worker threads, where no signal handler runs and where their own
    watch() records nothing: the main thread's record is what their checks see."""
    from concurrent.futures import ThreadPoolExecutor

    def point() -> str:
        with termination.watch():  # a point's flow: a no-op outside the main thread
            try:
                termination.check()
            except TerminationSignal:
                return "stopped"
            return "ran on"

    monkeypatch.setattr("sys.unraisablehook", lambda unraisable: None)
    with termination.watch(), ThreadPoolExecutor(max_workers=1) as pool:
        StoppedInFinalizer()  # swallowed in the main thread
        assert pool.submit(point).result() == "stopped"
