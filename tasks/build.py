"""Build one target's engine from a merged model, through the backend registry.

A target that cannot be built on this machine (no GPU, package absent) yields an artifact
record marked `skipped` with the reason; the flow reports it as skipped, never as built.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from ftd.config import TargetConfig
from ftd.store import Artifact, Store, code_version, library_versions, stage_key
from tasks.backends.registry import get_backend

STAGE = "engine"


def build_key(merged: Artifact, target: TargetConfig) -> str:
    backend = get_backend(target.backend)
    section = target.model_dump(mode="json", exclude={"name"})  # renaming a target is not a rebuild
    return stage_key(
        STAGE,
        code=code_version(__file__, inspect.getfile(type(backend))),
        config=section,
        inputs=[merged.key],
        libraries=library_versions(*backend.libraries),
    )


def target_unavailable(target: TargetConfig) -> str | None:
    """Why this target cannot be built on this machine (its backend's word), or None."""
    return get_backend(target.backend).unavailable_reason(target)


def build_engine(merged: Artifact, target: TargetConfig, store: Store) -> Artifact:
    backend = get_backend(target.backend)
    key = build_key(merged, target)
    reason = target_unavailable(target)
    if reason:
        return Artifact(stage=STAGE, key=key, meta={"skipped": True, "reason": reason, "target": target.name})

    def build(tmp: Path) -> dict:
        meta = backend.build(merged.path(store), target, tmp)
        return {"target": target.name, "backend": target.backend, "precision": target.precision, **meta}

    return store.materialize(STAGE, key, build, lineage={"merged": merged.key})
