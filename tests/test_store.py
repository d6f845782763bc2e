"""The artifact store: keys depend on content and config only; writes are atomic and locked."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest

from ftd.store import Store, digest, stage_key, tree_digest


def test_key_ignores_paths_and_times_but_not_content(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "w.bin").write_bytes(b"weights")
    os.utime(b / "w.bin", (0, 0))
    assert tree_digest(a) == tree_digest(b)
    (b / "w.bin").write_bytes(b"weightz")
    assert tree_digest(a) != tree_digest(b)


def test_key_changes_with_each_ingredient() -> None:
    base = dict(code="c", config={"r": 8}, inputs=["k1"], libraries={"torch": "2.13.0"})
    key = stage_key("sft", **base)
    assert key == stage_key("sft", **base)
    for change in ({"code": "c2"}, {"config": {"r": 16}}, {"inputs": ["k2"]}, {"libraries": {"torch": "2.14"}}):
        assert stage_key("sft", **(base | change)) != key
    assert digest({"a": 1, "b": 2}) == digest({"b": 2, "a": 1})


def test_failed_build_leaves_nothing_and_the_next_run_builds(tmp_path: Path) -> None:
    store = Store(tmp_path)

    def broken(out: Path) -> dict:
        (out / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.materialize("engine", "k", broken)
    assert not store.has("engine", "k")
    assert not store.path("engine", "k").exists()
    assert not any((tmp_path / "tmp").iterdir())
    art = store.materialize("engine", "k", lambda out: (out / "ok.bin").write_bytes(b"y") and {"n": 1})
    assert not art.cached and (store.path("engine", "k") / "ok.bin").read_bytes() == b"y"
    again = store.materialize("engine", "k", lambda out: pytest.fail("must not rebuild"))
    assert again.cached and again.meta == art.meta


def _slow_build(root: str, marker: str) -> None:
    def build(out: Path) -> dict:
        Path(marker).write_text("started")
        time.sleep(30)
        (out / "w.bin").write_bytes(b"w")
        return {}

    Store(root).materialize("merged", "k", build)


def test_killed_build_is_never_reused(tmp_path: Path) -> None:
    marker = tmp_path / "started"
    proc = multiprocessing.get_context("spawn").Process(target=_slow_build, args=(str(tmp_path), str(marker)))
    proc.start()
    deadline = time.time() + 60
    while not marker.exists() and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists()
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    store = Store(tmp_path)
    assert not store.has("merged", "k")
    art = store.materialize("merged", "k", lambda out: (out / "w.bin").write_bytes(b"fresh") and {})
    assert not art.cached and (store.path("merged", "k") / "w.bin").read_bytes() == b"fresh"


def _build_once(root: str, counter: str) -> None:
    def build(out: Path) -> dict:
        with open(counter, "a") as f:
            f.write("built\n")
        time.sleep(1.0)
        return {}

    Store(root).materialize("data", "same", build)


def test_concurrent_runs_of_one_step_build_it_once(tmp_path: Path) -> None:
    counter = tmp_path / "count"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_build_once, args=(str(tmp_path), str(counter))) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert counter.read_text().count("built") == 1
    assert Store(tmp_path).has("data", "same")
