"""The backend contract: what pre-flight asks of every backend, how a deployment's status is
decided, the registration rules and the report — and a backend defined outside ftd
(tests/fake_backend.py) going through the real CLI, flow, gate, registry and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows import registration, report
from ftd.config import TargetConfig
from ftd.errors import ConfigError, GateFailed
from ftd.store import Artifact
from tasks.backends.base import Backend, Deployment, Status
from tasks.backends.registry import get_backend, known, register, unregister
from tests.conftest import seed_store

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def echo():
    from tests import fake_backend

    register(fake_backend.EchoTorch())  # importing it registers it too, but only the first time
    yield get_backend("echo_torch")
    unregister("echo_torch")
    unregister("broken_build")


def target(**fields) -> TargetConfig:
    return TargetConfig(**{"name": "t", "backend": "echo_torch", "precision": "fp32", **fields})


def test_validate_names_the_backend_and_what_it_accepts(echo) -> None:
    echo.validate(target(), "LlamaForCausalLM", {}, [])
    with pytest.raises(ConfigError, match=r"targets\.t\.mode: echo_torch supports merged, not multi_lora"):
        echo.validate(target(mode="multi_lora"), "LlamaForCausalLM", {}, [])
    with pytest.raises(ConfigError, match=r"targets\.t\.options: unknown key `copy_tokeniser`"):
        echo.validate(target(options={"copy_tokeniser": False}), "LlamaForCausalLM", {}, [])
    with pytest.raises(ConfigError, match="takes no options"):
        get_backend("mindspore").options(target(backend="mindspore", options={"x": 1}))
    assert "echo_torch" in known()
    with pytest.raises(ConfigError, match="unknown backend 'nope'; known: accessory, .*echo_torch, llama_cpp, mindspore"):
        get_backend("nope")


def test_a_deployment_status_comes_from_the_artifact_and_the_machine(echo, monkeypatch) -> None:
    built = Artifact(stage="engine", key="k")
    skipped = Artifact(stage="engine", key="k", meta={"skipped": True, "reason": "needs a GPU"})
    assert echo.deployment(target(), "a", built).status is Status.READY
    assert (echo.deployment(target(), "a", skipped).status, echo.deployment(target(), "a", skipped).reason) == (
        Status.SKIPPED, "needs a GPU")  # fmt: skip
    monkeypatch.setattr(type(echo), "smoke_unavailable_reason", lambda self, t: "no NPU here")
    verified = echo.deployment(target(), "a", built)
    assert (verified.status, verified.reason, verified.registrable, verified.complete) == (
        Status.VERIFIED_ONLY, "no NPU here", True, False)  # fmt: skip
    with pytest.raises(NotImplementedError, match="builds no engine"):
        Backend().build(Path("."), target(), Path("."))


def deployment(adapter: str, status: Status, mode: str = "merged", name: str = "t") -> Deployment:
    return Deployment(target(mode=mode, name=name), adapter, Artifact(stage="engine", key=adapter), status)


def test_registration_rules() -> None:
    merged = target()
    ds = [deployment("a", Status.PASSED), deployment("b", Status.FAILED), deployment("c", Status.VERIFIED_ONLY),
          deployment("d", Status.SKIPPED)]  # fmt: skip
    groups = registration.registrable_groups(merged, ds, ["a", "b", "c", "d"], {"a", "c", "d"})
    assert [[d.adapter for d in g] for g in groups] == [["a"], ["c"]]  # failed, skipped: never
    assert registration.registrable_groups(merged, ds, ["a", "c"], {"c"}) == [[ds[2]]]  # adapter not registered
    bundle = target(mode="multi_lora", name="b")
    both = [deployment("a", Status.PASSED, "multi_lora", "b"), deployment("b", Status.PASSED, "multi_lora", "b")]
    assert registration.registrable_groups(bundle, both, ["a", "b"], {"a", "b"}) == [both]
    one_failed = [both[0], deployment("b", Status.FAILED, "multi_lora", "b")]
    assert registration.registrable_groups(bundle, one_failed, ["a", "b"], {"a", "b"}) == []  # all or nothing
    assert registration.registrable_groups(bundle, both, ["a", "b"], {"a"}) == []


def test_the_gate_blames_the_adapter_only_for_failures_of_the_pytorch_models() -> None:
    """An engine that differs fails alone (its adapter and other engines are still registered); a
    failure of the adapter itself (its accuracy, or merged vs unmerged) blocks the adapter."""
    import numpy as np

    from ftd.config import Thresholds
    from tasks.backends.runtime import Generation
    from tasks.smoke import build_report

    class Tok:
        def decode(self, tokens, skip_special_tokens=True):
            return " ".join(map(str, tokens))

    prompts = [{"messages": [{"role": "user", "content": "q"}], "answer": "1 2"}]
    good = [Generation([1, 2], [np.zeros(4), np.zeros(4)])]
    bad = [Generation([1, 3], [np.zeros(4), np.ones(4)])]
    t = Thresholds(min_accuracy=0.9, min_agreement=0.95, max_logit_diff=1e-3)
    engine_only = build_report(Tok(), prompts, {"adapter": good, "merged": good, "engine": bad}, t, "t")
    assert engine_only["failures"] and engine_only["adapter_failures"] == []
    merge_broken = build_report(Tok(), prompts, {"adapter": good, "merged": bad, "engine": bad}, t, "t")
    assert any(f.startswith("adapter_vs_merged") for f in merge_broken["adapter_failures"])
    untrained = build_report(Tok(), prompts, {"adapter": bad, "merged": bad, "engine": bad}, t, "t")
    assert untrained["adapter_failures"] == ["adapter eval accuracy 0.000 < 0.9"]
    failed = deployment("a", Status.FAILED)
    failed.failure = GateFailed("engine differs", engine_only)
    assert not failed.adapter_failed
    failed.failure = GateFailed("merge differs", merge_broken)
    assert failed.adapter_failed


def test_report_line_per_status() -> None:
    checked = Deployment(target(), "a", Artifact(stage="b", key="k", meta={"checks": {"max_delta": 1e-7}}),
                         Status.VERIFIED_ONLY, "needs Triton")  # fmt: skip
    failed = deployment("a", Status.FAILED)
    failed.failure = GateFailed("parity gate failed for target t: agreement 0.5 < 0.95", {})
    lines = {
        "passed": report._outcome_line(deployment("a", Status.PASSED)),
        "skipped": report._outcome_line(Deployment(target(), "a", Artifact(stage="e", key="-"), Status.SKIPPED, "no GPU")),
        "verified": report._outcome_line(checked),
        "failed": report._outcome_line(failed),
    }  # fmt: skip
    assert lines["passed"] == "  - t: gate passed"
    assert lines["skipped"] == "  - t: skipped — no GPU"
    assert (
        lines["verified"]
        == "  - t: bundle built and verified on CPU (max delta: 1.0e-07); smoke test skipped — needs Triton"
    )
    assert "**parity gate failed**" in lines["failed"] and "agreement 0.5 < 0.95" in lines["failed"]


@pytest.fixture(scope="module")
def shared_artifacts(tmp_path_factory, trained_default) -> Path:
    return seed_store(trained_default, tmp_path_factory.mktemp("contract") / "artifacts")


def run_with_fakes(artifacts: Path, summary_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The real `ftd run` (app.cli.main) in a subprocess that first imports tests/fake_backend.py."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    code = "import sys, tests.fake_backend; from app.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", code, "run", str(ROOT / "configs" / "tiny-llama.yaml"), "--set",
            f"artifacts_dir={artifacts}", "--summary", str(summary_path)]  # fmt: skip
    for override in overrides:
        argv += ["--set", override]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def run_report(summary_or_uri: str, run_id: str, where: Path) -> str:
    import mlflow

    client = mlflow.MlflowClient(summary_or_uri)
    return Path(client.download_artifacts(run_id, "report.md", str(where))).read_text()


@pytest.mark.e2e
def test_a_backend_from_outside_goes_through_the_real_flow(shared_artifacts: Path, tmp_path: Path) -> None:
    """One new module + one `register` call: pre-flight, the flow's deploy, the gate, the registry
    and the report handle it; nothing in ftd names it."""
    summary_path = tmp_path / "summary.json"
    proc = run_with_fakes(
        shared_artifacts, summary_path, "targets.0={name: echo, backend: echo_torch, precision: fp32}"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads(summary_path.read_text())
    assert summary["metrics"]["numbers.echo.agreement.merged_vs_engine"] == 1.0
    # the same model and arithmetic: only rounding differs (the references decode prompts in padded
    # batches, the echo engine one by one)
    assert summary["metrics"]["numbers.echo.max_logit_diff.merged_vs_engine"] < 1e-4
    engines = [r for r in summary["registered"] if r["kind"] == "engine"]
    assert [(r["item"], r["name"]) for r in engines] == [("numbers/echo", "tiny-llama-echo")]
    import mlflow

    version = mlflow.MlflowClient(summary["tracking_uri"]).get_model_version("tiny-llama-echo", engines[0]["version"])
    assert version.tags["ftd.backend"] == "echo_torch" and version.tags["ftd.smoke.agreement.merged_vs_engine"] == "1.0"
    text = run_report(summary["tracking_uri"], summary["mlflow_run_id"], tmp_path)
    assert "  - echo: gate passed" in text and "### Smoke test: numbers → echo" in text


@pytest.mark.e2e
def test_a_target_whose_build_raises_fails_alone_in_one_line(shared_artifacts: Path, tmp_path: Path) -> None:
    """The broken target is that target's gate failure, named with its engine and error in one line;
    the other target is still built, gated, reported and registered, and so is the adapter (same
    store: the adapter is a cache hit)."""
    proc = run_with_fakes(shared_artifacts, tmp_path / "summary.json",
                          "targets.0={name: broken, backend: broken_build, precision: fp32}",
                          "targets.1={name: echo, backend: echo_torch, precision: fp32}")  # fmt: skip
    assert proc.returncode == 1
    last = [line for line in proc.stderr.splitlines() if line.strip()][-1]
    assert last == "ftd: error: target broken (broken_build): build failed: RuntimeError: segfault at 0x0", last
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{shared_artifacts / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny-llama").experiment_id], order_by=["start_time DESC"])
    text = run_report(f"sqlite:///{shared_artifacts / 'mlflow.db'}", runs[0].info.run_id, tmp_path)
    assert "  - broken: **parity gate failed**" in text and "segfault at 0x0" in text
    assert "  - echo: gate passed" in text  # the other target ran and was gated
    registered = text.split("## Registered versions", 1)[1]
    assert "| engine | numbers/echo | tiny-llama-echo |" in registered  # ... and registered
    assert "| adapter | numbers | tiny-llama-adapter |" in registered
    assert "broken" not in registered
