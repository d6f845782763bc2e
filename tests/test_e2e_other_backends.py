"""configs/other-backends.yaml end to end: DashInfer on CPU and an Accessory checkpoint (model-
parallel 2) through the parity gate, a DashInfer 2.x multi-LoRA bundle and MindFormers weights
produced and checked, GPU/Ascend-only steps reported as skipped with their reasons.

DashInfer's own environment is created on first use (tasks/backends/dashinfer/env.py), as for a user.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT, run_ftd, seed_store

pytestmark = pytest.mark.e2e
CONFIG = ROOT / "configs" / "other-backends.yaml"


def test_other_backends(tmp_path: Path, trained_default: Path) -> None:
    artifacts = seed_store(trained_default, tmp_path / "artifacts")
    result = run_ftd(artifacts, config=CONFIG)
    assert result.code == 0, result.stderr[-4000:]
    m, summary = result.summary["metrics"], result.summary
    for target in ("dashinfer-cpu", "accessory-mp2"):
        assert m[f"numbers.{target}.agreement.merged_vs_engine"] >= 0.95
        assert m[f"numbers.{target}.accuracy.engine"] >= 0.9
    assert m["numbers.dashinfer-cpu.max_logit_diff.merged_vs_engine"] is None  # DashInfer exposes no logits
    assert m["numbers.accessory-mp2.max_logit_diff.merged_vs_engine"] < 1e-3
    assert "NVIDIA GPU" in m["numbers.dashinfer-lora.skipped"]
    assert "Ascend" in m["numbers.mindspore.skipped"]
    registered = {r["item"] for r in summary["registered"] if r["kind"] == "engine"}
    assert registered == {"numbers/dashinfer-cpu", "dashinfer-lora", "numbers/accessory-mp2", "numbers/mindspore"}

    engines = {s["label"]: s["key"] for s in summary["stages"] if s["stage"] == "engine"}
    accessory = artifacts / "store" / "engine" / engines["numbers/accessory-mp2"]
    assert sorted(p.name for p in accessory.glob("consolidated.*")) == [
        "consolidated.00-of-02.model.pth", "consolidated.01-of-02.model.pth"]  # fmt: skip
    assert json.loads((accessory / "meta.json").read_text()) == {"llama_type": "llama"}
    mindspore = artifacts / "store" / "engine" / engines["numbers/mindspore"]
    assert (mindspore / "mindformers.safetensors").is_file()
    assert yaml.safe_load((mindspore / "predict_llama.yaml").read_text())["model"]["model_config"]["num_layers"] == 2
    dashinfer = artifacts / "store" / "engine" / engines["numbers/dashinfer-cpu"]
    assert (dashinfer / "model.dimodel").is_file() and (dashinfer / "model.ditensors").is_file()

    # config-time limits: refused before anything is computed, naming the option
    bad = run_ftd(tmp_path / "bad", "--set", "targets.2.options.model_parallel_size=3", config=CONFIG)
    assert bad.code == 2 and "model_parallel_size: 3 does not divide" in bad.stderr
    assert not (tmp_path / "bad" / "store").exists()
