"""The up-to-date check: a run record is reused only while every input, the code, the libraries
and every listed artifact are unchanged (the end-to-end use is in test_e2e)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from flows import run_records
from ftd.config import load_config
from ftd.store import Store
from tests.conftest import DEFAULT_CONFIG, ROOT

URI = "sqlite:///tracking.db"


@pytest.fixture
def setup(tmp_path: Path):
    data = tmp_path / "data"
    shutil.copytree(ROOT / "data" / "numbers", data)
    overrides = [f"artifacts_dir={tmp_path / 'artifacts'}", f"adapters.0.data.train={data / 'train.jsonl'}",
                 f"adapters.0.data.eval={data / 'eval.jsonl'}"]  # fmt: skip
    cfg = load_config(DEFAULT_CONFIG, overrides)
    store = Store(cfg.artifacts_dir)
    stages = []
    for stage in ("adapter", "engine"):
        artifact = store.materialize(
            stage, f"{stage}-key", lambda tmp: {"bytes": (tmp / "weights.bin").write_bytes(b"x" * 64)}
        )
        stages.append({"stage": stage, "label": "numbers", "status": "built", "seconds": 1.0, "key": artifact.key,
                       "detail": ""})  # fmt: skip
    summary = {"experiment": cfg.experiment, "prefect_flow_run_id": "f", "mlflow_run_id": "m", "tracking_uri": URI,
               "stages": stages, "registered": [], "metrics": {"numbers.eval_accuracy_after": 0.97}}  # fmt: skip
    return cfg, overrides, data, store, summary


def test_a_recorded_run_is_up_to_date_with_every_artifact_intact(setup) -> None:
    cfg, _, _, _, summary = setup
    before = run_records.check(cfg, URI)
    assert before.summary is None  # nothing recorded yet
    assert "no passing run of it is recorded" in before.reason
    assert run_records.record_run(cfg, URI, summary) is not None
    found = run_records.check(cfg, URI).summary
    assert found is not None and found["up_to_date"] is True
    assert [s["status"] for s in found["stages"]] == ["up to date", "up to date"]
    assert found["metrics"] == summary["metrics"] and found["mlflow_run_id"] == "m"


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ("data content", "the data or imported adapters"),
        ("config value", "the config"),
        ("tracking uri", "the tracking URI"),
        ("installed library", "the installed libraries"),
        ("ftd source", "ftd's code"),
    ],
)
def test_any_changed_input_voids_the_record_and_is_named(setup, monkeypatch, change: str, named: str) -> None:
    cfg, overrides, data, _, summary = setup
    run_records.record_run(cfg, URI, summary)
    uri = URI
    if change == "data content":
        with open(data / "train.jsonl", "a") as f:
            f.write(
                '{"messages": [{"role": "user", "content": "Even or odd: 3"}, {"role": "assistant", "content": "odd"}]}\n'
            )
    elif change == "config value":
        cfg = load_config(DEFAULT_CONFIG, [*overrides, "adapters.0.lora.r=4"])
    elif change == "tracking uri":
        uri = "sqlite:///elsewhere.db"
    elif change == "installed library":
        installed = run_records._installed_distributions()
        monkeypatch.setattr(run_records, "_installed_distributions", lambda: [*installed, "peft-99.0.dist-info"])
    else:
        source = run_records._source_digest()
        monkeypatch.setattr(run_records, "_source_digest", lambda: source + "-edited")
    verdict = run_records.check(cfg, uri)
    assert verdict.summary is None
    assert re.search(rf"since its last passing run \(.*\) {re.escape(named)} changed$", verdict.reason), verdict.reason


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_or_missing_artifact_voids_the_record(setup, damage: str) -> None:
    cfg, _, _, store, summary = setup
    run_records.record_run(cfg, URI, summary)
    engine = store.path("engine", "engine-key")
    if damage == "truncated":
        (engine / "weights.bin").write_bytes(b"x" * 10)
    else:
        shutil.rmtree(engine)
    verdict = run_records.check(cfg, URI)
    assert verdict.summary is None
    assert "artifacts of its last passing run are missing or damaged: engine/engine-key" in verdict.reason


def test_runs_with_a_skipped_step_are_never_recorded(setup) -> None:
    cfg, _, _, _, summary = setup
    summary["stages"][1] |= {"status": "skipped", "detail": "needs an NVIDIA GPU"}
    assert run_records.record_run(cfg, URI, summary) is None
    assert run_records.check(cfg, URI).summary is None


def test_a_hub_model_counts_only_when_pinned_to_a_commit(setup) -> None:
    _, overrides, _, _, _ = setup
    unpinned = load_config(DEFAULT_CONFIG, [*overrides, "base_model=org/model"])
    assert run_records.fingerprint_parts(unpinned, URI) is None  # `main` can move on the hub
    assert "without a pinned commit" in run_records.check(unpinned, URI).reason
    pinned = load_config(DEFAULT_CONFIG, [*overrides, "base_model=org/model", "revision=" + "a" * 40])
    assert run_records.fingerprint_parts(pinned, URI) is not None


def test_data_folders_count_by_content_and_an_unpinned_hub_dataset_never_is_up_to_date(setup, tmp_path) -> None:
    """A `save_to_disk` folder is an input like a file (its bytes); a hub dataset without a pinned
    commit can change on the hub, so a run over it is never up to date."""
    from datasets import Dataset

    _, overrides, data, _, _ = setup
    folder = tmp_path / "saved"
    Dataset.from_json(str(data / "train.jsonl")).save_to_disk(str(folder))
    cfg = load_config(DEFAULT_CONFIG, [*overrides, f"adapters.0.data.train={folder}"])
    first = run_records.fingerprint_parts(cfg, URI)
    assert first is not None and first == run_records.fingerprint_parts(cfg, URI)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    assert run_records.fingerprint_parts(load_config(DEFAULT_CONFIG, [*overrides, f"adapters.0.data.train={moved}"]),
                                         URI)["inputs"] == first["inputs"]  # fmt: skip
    hub = load_config(DEFAULT_CONFIG, [*overrides, "adapters.0.data.train=org/instructions"])
    assert run_records.fingerprint_parts(hub, URI) is None
