"""Crash recovery with real processes: `kill -9` the CLI mid-training and mid-engine-build, and
`kill` (SIGTERM) it mid-training.

1. Killed once a checkpoint exists: no adapter artifact is left; the rerun resumes from the last
   checkpoint and yields an adapter bitwise equal to an uninterrupted run's (same seed, CPU: the
   trainer restores optimizer, scheduler, RNG state and data position, so nothing differs).
2. Killed while the engine is being written: no engine artifact is left; the next run reuses the
   adapter and merge (cache hits) and builds the engine.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import DEFAULT_CONFIG, ROOT, run_ftd

pytestmark = pytest.mark.e2e


def start_run(artifacts: Path, log: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    argv = [sys.executable, "-m", "app.cli", "run", str(DEFAULT_CONFIG), "--set", f"artifacts_dir={artifacts}"]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip


def kill_when(process: subprocess.Popen, condition, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, "the run ended before the fault could be injected"
        assert time.monotonic() < deadline, "timed out waiting to inject the fault"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def artifacts_of(artifacts: Path, stage: str) -> list[Path]:
    return sorted((artifacts / "store" / stage).glob("*")) if (artifacts / "store" / stage).exists() else []


def adapter_tensors(artifacts: Path) -> dict[str, torch.Tensor]:
    [adapter] = artifacts_of(artifacts, "adapter")
    return load_file(adapter / "adapter" / "adapter_model.safetensors")


def test_kill_during_sft_then_during_build(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    checkpoints = artifacts / "checkpoints"

    # 1. SFT killed after its third checkpoint (step 300 of 600).
    run = start_run(artifacts, tmp_path / "run1.log")
    kill_when(run, lambda: any(checkpoints.glob("*/checkpoint-300/trainer_state.json")))
    assert artifacts_of(artifacts, "adapter") == []

    # 2. The rerun resumes; killed again while the engine is being written.
    run = start_run(artifacts, tmp_path / "run2.log")
    kill_when(run, lambda: any((artifacts / "tmp").glob("engine-*/*")) if (artifacts / "tmp").exists() else False)
    assert artifacts_of(artifacts, "engine") == []
    [adapter] = artifacts_of(artifacts, "adapter")
    meta = json.loads((adapter / "ftd-manifest.json").read_text())["meta"]
    assert meta["resumed_from_step"] >= 300 and meta["steps"] == 600
    step_seconds = json.loads((adapter / "step_seconds.json").read_text())  # the steps this run trained
    assert len(step_seconds) == 600 - meta["resumed_from_step"] and min(step_seconds) > 0
    assert not list(checkpoints.glob("*")), "checkpoints are removed once the adapter is complete"

    # 3. The next run completes, reusing the adapter and the merge.
    result = run_ftd(artifacts)
    assert result.code == 0, result.stderr[-3000:]
    status = {s["stage"]: s["status"] for s in result.summary["stages"]}
    assert status["adapter"] == "cache hit" and status["merged"] == "cache hit" and status["engine"] == "built"
    assert result.summary["metrics"]["numbers.onnx-fp32.agreement.merged_vs_engine"] >= 0.95
    assert not list((artifacts / "tmp").glob("engine-*")), "the killed build's temp dir is cleaned up"

    # The resumed adapter is the one an uninterrupted run trains.
    uninterrupted = tmp_path / "uninterrupted"
    assert run_ftd(uninterrupted, "--set", "targets=[]").code == 0
    resumed, reference = adapter_tensors(artifacts), adapter_tensors(uninterrupted)
    assert sorted(resumed) == sorted(reference)
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def _run_servers() -> set[int]:
    """Prefect API servers that runs started (each `ftd run` starts its own, see ftd.servers)."""
    found = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"prefect.server.api.server:create_app" in (proc / "cmdline").read_bytes():
                    found.add(int(proc.name))
            except OSError:
                pass
    return found


def test_sigterm_during_sft_stops_the_run_and_records_nothing(tmp_path: Path) -> None:
    """`kill PID` (what a scheduler or container runtime sends) mid-training: the run stops within
    seconds, ends by the signal, registers and records nothing, and leaves no server behind."""
    artifacts = tmp_path / "artifacts"
    log = tmp_path / "run.log"
    servers_before = _run_servers()
    run = start_run(artifacts, log)
    deadline = time.monotonic() + 600
    while "sft numbers: " not in (log.read_text() if log.exists() else ""):
        assert run.poll() is None, "the run ended before it was told to stop:\n" + log.read_text()[-3000:]
        assert time.monotonic() < deadline, "timed out waiting for SFT to start"
        time.sleep(0.1)
    run.send_signal(signal.SIGTERM)  # the CLI's process only, not its group
    try:
        code = run.wait(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    output = log.read_text()
    assert code == -signal.SIGTERM, f"exit {code}, expected death by SIGTERM:\n{output[-3000:]}"
    assert "Starting temporary server" not in output, "a new folder's first run must use ftd's server, not Prefect's"
    assert artifacts_of(artifacts, "adapter") == [] and artifacts_of(artifacts, "engine") == []
    records = artifacts / "run-records"
    assert not records.exists() or not list(records.glob("*.json")), "a stopped run was recorded as passing"
    with sqlite3.connect(artifacts / "mlflow.db") as db:
        statuses = [row[0] for row in db.execute("select status from runs")]
        versions = db.execute("select count(*) from model_versions").fetchone()[0]
    assert statuses == ["KILLED"] and versions == 0
    deadline = time.monotonic() + 15
    while _run_servers() - servers_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _run_servers() - servers_before, "the run's Prefect server outlived it"
