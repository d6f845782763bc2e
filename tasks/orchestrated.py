"""The core stages as cached tasks: each pure stage function with its cache key and a readable name.

A backend declares its own stages beside their functions (`tasks/backends/<name>/`); these are the
ones every run shares: base, data, SFT or import, merge, reference, a merged engine's build, smoke.
Importing this module does not import Prefect (`ftd.orchestration.StageTask` makes the Prefect task
on first use).
"""

from __future__ import annotations

from ftd.orchestration import stage_task
from tasks import adapter_import, base_model, build, data, merge, sft, smoke


def _base_key(spec) -> str | None:
    # A builtin's key is cheap (recipe + corpus hash); an external model's key is its content
    # hash, computed inside the task, so its Prefect record is keyed by the source name and the
    # store's content-addressed directory stays the source of truth.
    return None if spec.kind != "builtin" else base_model.builtin_key(spec.name)


resolve_base_task = stage_task(base_model.resolve_base, base_model.STAGE, _base_key, "base[{spec.name}]")
prepare_data_task = stage_task(data.prepare_data, data.STAGE, data.data_key, "data[{cfg.train}]")
sft_task = stage_task(sft.train_adapter, sft.STAGE, sft.sft_key, "sft[{adapter.name}]")
import_task = stage_task(adapter_import.import_adapter, sft.STAGE, adapter_import.import_key, "import[{adapter.name}]")
merge_task = stage_task(merge.merge_adapter, merge.STAGE, merge.merge_key, "merge[{adapter.meta[adapter_name]}]")
# a skipped build is never cached: it must run once the GPU (or the package) is there
build_task = stage_task(build.build_engine, build.STAGE, build.build_key, "build[{target.name}]",
                        skip_reason=build.target_unavailable)  # fmt: skip
reference_task = stage_task(
    smoke.reference_outputs, smoke.REFERENCE, smoke.reference_key, "reference[{adapter.meta[adapter_name]}]"
)
smoke_task = stage_task(
    smoke.smoke_test, smoke.SMOKE, smoke.smoke_key, "smoke[{adapter.meta[adapter_name]}/{target.name}]"
)
