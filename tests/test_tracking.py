"""MLflow registration: idempotent by artifact key, and all-or-nothing within one flow run."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftd.config import load_config
from ftd.tracking import Tracker

DEFAULT = Path(__file__).resolve().parent.parent / "configs" / "tiny-llama.yaml"


@pytest.fixture
def tracker(tmp_path: Path):
    cfg = load_config(DEFAULT, [f"artifacts_dir={tmp_path}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    with Tracker(cfg) as t:
        yield t


def _artifact(tmp_path: Path, name: str) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "weights.bin").write_bytes(name.encode())
    return d


def test_same_key_registers_once(tracker: Tracker, tmp_path: Path) -> None:
    first = tracker.register("m-adapter", _artifact(tmp_path, "a"), "adapters/a", "key1", {"ftd.adapter": "a"})
    again = tracker.register("m-adapter", _artifact(tmp_path, "b"), "adapters/a", "key1", {"ftd.adapter": "a"})
    assert first["new"] and not again["new"] and again["version"] == first["version"]
    assert len(tracker.client.search_model_versions("name = 'm-adapter'")) == 1


def test_failure_during_registration_rolls_back_versions(tracker: Tracker, tmp_path: Path) -> None:
    kept = tracker.register("m-adapter", _artifact(tmp_path, "k"), "adapters/k", "kept", {})
    with pytest.raises(RuntimeError, match="engine upload failed"), tracker.registration():
        tracker.register("m-adapter", _artifact(tmp_path, "a"), "adapters/a", "key-a", {})
        tracker.register("m-engine", _artifact(tmp_path, "e"), "engines/e", "key-e", {})
        raise RuntimeError("engine upload failed")
    versions = tracker.client.search_model_versions("name = 'm-adapter'")
    assert [v.version for v in versions] == [kept["version"]]  # the earlier, finished one stays
    assert tracker.client.search_model_versions("name = 'm-engine'") == []


def test_transient_errors_are_retried_with_backoff_permanent_ones_are_not(monkeypatch) -> None:
    from ftd import tracking
    from ftd.errors import FtdError

    sleeps: list[float] = []
    monkeypatch.setattr(tracking.time, "sleep", sleeps.append)
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        if calls["n"] < 3:
            raise ConnectionError("connection reset by peer")
        return "logged"

    assert tracking.with_retries(flaky, "log metric") == "logged"
    assert calls["n"] == 3 and sleeps == [0.5, 1.0]  # nothing lost, exponential backoff

    class Permanent(Exception):
        error_code = next(iter(tracking.PERMANENT_ERRORS))

    def refused():
        calls["n"] += 1
        raise Permanent("bad request")

    calls["n"], sleeps[:] = 0, []
    with pytest.raises(FtdError, match="MLflow: register failed: bad request"):
        tracking.with_retries(refused, "register")
    assert calls["n"] == 1 and sleeps == []

    def down():
        raise ConnectionError("refused")

    with pytest.raises(FtdError, match="MLflow: tag failed after 4 attempts"):
        tracking.with_retries(down, "tag")
