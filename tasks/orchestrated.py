"""The core stages as cached tasks: each pure stage function with its cache key and a readable name.

A backend declares its own stages beside their functions (`tasks/backends/<name>/`); these are the
ones every run shares: base, data, SFT or import, merge, reference, a merged engine's build, smoke.
Importing this module does not import Prefect (`ftd.orchestration.StageTask` makes the Prefect task
on first use).
"""

from __future__ import annotations

from ftd.orchestration import stage_task
from tasks import adapter_import, base_model, build, data, merge, sft, smoke
from tasks.backends.registry import get_backend


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
