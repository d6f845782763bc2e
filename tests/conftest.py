"""Shared helpers: run the real `ftd` CLI in a subprocess against a private artifacts folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "tiny-llama.yaml"


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    summary: dict | None


def run_ftd(
    artifacts: Path, *args: str, command: str = "run", config: Path = DEFAULT_CONFIG, timeout: int = 1800
) -> CliResult:
    """`ftd <command> CONFIG --set artifacts_dir=... ARGS` from the repository root."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    summary_path = artifacts.parent / f"{artifacts.name}-summary.json"
    summary_path.unlink(missing_ok=True)
    argv = [sys.executable, "-m", "app.cli", command, str(config), "--set", f"artifacts_dir={artifacts}", *args]
    if command == "run":
        argv += ["--summary", str(summary_path)]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return CliResult(proc.returncode, proc.stdout, proc.stderr, summary)


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    return tmp_path / "artifacts"


@pytest.fixture(scope="session")
def trained_default(tmp_path_factory) -> Path:
    """The default experiment, run once per session (on first use): its store seeds the e2e tests
    that need the default adapter trained but do not test training itself (`seed_store`)."""
    artifacts = tmp_path_factory.mktemp("trained-default") / "artifacts"
    result = run_ftd(artifacts)
    assert result.code == 0, result.stderr[-3000:]
    return artifacts


def seed_store(trained: Path, artifacts: Path) -> Path:
    """`artifacts` starts with a copy of `trained`'s content-addressed store (hard links: stored
    artifacts are never written in place) and nothing else: no run records, no databases, so a
    run there is not "up to date", but its steps already computed are cache hits."""
    artifacts.mkdir(parents=True, exist_ok=True)
    shutil.copytree(trained / "store", artifacts / "store", copy_function=os.link)
    return artifacts
