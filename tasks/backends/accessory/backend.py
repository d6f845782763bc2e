"""LLaMA2-Accessory checkpoints: the merged model exported as model-parallel `consolidated.*.pth`
shards (tasks/backends/accessory/export.py), and checked through the same parity gate as every engine.

The smoke test runs the exported shards — reassembled from the format description, not from the
exporter's own tables — through a Meta-style Llama forward (interleaved rotary, `llma.` keys,
Accessory's shapes). Agreement and |Δlogit| against the merged PyTorch model therefore prove the
key names, the split dimensions and the q/k permutation, not just that files were written.
"""

from __future__ import annotations

import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from ftd.config import TargetConfig
from ftd.errors import ConfigError, FtdError
from tasks.backends.accessory.export import (
    REFUSED_WHY,
    SUPPORTED,
    AccessoryLlama,
    accessory_args,
    export_accessory,
    load_accessory,
)
from tasks.backends.base import Backend, parse_options
from tasks.backends.runtime import Generation

NAME = "accessory"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


class AccessoryOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model_parallel_size: int = Field(1, gt=0, description="Shards written: consolidated.NN-of-MM.model.pth.")


def options_of(target: TargetConfig) -> AccessoryOptions:
    return parse_options(target, AccessoryOptions)


class Accessory(Backend):
    name = NAME
    modes = ("merged",)
    libraries = ("torch", "safetensors", "transformers")
    options_schema = AccessoryOptions

    def check(self, target: TargetConfig, architecture: str) -> None:
        options_of(target)
        if architecture not in SUPPORTED:
            why = REFUSED_WHY.get(architecture, f"Accessory's llama type covers {', '.join(SUPPORTED)}")
            raise ConfigError(f"targets.{target.name}: cannot export {architecture} to LLaMA2-Accessory: {why}")
        if target.precision not in DTYPES or target.device != "cpu":
            raise ConfigError(
                f"targets.{target.name}: an Accessory checkpoint is written as precision fp32, fp16 or bf16 and "
                f"checked on device cpu (got {target.precision}/{target.device})"
            )

    def check_model(self, target: TargetConfig, model_config: dict) -> None:
        """Model-parallel limits, known from the base config before anything is trained."""
        mp = options_of(target).model_parallel_size
        try:
            accessory_args(model_config, Path("base_model config.json"))
        except FtdError as exc:
            raise ConfigError(f"targets.{target.name}: {exc}") from None
        for what in ("num_attention_heads", "num_key_value_heads", "hidden_size", "intermediate_size", "vocab_size"):
            n = model_config.get(what) or model_config["num_attention_heads"]
            if n % mp:
                raise ConfigError(
                    f"targets.{target.name}.options.model_parallel_size: {mp} does not divide the base model's "
                    f"{what}={n}; Accessory splits weights evenly across ranks"
                )

    def build(self, merged_dir: Path, target: TargetConfig, out: Path) -> dict:
        started = time.perf_counter()
        meta = export_accessory(merged_dir, out, options_of(target).model_parallel_size, DTYPES[target.precision])
        return {"build_seconds": round(time.perf_counter() - started, 2), **meta}

    def open(self, engine_dir: Path, target: TargetConfig, adapter: str | None = None) -> AccessoryEngine:
        return AccessoryEngine(engine_dir)


class AccessoryEngine:
    def __init__(self, checkpoint_dir: Path):
        args, state = load_accessory(checkpoint_dir)
        self.model = AccessoryLlama(args, state)

    def greedy(self, prompt_ids: list[int], max_new_tokens: int, eos_ids: list[int]) -> Generation:
        return self.model.generation(prompt_ids, max_new_tokens, eos_ids)


BACKEND = Accessory()
