"""`ftd sweep`: 4 points over the default config, one of which is trained too briefly to pass its
gate. Shared steps are cache hits, every point is a child MLflow run under one parent, and the
`champion` alias lands on the best *passing* point's versions only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ftd.errors import ConfigError
from ftd.sweep import load_sweep, point_overrides
from tests.conftest import ROOT, seed_store

pytestmark = pytest.mark.e2e


def write_sweep(tmp_path: Path, artifacts: Path, **extra) -> Path:
    spec = {
        "name": "test-sweep",
        "base": str(ROOT / "configs" / "tiny-llama.yaml"),
        "points": [{}, {"adapters.0.lora.r": 4}, {"adapters.0.sft.max_steps": 40}, {"adapters.0.lora.alpha": 24}],
        "overrides": [f"artifacts_dir={artifacts}", "smoke.max_prompts=32"],
        "objective": {"metric": "numbers.eval_accuracy_after", "mode": "max"},
        "promote": {"alias": "champion"},
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def run_sweep(sweep: Path, tmp_path: Path) -> dict:
    """`ftd sweep SWEEP --summary`, as a user runs it; the summary it wrote."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    summary_path = tmp_path / "summary.json"
    proc = subprocess.run([sys.executable, "-m", "app.cli", "sweep", str(sweep), "--summary", str(summary_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(summary_path.read_text())


def test_sweep_compares_shares_and_promotes_only_a_passing_point(tmp_path: Path, trained_default: Path) -> None:
    artifacts = seed_store(trained_default, tmp_path / "artifacts")  # point 0 is the default: its chain is cached
    sweep = write_sweep(tmp_path, artifacts)
    summary = run_sweep(sweep, tmp_path)
    points = {p["point"]: p for p in summary["points"]}
    assert len(points) == 4
    assert points[2]["gates"].startswith("failed") and "eval accuracy" in points[2]["gates"]
    assert points[2]["registered"] == ""
    passing = [p for p in points.values() if p["gates"] == "passed"]
    assert len(passing) == 3
    best = max(passing, key=lambda p: p["numbers.eval_accuracy_after"])
    assert summary["champion"]["point"] == best["point"] and points[best["point"]]["champion"]
    # shared steps: the base model and the data are built once, then cache hits
    assert all(p["cache_hits"] >= 2 for i, p in points.items() if i > 0 and p["gates"] == "passed")

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{artifacts / 'mlflow.db'}")
    parent = client.get_run(summary["mlflow_parent_run_id"])
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 4
    assert {c.data.tags["ftd.sweep_point"] for c in children} == {"0", "1", "2", "3"}
    for model in ("tiny-llama-adapter", "tiny-llama-onnx-fp32"):
        version = client.get_model_version_by_alias(model, "champion")
        assert version.run_id == points[best["point"]]["mlflow_run"]
    failed_run = next(c for c in children if c.data.tags["ftd.sweep_point"] == "2")
    assert failed_run.info.status == "FAILED"
    assert all(v.run_id != failed_run.info.run_id for v in client.search_model_versions("name = 'tiny-llama-adapter'"))
    artifacts_logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.md", "comparison.json"} <= artifacts_logged
    assert _subflow_runs(artifacts) == 4  # every point is a subflow of the sweep's flow run


def _subflow_runs(artifacts: Path) -> int:
    import sqlite3

    with sqlite3.connect(artifacts / "prefect" / "prefect.db") as db:
        return db.execute("SELECT count(*) FROM flow_run WHERE parent_task_run_id IS NOT NULL").fetchone()[0]


def test_concurrent_points_share_steps_without_building_twice(tmp_path: Path) -> None:
    """`concurrency: 2`: both points run at once in one process; the shared base model and data are
    built once (the store's per-key lock), each point trains its own adapter, both are subflows."""
    artifacts = tmp_path / "artifacts"
    sweep = write_sweep(
        tmp_path, artifacts, concurrency=2, points=[{}, {"adapters.0.lora.r": 4}],
        overrides=[f"artifacts_dir={artifacts}", "smoke.max_prompts=16", "adapters.0.sft.max_steps=30",
                   "smoke.thresholds.min_accuracy=0"],
    )  # fmt: skip
    summary = run_sweep(sweep, tmp_path)
    assert [p["gates"] for p in summary["points"]] == ["passed", "passed"]
    store = artifacts / "store"
    assert len(list((store / "base").iterdir())) == 1 and len(list((store / "data").iterdir())) == 1
    assert len(list((store / "adapter").iterdir())) == 2
    assert _subflow_runs(artifacts) == 2


def test_points_are_validated_before_anything_runs(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, tmp_path / "artifacts", points=[{}, {"adapters.0.lora.rank": 4}])
    with pytest.raises(
        ConfigError, match=r"point 1 \(adapters\.0\.lora\.rank=4\): .*unknown key `adapters\.0\.lora\.rank`"
    ):
        load_sweep(sweep)
    grid = write_sweep(
        tmp_path,
        tmp_path / "artifacts",
        points=None,
        grid={"adapters.0.lora.r": [4, 8], "smoke.max_new_tokens": [4, 8, 16]},
    )
    spec, runs, _configs = load_sweep(grid)
    assert len(runs) == 6 and runs[0][-2:] == ["adapters.0.lora.r=4", "smoke.max_new_tokens=4"]
    assert point_overrides({"a.b": [1, 2], "c": "x y"}) == ["a.b=[1, 2]", "c=x y"]
