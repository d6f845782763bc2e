"""The default config end to end through the real CLI, Prefect and MLflow (a few minutes).

One artifacts folder is shared by the tests in this module, in order: a cold run, an unchanged
rerun (up to date: nothing starts), the same with --rerun (every step a recorded cache hit), then
reruns with one setting changed, then a parity-gate failure.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, run_ftd

pytestmark = pytest.mark.e2e
ALL_STAGES = {"base", "data", "adapter", "merged", "reference", "engine", "smoke"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    return {"artifacts": tmp_path_factory.mktemp("e2e") / "artifacts"}


def _statuses(summary: dict) -> dict[str, str]:
    return {s["stage"]: s["status"] for s in summary["stages"]}


def _client(artifacts: Path):
    import mlflow

    return mlflow.MlflowClient(f"sqlite:///{artifacts / 'mlflow.db'}")


def _versions(artifacts: Path, name: str):
    return _client(artifacts).search_model_versions(f"name = '{name}'")


def test_cold_run_trains_builds_and_passes_the_gate(shared):
    result = run_ftd(shared["artifacts"])
    assert result.code == 0, result.stderr[-3000:]
    summary = result.summary
    assert set(_statuses(summary).values()) == {"built"}
    assert set(_statuses(summary)) == ALL_STAGES
    m = summary["metrics"]
    # The adapter learns the task; the random base cannot do it.
    assert m["numbers.eval_accuracy_after"] >= 0.9
    assert m["numbers.eval_accuracy_before"] <= 0.2
    # The engine answers like the trained model, token for token and logit for logit.
    assert m["numbers.onnx-fp32.agreement.merged_vs_engine"] >= 0.95
    assert m["numbers.onnx-fp32.agreement.adapter_vs_merged"] >= 0.95
    assert m["numbers.onnx-fp32.max_logit_diff.merged_vs_engine"] < 1e-3
    assert m["numbers.onnx-fp32.accuracy.engine"] >= 0.9

    artifacts = shared["artifacts"]
    [adapter_version] = _versions(artifacts, "tiny-llama-adapter")
    [engine_version] = _versions(artifacts, "tiny-llama-onnx-fp32")
    stage_keys = {s["stage"]: s["key"] for s in summary["stages"]}
    assert adapter_version.tags["ftd.key"] == stage_keys["adapter"]
    assert adapter_version.tags["ftd.base_key"] == stage_keys["base"]
    assert adapter_version.tags["ftd.data_key"] == stage_keys["data"]
    assert engine_version.tags["ftd.key"] == stage_keys["engine"]
    assert engine_version.tags["ftd.adapter_key"] == stage_keys["adapter"]
    assert engine_version.tags["ftd.adapter_version"] == "tiny-llama-adapter/1"
    # The registered engine is a complete og model folder.
    engine_dir = artifacts / "store" / "engine" / stage_keys["engine"]
    assert {"model.onnx", "genai_config.json", "tokenizer.json"} <= {p.name for p in engine_dir.iterdir()}
    run = _client(artifacts).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["adapters.numbers.lora.r"] == "8"
    assert run.data.metrics["numbers.eval_accuracy_after"] >= 0.9
    history = _client(artifacts).get_metric_history(run.info.run_id, "numbers.train_loss")
    assert len(history) >= 10 and history[-1].value < history[0].value
    assert [a.path for a in _client(artifacts).list_artifacts(run.info.run_id, "plots")] == [
        "plots/numbers.train_loss.png"
    ]
    shared["first"] = summary


def _flow_runs(artifacts: Path) -> int:
    import sqlite3

    with sqlite3.connect(artifacts / "prefect" / "prefect.db") as db:
        return db.execute("SELECT COUNT(*) FROM flow_run").fetchone()[0]


def test_unchanged_rerun_is_up_to_date_and_starts_nothing(shared):
    artifacts, first = shared["artifacts"], shared["first"]
    experiment = _client(artifacts).get_experiment_by_name("tiny-llama").experiment_id
    flow_runs, mlflow_runs = _flow_runs(artifacts), len(_client(artifacts).search_runs([experiment]))
    result = run_ftd(artifacts)
    assert result.code == 0, result.stderr[-3000:]
    assert "is up to date: nothing to run" in result.stdout
    summary = result.summary
    assert summary["up_to_date"] is True
    assert set(_statuses(summary).values()) == {"up to date"}
    assert {s["stage"]: s["key"] for s in summary["stages"]} == {s["stage"]: s["key"] for s in first["stages"]}
    assert summary["mlflow_run_id"] == first["mlflow_run_id"] and summary["metrics"] == first["metrics"]
    # Nothing was started, so nothing new was recorded.
    assert "Flow run" not in result.stdout + result.stderr
    assert _flow_runs(artifacts) == flow_runs
    assert len(_client(artifacts).search_runs([experiment])) == mlflow_runs


def test_rerun_flag_runs_the_flow_all_cache_hits_and_registers_nothing_new(shared):
    result = run_ftd(shared["artifacts"], "--rerun")
    assert result.code == 0, result.stderr[-3000:]
    assert set(_statuses(result.summary).values()) == {"cache hit"}
    assert all(not r["new"] for r in result.summary["registered"])
    assert len(_versions(shared["artifacts"], "tiny-llama-adapter")) == 1
    assert len(_versions(shared["artifacts"], "tiny-llama-onnx-fp32")) == 1
    assert "Cached" in result.stdout + result.stderr  # Prefect itself reports the cache hits
    # The stores were migrated by the first run, so this one started its own API server during
    # pre-flight; the flow run must still land in the same Prefect database.
    artifacts = shared["artifacts"]
    assert (artifacts / "logs" / "prefect-run-server.log").is_file()
    import sqlite3

    with sqlite3.connect(artifacts / "prefect" / "prefect.db") as db:
        rows = db.execute("SELECT state_type FROM flow_run WHERE id = ?", (result.summary["prefect_flow_run_id"],))
        assert rows.fetchall() == [("COMPLETED",)]
    # The loss curve comes from the cached adapter: no retraining, no matplotlib, still logged.
    plots = _client(artifacts).list_artifacts(result.summary["mlflow_run_id"], "plots")
    assert [a.path for a in plots] == ["plots/numbers.train_loss.png"]


def test_changing_smoke_settings_reruns_only_the_smoke_test(shared):
    result = run_ftd(shared["artifacts"], "--set", "smoke.max_new_tokens=6")
    assert result.code == 0, result.stderr[-3000:]
    assert "ftd: running tiny-llama: since its last passing run" in result.stdout  # ... "the config changed"
    assert "the config changed" in result.stdout
    statuses = _statuses(result.summary)
    assert {s: statuses[s] for s in ("reference", "smoke")} == {"reference": "built", "smoke": "built"}
    assert all(statuses[s] == "cache hit" for s in ("base", "data", "adapter", "merged", "engine"))


def test_changing_a_lora_setting_reruns_sft_and_after_but_not_data(shared):
    result = run_ftd(shared["artifacts"], "--set", "adapters.0.lora.dropout=0.01")
    assert result.code == 0, result.stderr[-3000:]
    statuses = _statuses(result.summary)
    assert statuses["base"] == statuses["data"] == "cache hit"
    assert all(statuses[s] == "built" for s in ("adapter", "merged", "engine", "reference", "smoke"))
    assert len(_versions(shared["artifacts"], "tiny-llama-adapter")) == 2  # a new adapter, a new version


def test_a_missed_threshold_fails_the_flow_and_registers_nothing(shared):
    before = len(_versions(shared["artifacts"], "tiny-llama-onnx-fp32"))
    result = run_ftd(shared["artifacts"], "--set", "smoke.thresholds.max_logit_diff=1e-12")
    assert result.code == 1
    last = [line for line in result.stderr.splitlines() if line.startswith("ftd: ")][-1]
    assert "parity gate failed for target onnx-fp32" in last
    assert "max |Δlogit|" in last and "> 1e-12" in last
    assert len(_versions(shared["artifacts"], "tiny-llama-onnx-fp32")) == before
    runs = _client(shared["artifacts"]).search_runs(
        [_client(shared["artifacts"]).get_experiment_by_name("tiny-llama").experiment_id],
        order_by=["attributes.start_time DESC"], max_results=1,
    )  # fmt: skip
    assert runs[0].info.status == "FAILED"


def test_the_default_experiment_deployed_to_llama_cpp_passes_every_gate(shared):
    """configs/llama-cpp.yaml in the same store: the adapter is a cache hit; merged f32, q8_0,
    q4_0 and a multi-LoRA bundle are converted, gated through llama.cpp and registered."""
    import json

    from tasks.backends.llama_cpp import tools

    if tools.unavailable_reason():
        pytest.skip(f"llama.cpp backend: {tools.unavailable_reason()}")
    result = run_ftd(shared["artifacts"], config=ROOT / "configs" / "llama-cpp.yaml")
    assert result.code == 0, result.stderr[-3000:]
    summary, m = result.summary, result.summary["metrics"]
    assert _statuses(summary)["adapter"] == "cache hit"
    for target in ("gguf-f32", "gguf-multi-lora"):
        assert m[f"numbers.{target}.max_logit_diff.merged_vs_engine"] <= 1e-4
        assert m[f"numbers.{target}.agreement.merged_vs_engine"] == 1.0
    assert m["numbers.gguf-q8.accuracy.engine"] >= 0.9 and m["numbers.gguf-q4.accuracy.engine"] >= 0.85
    steps = {(s["stage"], s["label"]): s for s in summary["stages"]}
    assert steps[("gguf", "numbers/gguf-q4")]["status"] == "cache hit"  # q4_0 is quantised from the f32 GGUF
    registered = {r["item"] for r in summary["registered"] if r["kind"] == "engine"}
    assert registered == {"numbers/gguf-f32", "numbers/gguf-q8", "numbers/gguf-q4", "gguf-multi-lora"}
    bundle = shared["artifacts"] / "store" / "gguf-bundle" / steps[("gguf-bundle", "gguf-multi-lora")]["key"]
    bundle = next(bundle.parent.glob(bundle.name + "*"))
    manifest = json.loads((bundle / "ftd-gguf.json").read_text())
    assert manifest["adapters"]["numbers"]["ollama_template"] == {"written": True, "problem": None}
    modelfile = (bundle / "Modelfile.numbers").read_text()
    assert "ADAPTER ./adapters/numbers.gguf" in modelfile and 'TEMPLATE """' in modelfile
    assert "--lora" in (bundle / "llama-server.sh").read_text()
