"""A target this machine cannot build (CUDA without a GPU) is reported as skipped with the reason,
never as built, and is never cached (it must build once a GPU is there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftd.config import TargetConfig
from ftd.store import Artifact, Store
from tasks.backends import get_backend
from tasks.build import build_engine


def test_cuda_target_is_skipped_with_reason(tmp_path: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA: the target would really be built")
    target = TargetConfig(name="onnx-cuda-fp16", precision="fp16", device="cuda")
    get_backend("onnx_genai").check(target, "LlamaForCausalLM")  # a valid target...
    merged = Artifact(stage="merged", key="k" * 20)
    store = Store(tmp_path)
    engine = build_engine(merged, target, store)  # ...that cannot be built here
    assert engine.meta["skipped"] is True
    assert "needs a GPU" in engine.meta["reason"]
    assert not (tmp_path / "store").exists()  # nothing written, nothing cached


def test_skipped_build_has_no_prefect_cache_key() -> None:
    from tasks.orchestrated import _build_key

    target = TargetConfig(name="onnx-cuda", precision="fp16", device="cuda")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    assert _build_key({"target": target, "merged": Artifact(stage="merged", key="k")}) is None
