"""MindSpore / MindFormers: the seed's three steps — merge (ftd's streaming merge), convert the
weights to MindFormers' key layout (tasks/backends/mindspore/convert.py: safetensors, a `.ckpt` when the optional
`mindspore` package is installed, the predict YAML, the tokenizer), deploy with MindSpore Lite.

The conversion runs anywhere and is checked by a round trip back to the HF names (keys, shapes,
bytes). The deploy step needs an Ascend NPU: the smoke test is skipped with that reason.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ftd.config import TargetConfig
from ftd.errors import ConfigError
from tasks.backends.base import Backend
from tasks.backends.mindspore.convert import KEY_MAPS, ascend_deploy_status, convert_to_mindformers

NAME = "mindspore"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class MindSpore(Backend):
    name = NAME
    modes = ("merged",)
    libraries = ("safetensors", "mindspore")

    def check(self, target: TargetConfig, architecture: str) -> None:
        if architecture not in KEY_MAPS:
            raise ConfigError(
                f"targets.{target.name}: MindFormers conversion supports {', '.join(sorted(KEY_MAPS))}, not {architecture}"
            )
        if target.precision not in DTYPES:
            raise ConfigError(f"targets.{target.name}.precision: expected one of {', '.join(DTYPES)}")

    def smoke_unavailable_reason(self, target: TargetConfig) -> str | None:
        return ascend_deploy_status().removeprefix("skipped: ")  # even on Ascend: serving is not automated

    def build(self, merged_dir: Path, target: TargetConfig, out: Path) -> dict:
        architecture = (json.loads((merged_dir / "config.json").read_text()).get("architectures") or ["?"])[0]
        started = time.perf_counter()
        meta = convert_to_mindformers(merged_dir, out, architecture, DTYPES[target.precision])
        meta.pop("key_map", None)  # recorded in the file itself; keep the artifact manifest short
        ckpt = meta.get("ckpt") or {}
        checks = {"round_trip": meta.get("round_trip"), "tensors": meta.get("tensors"),
                  "ckpt": "skipped: " + ckpt["skipped"] if "skipped" in ckpt else "written and reloaded"}  # fmt: skip
        return {"build_seconds": round(time.perf_counter() - started, 2), "checks": checks, **meta}

    def open(self, engine_dir: Path, target: TargetConfig, adapter: str | None = None):
        raise NotImplementedError("MindSpore Lite inference needs an Ascend NPU; ftd does not run it here")


BACKEND = MindSpore()
