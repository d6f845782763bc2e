"""A target this machine cannot build (CUDA without a GPU) is reported as skipped with the reason,
never as built, and is never cached (it must build once a GPU is there)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ftd.config import TargetConfig
from ftd.store import Artifact, Store
from tasks.backends.registry import get_backend
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
    from tasks.orchestrated import build_task

    target = TargetConfig(name="onnx-cuda", precision="fp16", device="cuda")
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA")
    assert build_task.key_of({"target": target, "merged": Artifact(stage="merged", key="k")}) is None


@pytest.fixture
def fake_gpu(monkeypatch):
    """torch sees a GPU: what the skip logic says on a GPU machine whose packages are missing."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: "Fake H200")


def test_with_a_gpu_only_the_missing_package_is_named(fake_gpu, monkeypatch) -> None:
    import onnxruntime_genai as og

    from tasks.backends.base import gpu_unavailable_reason

    assert gpu_unavailable_reason("engine build", []) is None  # a GPU and its packages: never skipped
    monkeypatch.setattr(og, "is_cuda_available", lambda: False)
    og_reason = get_backend("onnx_genai").unavailable_reason(TargetConfig(name="c", precision="fp16", device="cuda"))
    assert (
        og_reason
        == "device cuda needs the onnxruntime-genai-cuda package, not installed here (a GPU is present: Fake H200)"
    )
    trt = TargetConfig(name="t", backend="tensorrt_llm", precision="fp16", device="cuda")
    assert "needs the tensorrt_llm package, not installed here (a GPU is present" in get_backend(
        "tensorrt_llm").unavailable_reason(trt)  # fmt: skip
    lora = TargetConfig(name="d", backend="dashinfer", mode="multi_lora", precision="bf16", device="cuda")
    assert "needs dashinfer 2.x" in get_backend("dashinfer").unavailable_reason(lora)
    assert "needs a GPU" not in get_backend("dashinfer").unavailable_reason(lora)


def test_with_a_gpu_and_its_packages_cuda_targets_are_not_skipped(fake_gpu, monkeypatch) -> None:
    import importlib.util

    import onnxruntime_genai as og

    monkeypatch.setattr(og, "is_cuda_available", lambda: True)
    assert get_backend("onnx_genai").unavailable_reason(TargetConfig(name="c", precision="fp16", device="cuda")) is None
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "tensorrt_llm" else real_find_spec(name, *a)
    )
    trt = TargetConfig(name="t", backend="tensorrt_llm", precision="fp16", device="cuda")
    assert get_backend("tensorrt_llm").unavailable_reason(trt) is None


def test_reference_key_names_the_device_only_off_the_cpu(fake_gpu, monkeypatch) -> None:
    """References computed on a GPU differ from CPU ones in the last bits: their cache keys differ;
    CPU keys are what they were before the reference stage learned to use a GPU."""
    import torch

    from ftd.config import SmokeSettings
    from tasks import smoke

    a = [Artifact(stage=s, key=s[0] * 20) for s in ("base", "adapter", "merged", "data")]
    on_gpu = smoke.reference_key(*a, SmokeSettings())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    on_cpu = smoke.reference_key(*a, SmokeSettings())
    assert on_gpu != on_cpu
    assert smoke.reference_device() == "cpu"
