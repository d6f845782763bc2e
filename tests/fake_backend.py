"""A backend defined outside ftd, in a dozen lines: the contract's proof (tests/test_backend_contract.py).

`echo_torch` "builds" an engine by copying the merged checkpoint, and runs it with transformers.
It overrides only what a merged-only backend must: `build` and `open` (and one option). Importing
this module registers it; the real CLI, flow, gate, registry and report then handle it like any
other backend.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ftd.config import TargetConfig
from tasks.backends.base import Backend
from tasks.backends.registry import register
from tasks.backends.runtime import Generation


class EchoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    copy_tokenizer: bool = True


class EchoTorch(Backend):
    name = "echo_torch"
    libraries = ("torch", "transformers")
    options_schema = EchoOptions

    def build(self, merged_dir: Path, target: TargetConfig, out: Path) -> dict:
        keep = self.options(target).copy_tokenizer
        for item in merged_dir.iterdir():
            if item.is_file() and item.name != "ftd-manifest.json" and (keep or "token" not in item.name):
                shutil.copy2(item, out / item.name)
        return {"files": sorted(p.name for p in out.iterdir())}

    def open(self, engine_dir: Path, target: TargetConfig, adapter: str | None = None):
        return TorchEngine(engine_dir)


class TorchEngine:
    def __init__(self, engine_dir: Path):
        from tasks.modeling import load_model, load_tokenizer

        self.model = load_model(engine_dir).eval()
        self.tokenizer = load_tokenizer(engine_dir)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Generation:
        from tasks.smoke import torch_greedy

        return torch_greedy(self.model, prompt_ids, max_new_tokens, eos_ids, self.tokenizer)


class BrokenBuild(Backend):
    """A backend whose engine build crashes: that target fails alone, the others still run."""

    name = "broken_build"

    def build(self, merged_dir: Path, target: TargetConfig, out: Path) -> dict:
        raise RuntimeError("the engine compiler crashed\nsegfault at 0x0")


register(EchoTorch())
register(BrokenBuild())
