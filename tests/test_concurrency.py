"""Concurrent `ftd run`s on one artifacts folder, as real processes.

Two runs of the same config: every stage is built by exactly one of them (the other waits on the
store's lock and reuses it), both pass, versions are registered once. Then a different config
next to a rerun of the first: neither disturbs the other. (Before the databases were prepared
under a lock, the second run failed on Prefect's and MLflow's simultaneous schema migrations.)
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_CONFIG, ROOT

pytestmark = pytest.mark.e2e


def start(artifacts: Path, name: str, tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, Path]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    summary = tmp_path / f"{name}.json"
    argv = [sys.executable, "-m", "app.cli", "run", str(DEFAULT_CONFIG), "--set", f"artifacts_dir={artifacts}",
            "--summary", str(summary), *overrides]  # fmt: skip
    log = (tmp_path / f"{name}.log").open("w")
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), summary


def finish(process: subprocess.Popen, summary: Path, tmp_path: Path, name: str) -> dict:
    assert process.wait(timeout=1800) == 0, (tmp_path / f"{name}.log").read_text()[-4000:]
    return json.loads(summary.read_text())


def test_concurrent_runs_share_the_store_without_interference(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    first = [start(artifacts, name, tmp_path) for name in ("a", "b")]
    a, b = (finish(p, s, tmp_path, n) for (p, s), n in zip(first, ("a", "b")))
    for stage in ("base", "data", "adapter", "merged", "reference", "engine", "smoke"):
        statuses = sorted(next(s["status"] for s in run["stages"] if s["stage"] == stage) for run in (a, b))
        assert statuses == ["built", "cache hit"], f"{stage}: {statuses}"
    new = sorted(r["new"] for run in (a, b) for r in run["registered"] if r["kind"] == "adapter")
    assert new == [False, True]  # registered once, found by the other

    second = [
        start(artifacts, "c", tmp_path, "--set", "adapters.0.lora.r=4"),
        start(artifacts, "d", tmp_path, "--rerun"),
    ]
    c, d = (finish(p, s, tmp_path, n) for (p, s), n in zip(second, ("c", "d")))
    assert {s["stage"]: s["status"] for s in d["stages"]}["adapter"] == "cache hit"
    assert {s["stage"]: s["status"] for s in c["stages"]}["adapter"] == "built"
    assert c["metrics"]["numbers.onnx-fp32.agreement.merged_vs_engine"] >= 0.95
    versions = {str(r["version"]) for run in (a, b, c, d) for r in run["registered"] if r["kind"] == "adapter"}
    assert versions == {"1", "2"}
