"""A stage is declared once: its cache key is its own key function bound by argument name, so the
Prefect record and the store's artifact cannot be keyed differently, and a key that names an
argument the stage does not take fails when the stage is declared, not in a run."""

from __future__ import annotations

import pytest

from ftd.orchestration import stage_task
from ftd.store import Artifact


def merge(base: Artifact, adapter: Artifact, settings: dict, store) -> Artifact:
    return Artifact(stage="merged", key=merge_key(base, adapter, settings))


def merge_key(base: Artifact, adapter: Artifact, settings: dict) -> str:
    return f"{base.key}+{adapter.key}+{sorted(settings.items())}"


def test_the_task_key_is_the_stage_key() -> None:
    task = stage_task(merge, "merged", merge_key, "merge")
    params = {"base": Artifact(stage="base", key="b"), "adapter": Artifact(stage="adapter", key="a"),
              "settings": {"dtype": "auto"}, "store": None}  # fmt: skip
    assert task.key_of(params) == merge(**params).key == "b+a+[('dtype', 'auto')]"


def test_a_key_that_drifts_from_the_stage_is_refused_at_declaration() -> None:
    def drifted_key(base: Artifact, lora: Artifact) -> str:  # the stage calls it `adapter`
        return base.key + lora.key

    with pytest.raises(TypeError, match=r"drifted_key takes \['lora'\], which merge does not"):
        stage_task(merge, "merged", drifted_key, "merge")


def test_a_skipped_step_has_no_key() -> None:
    task = stage_task(merge, "merged", merge_key, "merge", skip_reason=lambda settings: settings.get("why"))
    params = {"base": Artifact(stage="base", key="b"), "adapter": Artifact(stage="adapter", key="a"), "store": None}
    assert task.key_of(params | {"settings": {"why": "needs a GPU"}}) is None
    assert task.key_of(params | {"settings": {}}) == "b+a+[]"


def test_a_declared_stage_pickles() -> None:
    """`ftd serve` runs flows whose module Prefect cloudpickles by value, tasks included."""
    import cloudpickle

    task = stage_task(merge, "merged", merge_key, "merge")
    _ = task.prefect  # made, then left behind by pickling
    again = cloudpickle.loads(cloudpickle.dumps(task))
    assert again.stage == "merged" and again.key_of({"base": Artifact(stage="b", key="b"),
                                                     "adapter": Artifact(stage="a", key="a"), "settings": {}}) == "b+a+[]"
