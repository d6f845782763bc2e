"""Several adapters on one base (two trained with different ranks and modules, one imported
rsLoRA adapter), six targets: merged fp32, merged int4, one ONNX multi-LoRA bundle in fp32 and one
in int4, one llama.cpp multi-LoRA bundle, one TensorRT-LLM + Triton bundle.

Adding an adapter to an experiment re-exports only that adapter: the multi-LoRA base graph and
the other adapters' exports (ONNX, llama.cpp and TensorRT-LLM) are cache hits.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tasks.backends.llama_cpp import tools
from tests.conftest import ROOT, run_ftd

pytestmark = pytest.mark.e2e
CONFIG = ROOT / "configs" / "multi-adapter.yaml"
INT4_MARGIN = 0.15  # eval accuracy below fp32's that int4 may lose on the random tiny base (see the config)


def _records(summary: dict, stage: str) -> dict[str, str]:
    return {s["label"]: s["status"] for s in summary["stages"] if s["stage"] == stage}


def test_adding_an_adapter_reexports_only_that_adapter(tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    full = yaml.safe_load(CONFIG.read_text())
    first = dict(full, adapters=[a for a in full["adapters"] if a["name"] != "next-digit"])
    first_config = tmp_path / "two-adapters.yaml"
    first_config.write_text(yaml.safe_dump(first))

    result = run_ftd(artifacts, config=first_config)
    assert result.code == 0, result.stderr[-4000:]
    m = result.summary["metrics"]
    for name in ("numbers", "numbers-imported"):
        assert m[f"{name}.onnx-multi-lora.agreement.merged_vs_engine"] >= 0.95
        assert m[f"{name}.onnx-fp32.agreement.merged_vs_engine"] >= 0.95
        assert m[f"{name}.eval_accuracy_after"] >= 0.9
    assert set(_records(result.summary, "onnx-adapter")) == {
        f"{name}/{target}"
        for name in ("numbers", "numbers-imported")
        for target in ("onnx-multi-lora", "onnx-multi-lora-int4")
    }

    result = run_ftd(artifacts, config=CONFIG)
    assert result.code == 0, result.stderr[-4000:]
    summary, m = result.summary, result.summary["metrics"]
    assert _records(summary, "lora-graph") == {"onnx-multi-lora": "cache hit", "onnx-multi-lora-int4": "cache hit"}
    assert _records(summary, "onnx-adapter") == {
        f"{name}/{target}": "built" if name == "next-digit" else "cache hit"
        for name in ("numbers", "numbers-imported", "next-digit")
        for target in ("onnx-multi-lora", "onnx-multi-lora-int4")
    }
    assert _records(summary, "adapter") == {
        "numbers": "cache hit",
        "numbers-imported": "cache hit",
        "next-digit": "built",
    }
    # Each adapter, active in the one bundle, answers like its own merged model.
    for name in ("numbers", "numbers-imported", "next-digit"):
        assert m[f"{name}.onnx-multi-lora.agreement.merged_vs_engine"] >= 0.95
        assert m[f"{name}.onnx-multi-lora.max_logit_diff.merged_vs_engine"] < 1e-3
        assert m[f"{name}.eval_accuracy_after"] >= 0.9
        # int4 stays within its stated margin (configs/multi-adapter.yaml) of the fp32 engine's
        # accuracy, merged and multi-LoRA (int4 base graph, fp32 LoRA inputs) alike.
        for int4 in ("onnx-int4", "onnx-multi-lora-int4"):
            assert m[f"{name}.{int4}.accuracy.engine"] >= m[f"{name}.onnx-fp32.accuracy.engine"] - INT4_MARGIN
    registered = {(r["kind"], r["item"]) for r in summary["registered"]}
    assert {("engine", "onnx-multi-lora"), ("engine", "onnx-multi-lora-int4")} <= registered
    llama_cpp_missing = tools.unavailable_reason()
    if llama_cpp_missing is None:
        # llama.cpp: one base GGUF (a cache hit) and a LoRA GGUF per adapter; only the new one
        # converted. Each adapter, switched on in the one loaded base, matches PyTorch within 1e-4
        # (the imported rsLoRA adapter too: its scale is folded into B, llama.cpp would otherwise
        # apply alpha / r).
        assert _records(summary, "gguf") == {"gguf-multi-lora": "cache hit"}
        assert _records(summary, "gguf-lora") == {
            f"{name}/gguf-multi-lora": "built" if name == "next-digit" else "cache hit"
            for name in ("numbers", "numbers-imported", "next-digit")
        }
        for name in ("numbers", "numbers-imported", "next-digit"):
            assert m[f"{name}.gguf-multi-lora.agreement.merged_vs_engine"] == 1.0
            assert m[f"{name}.gguf-multi-lora.max_logit_diff.merged_vs_engine"] < 1e-4
        assert ("engine", "gguf-multi-lora") in registered
    else:  # no llama.cpp here (make install found no compiler): skipped with that reason, not registered
        step = next(s for s in summary["stages"] if s["stage"] == "gguf-bundle")
        assert step["status"] == "skipped" and llama_cpp_missing in step["detail"]
        assert ("engine", "gguf-multi-lora") not in registered
    # every servable version (3 adapters, 6 merged engines, 3 bundles) answers like its gate
    assert served_versions_answer_like_their_gate(artifacts, summary) == (12 if llama_cpp_missing is None else 11)
    assert {("adapter", n) for n in ("numbers", "numbers-imported", "next-digit")} <= registered

    # TensorRT-LLM + Triton: one bundle for all three adapters (ranks 8, 4, 16), verified on CPU;
    # the engine build is skipped with its reason, and the bundle is still a registered version.
    assert _records(summary, "trt-lora") == {
        "numbers/trtllm-triton": "cache hit",
        "numbers-imported/trtllm-triton": "cache hit",
        "next-digit/trtllm-triton": "built",
    }
    engine_step = next(s for s in summary["stages"] if s["stage"] == "trt-engine")
    assert engine_step["status"] == "skipped" and "GPU" in engine_step["detail"]
    bundle_step = next(s for s in summary["stages"] if s["stage"] == "triton-bundle")
    bundle_dir = next((artifacts / "store" / "triton-bundle").glob(bundle_step["key"] + "*"))
    manifest = json.loads((bundle_dir / "bundle.json").read_text())
    assert {n: a["ranks"] for n, a in manifest["adapters"].items()} == {
        "numbers": [8], "next-digit": [4], "numbers-imported": [16]}  # fmt: skip
    assert manifest["engine"]["max_lora_rank"] == 16 and manifest["triton_lora_type"] == "TYPE_BF16"
    checks = json.loads((bundle_dir / "checks.json").read_text())["summary"]
    assert checks["warmup_entries"] == 3 and checks["adapters_checked"] == 3
    for name in ("numbers", "numbers-imported", "next-digit"):
        assert "engine not built" in m[f"{name}.trtllm-triton.skipped"]
    assert ("engine", "trtllm-triton") in registered


def served_versions_answer_like_their_gate(artifacts: Path, summary: dict, prompts_per_adapter: int = 4) -> int:
    """Every registered version tagged servable loads with mlflow.pyfunc and answers each adapter's
    first eval prompts with exactly its gate's engine tokens (an adapter version: its reference
    outputs). Returns how many versions were checked."""
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{artifacts / 'mlflow.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{artifacts / 'mlflow.db'}")
    keys = {(s["stage"], s["label"]): s["key"] for s in summary["stages"]}

    def stored(stage: str, label: str) -> Path:
        return next((artifacts / "store" / stage).glob(keys[(stage, label)] + "*"))

    checked = 0
    for r in summary["registered"]:
        version = client.get_model_version(r["name"], r["version"])
        if version.tags.get("ftd.servable") != "chat":
            continue
        model = mlflow.pyfunc.load_model(f"models:/{r['name']}/{r['version']}")
        adapters = [r["item"]] if r["kind"] == "adapter" else version.tags["ftd.adapters"].split(",")
        for adapter in adapters:
            info = json.loads((stored("reference", adapter) / "prompts.json").read_text())
            if r["kind"] == "adapter":
                expected = json.loads((stored("reference", adapter) / "tokens.json").read_text())["adapter"]
            else:
                target = r["item"].split("/")[-1]
                expected = json.loads((stored("smoke", f"{adapter}/{target}") / "engine_tokens.json").read_text())
            custom = {"custom_inputs": {"adapter": adapter}} if len(adapters) > 1 else {}
            for p, tokens in list(zip(info["prompts"], expected))[:prompts_per_adapter]:
                answer = model.predict({"messages": p["messages"], "max_tokens": 8, **custom})
                assert answer["custom_outputs"]["tokens"] == tokens, (r["name"], adapter, p)
        checked += 1
    return checked
