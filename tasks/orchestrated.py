"""The Prefect tasks: each pure stage function wrapped with its cache key and a readable name.

Kept apart from the stage modules so those stay importable (and testable) without Prefect.
"""

from __future__ import annotations

from ftd.orchestration import stage_task
from tasks import adapter_import, base_model, build, data, merge, multi_lora, sft, smoke
from tasks.backends import get_backend
from tasks.dashinfer import lora_bundle as dashinfer_lora
from tasks.trtllm import stages as trt_stages


def _base_key(p: dict) -> str | None:
    # A builtin's key is cheap (recipe + corpus hash); an external model's key is its content
    # hash, computed inside the task, so its Prefect record is keyed by the source name and the
    # store's content-addressed directory stays the source of truth.
    spec = p["spec"]
    return None if spec.kind != "builtin" else base_model.builtin_key(spec.name)


def _build_key(p: dict) -> str | None:
    if get_backend(p["target"].backend).unavailable_reason(p["target"]):
        return None  # a skipped build is never cached: it must run once the GPU is there
    return build.build_key(p["merged"], p["target"])


resolve_base_task = stage_task(base_model.resolve_base, base_model.STAGE, _base_key, "base[{spec.name}]")
prepare_data_task = stage_task(data.prepare_data, data.STAGE, lambda p: data.data_key(p["cfg"]), "data[{cfg.train}]")
sft_task = stage_task(
    sft.train_adapter,
    sft.STAGE,
    lambda p: sft.sft_key(p["base"], p["data"], p["adapter"], p["trust_remote_code"]),
    "sft[{adapter.name}]",
)
import_task = stage_task(
    adapter_import.import_adapter,
    sft.STAGE,
    lambda p: adapter_import.import_key(p["base"], p["adapter"]),
    "import[{adapter.name}]",
)
merge_task = stage_task(
    merge.merge_adapter,
    merge.STAGE,
    lambda p: merge.merge_key(p["base"], p["adapter"], p["settings"]),
    "merge[{adapter.meta[adapter_name]}]",
)
build_task = stage_task(build.build_engine, build.STAGE, _build_key, "build[{target.name}]")
reference_task = stage_task(
    smoke.reference_outputs,
    smoke.REFERENCE,
    lambda p: smoke.reference_key(p["base"], p["adapter"], p["merged"], p["data"], p["settings"]),
    "reference[{adapter.meta[adapter_name]}]",
)
smoke_task = stage_task(
    smoke.smoke_test,
    smoke.SMOKE,
    lambda p: smoke.smoke_key(p["reference"], p["engine"], p["target"], p["settings"]),
    "smoke[{adapter.meta[adapter_name]}/{target.name}]",
)
lora_graph_task = stage_task(
    multi_lora.build_lora_graph,
    multi_lora.GRAPH,
    lambda p: multi_lora.graph_key(p["base"], p["modules"], p["target"]),
    "lora-graph[{target.name}]",
)
export_adapter_task = stage_task(
    multi_lora.export_onnx_adapter,
    multi_lora.EXPORT,
    lambda p: multi_lora.export_key(p["graph"], p["adapter"]),
    "onnx-adapter[{adapter.meta[adapter_name]}]",
)
bundle_task = stage_task(
    multi_lora.assemble_bundle,
    multi_lora.BUNDLE,
    lambda p: multi_lora.bundle_key(p["graph"], p["exports"]),
    "lora-bundle",
)


def _trt_engine_key(p: dict) -> str | None:
    if get_backend(p["target"].backend).unavailable_reason(p["target"]):
        return None  # skipped here: never cached, so a GPU machine builds it
    return trt_stages.engine_key(p["model"], p["loras"], p["target"], p["architecture"])


trt_lora_task = stage_task(
    trt_stages.convert_lora,
    trt_stages.LORA,
    lambda p: trt_stages.lora_key(p["adapter"], p["target"]),
    "trt-lora[{adapter.meta[adapter_name]}]",
)
trt_engine_task = stage_task(trt_stages.build_engine, trt_stages.ENGINE, _trt_engine_key, "trt-engine[{target.name}]")
triton_bundle_task = stage_task(
    trt_stages.assemble_bundle,
    trt_stages.BUNDLE,
    lambda p: trt_stages.bundle_key(p["model"], p["tokenizer_from"], p["loras"], p["engine"], p["target"]),
    "triton-bundle[{target.name}]",
)
dashinfer_lora_task = stage_task(
    dashinfer_lora.assemble,
    dashinfer_lora.STAGE,
    lambda p: dashinfer_lora.bundle_key(p["base"], p["adapters"], p["target"]),
    "dashinfer-lora[{target.name}]",
)
