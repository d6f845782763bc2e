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


def _build_weights(tmp: Path) -> dict:
    (tmp / "sub").mkdir()
    (tmp / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 64)
    (tmp / "config.json").write_text("{}")
    return {"built": True}


def test_manifest_records_every_file_with_size_and_sha256(tmp_path: Path) -> None:
    import hashlib
    import json

    store = Store(tmp_path)
    artifact = store.materialize("engine", "k1", _build_weights)
    files = json.loads((artifact.path(store) / "ftd-manifest.json").read_text())["files"]
    weights = artifact.path(store) / "sub" / "weights.bin"
    assert set(files) == {"sub/weights.bin", "config.json"}
    assert files["sub/weights.bin"] == {"bytes": 16384, "sha256": hashlib.sha256(weights.read_bytes()).hexdigest()}


def test_truncated_file_makes_the_artifact_absent_and_it_is_rebuilt(tmp_path: Path) -> None:
    store = Store(tmp_path)
    artifact = store.materialize("engine", "k1", _build_weights)
    weights = artifact.path(store) / "sub" / "weights.bin"
    with open(weights, "r+b") as f:
        f.truncate(100)
    assert not store.has("engine", "k1")
    rebuilt = store.materialize("engine", "k1", _build_weights)
    assert not rebuilt.cached and weights.stat().st_size == 16384


def test_verify_finds_a_flipped_bit_and_repair_removes_the_artifact(tmp_path: Path) -> None:
    import subprocess
    import sys

    store = Store(tmp_path)
    artifact = store.materialize("engine", "k1", _build_weights)
    store.materialize("merged", "k2", _build_weights)
    weights = artifact.path(store) / "sub" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[1000] ^= 0x01  # same size: the cheap check on a cache hit cannot see it
    weights.write_bytes(bytes(data))
    assert store.has("engine", "k1")

    def verify(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "app.cli", "verify", "--artifacts-dir", str(tmp_path), *extra],
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    found = verify()
    assert found.returncode == 1
    assert "damaged engine/k1: sub/weights.bin: content differs from its recorded sha256" in found.stdout
    assert "verified 2 artifact(s)" in found.stdout and "1 damaged" in found.stdout
    repaired = verify("--repair")
    assert repaired.returncode == 0 and "removed; the next run rebuilds it" in repaired.stdout
    assert not store.has("engine", "k1") and store.has("merged", "k2")
    assert verify().returncode == 0
