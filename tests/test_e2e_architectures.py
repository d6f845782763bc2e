"""The whole chain on the other builtin architectures: Qwen2 (q/k/v biases, tied embeddings)
and Phi-3 (fused qkv_proj and gate_up_proj) — SFT, streaming merge, both ONNX export paths and a
multi-LoRA bundle, each behind the parity gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import ROOT, run_ftd

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-phi3"])
def test_chain_passes_on_architecture(name: str, tmp_path: Path) -> None:
    result = run_ftd(
        tmp_path / "artifacts",
        "--set", "targets.1={name: onnx-optimum, options: {exporter: optimum}}",
        "--set", "targets.2={name: onnx-multi-lora, mode: multi_lora}",
        config=ROOT / "configs" / f"{name}.yaml",
    )  # fmt: skip
    assert result.code == 0, result.stderr[-4000:]
    m = result.summary["metrics"]
    adapter = result.summary["stages"][2]["label"]
    assert m[f"{adapter}.eval_accuracy_after"] >= 0.9 > m[f"{adapter}.eval_accuracy_before"] + 0.5
    for target in ("onnx-fp32", "onnx-optimum", "onnx-multi-lora"):
        assert m[f"{adapter}.{target}.agreement.merged_vs_engine"] >= 0.95
        assert m[f"{adapter}.{target}.max_logit_diff.merged_vs_engine"] < 1e-3
        assert m[f"{adapter}.{target}.agreement.adapter_vs_merged"] >= 0.95
